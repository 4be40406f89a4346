"""Robust training (random block skipping) under cuda_graphs: the skip decision as data (snapopt.train.robust.SkipGates).

The gated forward must be the structurally skipped model; the undone optimizer step must leave a skipped block as
AdamW leaves a block without gradient; the static-buffer step (what a GPU captures) must train what the ordinary
loop trains, bit for bit on CPU, since both run the same gated kernels."""

from __future__ import annotations

import copy

import pytest
import torch

from test_train_graphs import CPU, _both, _opts


def _unet_inputs(pipe, n=2):
    g = torch.Generator().manual_seed(0)
    cfg = pipe.unet.config
    x = torch.randn(n, cfg.in_channels, pipe.latent_size, pipe.latent_size, generator=g)
    c = torch.randn(n, 7, cfg.cross_attention_dim, generator=g)
    return x, torch.tensor([500, 20]), c


@pytest.mark.parametrize("kinds", [("attention",), ("resnet",), ("attention", "resnet")])
def test_gated_forward_equals_skipped_blocks(tiny_pipe, kinds):
    """Every gate pattern gives the structurally skipped model's output; an all-open gate the plain model's."""
    from snapopt.models.skipping import skip_blocks, skippable_blocks
    from snapopt.train.options import RobustOptions
    from snapopt.train.robust import RandomSkipper, SkipGates

    unet = tiny_pipe.clone(["unet"]).unet.eval()
    hooks_before = _hooks(unet)  # the shared fixture may carry other tests' hooks; the gates must add none
    x, t, c = _unet_inputs(tiny_pipe)
    gates = SkipGates(unet, RandomSkipper(unet, RobustOptions(attention=0.5, resnet=0.5)))
    wanted = [n for n, k in skippable_blocks(unet).items() if k in kinds]
    patterns = [wanted[::2], wanted[1::2], wanted, []]
    with torch.no_grad():
        for names in patterns:
            skip = torch.tensor([n in names for n in gates.names])
            with skip_blocks(unet, names):
                ref = unet(x, t, c, return_dict=False)[0]
            with gates.gated(skip):
                out = unet(x, t, c, return_dict=False)[0]
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        plain = unet(x, t, c, return_dict=False)[0]
        with skip_blocks(unet, wanted):
            assert (unet(x, t, c, return_dict=False)[0] - plain).abs().max() > 1e-4  # the patterns do change the output
    assert _hooks(unet) == hooks_before  # the gates leave nothing behind


def _hooks(module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()]


def test_gate_keeps_each_block_return_type(tiny_pipe):
    """A Transformer2DModel returns a tuple or an output object, as SkippedBlock does; both are gated."""
    from snapopt.models.blocks import SkippedBlock
    from snapopt.models.skipping import skippable_blocks
    from snapopt.train.robust import _gated_output

    unet = tiny_pipe.clone(["unet"]).unet
    name = next(n for n, k in skippable_blocks(unet).items() if k == "attention" and type(unet.get_submodule(n)).__name__ == "Transformer2DModel")
    block = unet.get_submodule(name)
    ch = block.config.in_channels
    x, c = torch.randn(2, ch, 4, 4), torch.randn(2, 7, unet.config.cross_attention_dim)
    stand_in = SkippedBlock("attention", name)
    with torch.no_grad():
        for kw in ({"return_dict": False}, {"return_dict": True}):
            out = block(x, encoder_hidden_states=c, **kw)
            for skip in (True, False):
                got = _gated_output(torch.tensor(skip), x, block(x, encoder_hidden_states=c, **kw))
                want = stand_in(x, encoder_hidden_states=c, **kw) if skip else out
                assert type(got).__name__ == type(want).__name__  # diffusers has two Transformer2DModelOutput classes
                assert torch.equal(got[0] if isinstance(got, tuple) else got.sample, want[0] if isinstance(want, tuple) else want.sample)


def test_robust_recover_static_step_equals_ordinary_loop(tiny_pipe):
    """One attention block skipped on every step (its weights must not move, in either path), two ResNets at
    random (skipped on some steps, trained on others): losses and weights of the two paths agree."""
    from snapopt.models.skipping import skippable_blocks
    from snapopt.train import RecoverLoss, RobustOptions, Trainer
    from snapopt.train.recover import RecoverObjective

    unet = tiny_pipe.clone(["unet"]).unet
    blocks = skippable_blocks(unet)
    always = next(n for n, k in blocks.items() if k == "attention")
    random_ = [n for n, k in blocks.items() if k == "resnet"][:2]
    robust = RobustOptions(attention=1.0, resnet=0.5, blocks=[always, *random_])
    start = copy.deepcopy(unet.state_dict())
    objs = []

    def make(o):
        objs.append(RecoverObjective(tiny_pipe, unet, o, RecoverLoss(feature_kd=1.0, timestep_scaling=True), robust, device=CPU))
        return objs[-1]

    hist = _both(make, unet, _opts(steps=5, seed=3, ema=0))
    plain, graphed = objs[:2]
    after_graphed = copy.deepcopy(unet.state_dict())
    unet.load_state_dict(start)  # and bit for bit: the ordinary loop runs the same gated kernels
    again = Trainer(make(_opts(steps=5, seed=3, ema=0)), objs[-1].train_o, None, device=CPU).run().history
    objs[-1].close()  # its feature hooks sit on the session-wide teacher (tiny_pipe)
    assert [r["loss"] for r in again] == [r["loss"] for r in hist]
    assert all(torch.equal(v, after_graphed[k]) for k, v in unet.state_dict().items())
    assert plain.skip_counts == graphed.skip_counts  # the same draws
    assert plain.skip_counts[always] == 5 and 0 < sum(plain.skip_counts.get(n, 0) for n in random_) < 10
    assert all(r["skipped"] >= 1 for r in hist)  # the always-skipped block, logged per step
    final = unet.state_dict()
    frozen = [k for k in start if k.startswith(always + ".")]
    assert frozen and all(torch.equal(final[k], start[k]) for k in frozen)  # skipped every step: bit-identical
    assert any(not torch.equal(final[k], start[k]) for k in start if k.startswith(random_[0] + "."))


def test_frozen_step_restores_parameters_and_state():
    """The optimizer step of a skipped block is undone bit for bit (parameters, moments, step count), also on
    the step that creates the optimizer state; a kept block takes AdamW's step."""
    from snapopt.train.options import RobustOptions
    from snapopt.train.robust import SkipGates

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attentions = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)])

    class Skipper:
        candidates = [("attentions.0", 0.5), ("attentions.1", 0.5)]

    net = Net()
    gates = SkipGates(net, Skipper())
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1)
    ref = copy.deepcopy(net)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.1)
    for skip in ([True, False], [False, True], [True, True], [False, False]):
        for m, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            for i, lin in enumerate(m.attentions):
                if m is net or not skip[i]:  # the ordinary loop: a skipped block gets no gradient
                    (lin.weight.sum() + lin.bias.sum() * 2).backward()
        with gates.frozen(opt, torch.tensor(skip)):
            opt.step()
        ref_opt.step()
        for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), (skip, k)
    for p, q in zip(net.parameters(), ref.parameters()):
        for k, v in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][k], v), k


def test_block_prune_robust_training_with_cuda_graphs(tiny, tiny_shapes, tmp_path, monkeypatch):
    """Algorithm 1 with every robust-training round on the static-buffer step (a graph per round on a GPU)."""
    from snapopt.core import PassContext, PassManager
    from snapopt.devices.registry import TARGETS
    from snapopt.train import graphs
    from snapopt.passes.block_prune import BlockPrune

    made = []
    init = graphs.GraphedStep.__init__
    monkeypatch.setattr(graphs.GraphedStep, "__init__", lambda self, *a, **k: (made.append(1), init(self, *a, **k))[1])
    ctx = PassContext(shapes=tiny_shapes, targets=[TARGETS.resolve("iphone-14-pro")], work_dir=tmp_path, teacher=tiny)
    candidates = ["down_blocks.0.attentions.0", "down_blocks.0.resnets.1", "mid_block.attentions.0", "up_blocks.3.attentions.1"]
    robust = {"train": {"steps": 3, "batch": 2, "progress": False, "cuda_graphs": True, "optim": {"lr": 1e-3}},
              "robust": {"attention": 0.5, "resnet": 0.5}, "eval_timesteps": [500]}
    opts = {"budget_fraction": 0.97, "prompts": 1, "timesteps": [500], "reevaluate_every": 1, "candidates": candidates,
            "robust_training": robust}
    _, (rec,) = PassManager([BlockPrune(opts)], ctx).run(tiny)
    rounds = rec.stats["robust_rounds"]
    assert len(rounds) > 1 and len(made) == len(rounds) and all(r["steps"] == 3 for r in rounds)
    assert sum(sum(r["skip_counts"].values()) for r in rounds) > 0  # random skips happened
    assert all(not (set(r["skip_counts"]) & set(rec.stats["removed"][:r["skipped"]])) for r in rounds)  # removed: never drawn
