"""cuda_graphs (snapopt.train.graphs): the static-buffer step trains what the ordinary loop trains, and what
a captured step cannot hold is refused in one line.

On CPU the graphed step runs from its static buffers without capture. That is the code the GPU captures,
so these tests compare it with the ordinary loop over a few steps. Both paths run the same fp32 kernels on
the same samples, so losses and weights agree to rounding. The EMA is the one intended difference: a
device-tensor weight goes through sub/mul/add instead of one lerp, 1 ulp per step. A wrong sample, a lost
loss term or a stale LR or EMA weight would differ by orders of magnitude more than the tolerances.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import BK_SMALL
from snapopt.errors import UsageError

CPU = torch.device("cpu")
TOL = dict(rtol=1e-5, atol=1e-7)


def _pruned_unet(pipe):
    from snapopt.passes.remove_blocks import RemoveBlocks

    student = pipe.clone(["unet"])
    RemoveBlocks({"component": "unet", "blocks": BK_SMALL}).run(student, None)
    return student.unet


def _opts(**kw):
    from snapopt.train import TrainOptions

    base = dict(steps=4, batch=2, progress=False, ema=0.9, optim=dict(lr=1e-3, schedule="cosine", warmup_steps=1, grad_clip=0.05))
    return TrainOptions(**{**base, **kw})


def _both(make, module, o):
    """Train a copy of ``module`` with the ordinary loop and one with cuda_graphs, from the same weights."""
    from snapopt.train import Trainer

    start = copy.deepcopy(module.state_dict())
    out = []
    for graphed in (False, True):
        module.load_state_dict(start)
        obj = make(o.model_copy(update={"cuda_graphs": graphed}))
        res = Trainer(obj, obj.train_o, None, device=CPU).run()
        if hasattr(obj, "close"):
            obj.close()
        out.append((res, {k: v.clone() for k, v in module.state_dict().items()}))
    (plain, w_plain), (graphed, w_graphed) = out
    assert "cuda_graphs" in graphed.extra and "without capture" in graphed.extra["notes"][0]
    assert [r.keys() for r in plain.history] == [r.keys() for r in graphed.history]
    for a, b in zip(plain.history, graphed.history):
        assert a["lr"] == b["lr"]
        for k in a:
            if k not in ("step", "lr", "seconds"):
                torch.testing.assert_close(torch.tensor(b[k]), torch.tensor(a[k]), **TOL, msg=f"{k} at step {a['step']}")
    moved = max(float((w_plain[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-4  # the comparison below is not of untouched weights
    for k in start:
        torch.testing.assert_close(w_graphed[k], w_plain[k], **TOL, msg=k)
    return plain.history


def test_recover_static_step_equals_ordinary_loop(tiny_pipe):
    """Task + output KD + stage-feature KD with timestep scaling, cosine LR with warm-up, clipping, EMA."""
    from snapopt.train import RecoverLoss
    from snapopt.train.recover import RecoverObjective

    unet = _pruned_unet(tiny_pipe)
    hist = _both(lambda o: RecoverObjective(tiny_pipe, unet, o, RecoverLoss(timestep_scaling=True), device=CPU), unet, _opts())
    assert min(r["feature_kd"] for r in hist) > 0


def test_recover_guidance_kd_static_step_equals_ordinary_loop(tiny_pipe):
    """The guidance KD's extra empty-prompt rows (one forward of batch + rows) in the static-buffer step."""
    from snapopt.train import RecoverLoss
    from snapopt.train.recover import RecoverObjective

    unet = _pruned_unet(tiny_pipe)
    loss = RecoverLoss(timestep_scaling=True, guidance_kd=1.0, guidance_fraction=0.5)
    hist = _both(lambda o: RecoverObjective(tiny_pipe, unet, o, loss, device=CPU), unet, _opts())
    assert min(r["guidance_kd"] for r in hist) > 0


def test_step_distill_static_step_equals_ordinary_loop(tiny_pipe):
    """Guided and plain steps (one static-buffer set, on the GPU one graph, each), CFG normalisation, the
    mixed-in denoising loss, a v-prediction student on the halved grid."""
    from snapopt.train.options import StepDistillLoss
    from snapopt.train.step_distill import StepDistillObjective

    unet = tiny_pipe.clone(["unet"]).unet
    loss = StepDistillLoss(teacher_steps=8, grid="halved", cfg_probability=0.5, cfg_normalise=True, original_weight=0.1)
    hist = _both(lambda o: StepDistillObjective(tiny_pipe, unet, o, loss, device=CPU, student_prediction="v_prediction"),
                 unet, _opts(steps=5, seed=1))
    assert {r["cfg"] for r in hist} == {0.0, 1.0}


def test_reparametrise_static_step_equals_ordinary_loop(tiny_pipe):
    from snapopt.train.step_distill import ReparamObjective

    unet = tiny_pipe.clone(["unet"]).unet
    ref = copy.deepcopy(unet).eval()
    _both(lambda o: ReparamObjective(tiny_pipe, unet, o, source_prediction="epsilon", target_prediction="v_prediction",
                                     device=CPU, reference_unet=ref), unet, _opts(steps=3))


def test_decoder_static_step_equals_ordinary_loop(tiny_pipe):
    from snapopt.train.decoder import DecoderObjective
    from snapopt.train.options import DecoderLoss

    dec = tiny_pipe.clone(["vae_decoder"]).component("vae_decoder")
    _both(lambda o: DecoderObjective(tiny_pipe, dec, o, DecoderLoss(multiscale=1.0, edges=0.5, val_latents=2), device=CPU), dec, _opts(steps=3))


class _Custom:
    name = "custom"
    skips_blocks = False

    def __init__(self):
        self.net = torch.nn.Linear(2, 1)
        self.forward_model = self.net

    def trainable(self):
        return self.net

    def loss(self, step, info):
        return self.net(torch.ones(1, 2)).sum(), {}


@pytest.mark.parametrize("case, match", [
    ("ddp", r"^recover: cuda_graphs is single-process only"),
    ("checkpointing", r"^recover: cuda_graphs and gradient_checkpointing cannot be combined"),
    ("compile", r"^recover: cuda_graphs and compile cannot be combined"),
    ("custom", r"^custom: cuda_graphs supports the recover \(robust training included\), decoder_distill, step_distill and "
               r"reparametrise objectives only"),
    ("custom_skipping", r"^custom: cuda_graphs cannot capture random block skipping in this objective"),
])
def test_refusals(tiny_pipe, case, match):
    """What a captured step cannot hold fails before training starts, in one line, on CPU as on the GPU."""
    from snapopt.train import RecoverLoss, Trainer
    from snapopt.train.dist import DistInfo
    from snapopt.train.recover import RecoverObjective

    unet = tiny_pipe.clone(["unet"]).unet
    before = copy.deepcopy(unet.state_dict())
    extra = {"checkpointing": {"gradient_checkpointing": True}, "compile": {"compile": {"backend": "eager"}}}.get(case, {})
    o = _opts(cuda_graphs=True, **extra)
    obj = _Custom() if case.startswith("custom") else RecoverObjective(tiny_pipe, unet, o, RecoverLoss(), device=CPU)
    if case == "custom_skipping":
        obj.skips_blocks = True
    info = DistInfo(rank=0, world=2) if case == "ddp" else DistInfo()
    with pytest.raises(UsageError, match=match) as err:
        Trainer(obj, o, None, info=info, device=CPU).run()
    assert "\n" not in str(err.value)
    if not case.startswith("custom"):
        obj.close()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # nothing was trained


def test_graphed_run_resumes_exactly(tmp_path, tiny_pipe):
    """Kill after 2 of 4 graphed steps, resume graphed: the weights of 4 straight graphed steps."""
    from snapopt.train import RecoverLoss, Trainer
    from snapopt.train.recover import RecoverObjective

    unet = _pruned_unet(tiny_pipe)
    start = copy.deepcopy(unet.state_dict())
    o = _opts(cuda_graphs=True, checkpoint_every=2)
    obj = RecoverObjective(tiny_pipe, unet, o, RecoverLoss(), device=CPU)
    Trainer(obj, o, tmp_path / "a", device=CPU).run()
    straight = copy.deepcopy(unet.state_dict())
    unet.load_state_dict(start)
    Trainer(obj, o, tmp_path / "b", device=CPU).run(until=2)
    res = Trainer(obj, o, tmp_path / "b", device=CPU).run(resume=True)
    obj.close()
    assert res.resumed_from == 2
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v, straight[k], rtol=0, atol=0, msg=k)


def test_tensor_lr_checkpoints_as_float_and_loads_back():
    """A capturable optimizer's LR is a device tensor that captured graphs read: a checkpoint keeps it as a
    float (param_groups are JSON) and a resume refills the same tensor instead of replacing it."""
    import json

    from snapopt.train.accel import load_optimizer_state, optimizer_state

    p = torch.nn.Parameter(torch.ones(3))
    lr = torch.tensor(0.25)
    opt = torch.optim.AdamW([p], lr=lr, foreach=False)
    p.grad = torch.ones(3)
    opt.step()
    sd = optimizer_state(opt)
    json.dumps(sd["param_groups"])
    assert sd["param_groups"][0]["lr"] == 0.25 and opt.param_groups[0]["lr"] is lr
    lr2 = torch.tensor(1.0)
    opt2 = torch.optim.AdamW([p], lr=lr2, foreach=False)
    load_optimizer_state(opt2, copy.deepcopy(sd))
    assert opt2.param_groups[0]["lr"] is lr2 and float(lr2) == 0.25
    torch.testing.assert_close(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_tensor_weight_ema_matches_scalar_lerp():
    from snapopt.train.ema import EMA

    m = torch.nn.Linear(4, 3)
    a, b = EMA(m, 0.99), EMA(m, 0.99)
    w = torch.zeros(())
    for step in range(12):  # spans both of lerp's branches (weight above and below 0.5)
        with torch.no_grad():
            for q in m.parameters():
                q.add_(torch.randn_like(q))
        a.update(m, step)
        w.fill_(1 - b.decay_at(step))
        b.lerp_(m, w)
    for k in a.shadow:
        torch.testing.assert_close(b.shadow[k], a.shadow[k], rtol=1e-6, atol=1e-6)
