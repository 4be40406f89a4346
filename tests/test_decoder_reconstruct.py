"""Least-squares reconstruction after channel pruning (snapopt.train.reconstruct, channel_prune's ``reconstruct``)
and the decoder distillation's cached teacher images: exact recovery where the pruned layer can represent the
teacher, improvement on a pruned tiny decoder, one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from snapopt.core import PassContext
from snapopt.errors import UsageError
from snapopt.passes.channel_prune import ChannelPrune
from snapopt.train.reconstruct import reconstruct


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _duplicate_half(layer: nn.Module) -> None:
    """Make the second half of ``layer``'s outputs repeat the first: dropping them loses no information, but the
    next layer's weights on them must be folded onto the kept ones."""
    half = layer.weight.shape[0] // 2
    with torch.no_grad():
        layer.weight[half:] = layer.weight[:half]
        layer.bias[half:] = layer.bias[:half]


def _duplicated_teacher() -> nn.Sequential:
    """conv -> SiLU -> conv -> SiLU -> 1x1 conv, the first conv's channels 4-7 repeating channels 0-3."""
    torch.manual_seed(0)
    t = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.SiLU(),
                      nn.Conv2d(6, 2, 1, bias=False))
    _duplicate_half(t[0])
    return t.double()


def _slice_student(t: nn.Sequential) -> nn.Sequential:
    """``t`` with layer 0's first half of outputs kept and layer 2's matching inputs (conv or linear)."""
    s = copy.deepcopy(t)
    keep = t[0].weight.shape[0] // 2
    with torch.no_grad():
        s[0].weight = nn.Parameter(t[0].weight[:keep].clone())
        s[0].bias = nn.Parameter(t[0].bias[:keep].clone())
        s[2].weight = nn.Parameter(t[2].weight[:, :keep].clone())
    if isinstance(s[0], nn.Linear):
        s[0].out_features = s[2].in_features = keep
    else:
        s[0].out_channels = s[2].in_channels = keep
    return s


def test_exactly_representable_conv_case_recovers_the_teacher():
    teacher = _duplicated_teacher()
    student = _slice_student(teacher)
    x = torch.randn(3, 3, 8, 8, dtype=torch.double)
    with torch.no_grad():
        ref = teacher(x)
        assert _rel(student(x), ref) > 0.1  # plain slicing drops half of the second conv's input
    stats = reconstruct(student, teacher, x, {"0": torch.arange(4)}, ridge=0.0)
    assert list(stats) == ["2"]  # only the layer whose input was pruned is refitted by default
    assert stats["2"]["rel_err_after"] < 1e-6 < stats["2"]["rel_err_before"]
    with torch.no_grad():
        assert _rel(student(x), ref) < 1e-5


def test_linear_layers_and_subsampled_positions():
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 3)).double()
    _duplicate_half(teacher[0])
    student = _slice_student(teacher)
    x = torch.randn(2, 20, 5, dtype=torch.double)  # (N, tokens, features), as attention's projections see them
    reconstruct(student, teacher, x, {"0": torch.arange(3)}, positions=8, ridge=0.0)  # 16 rows for 4 unknowns
    with torch.no_grad():
        assert _rel(student(x), teacher(x)) < 1e-5


def test_bad_options_fail_in_one_line():
    teacher = _duplicated_teacher()
    student = _slice_student(teacher)
    x = torch.randn(1, 3, 8, 8, dtype=torch.double)
    cases = [(dict(positions=0), "positions must be at least 1"), (dict(ridge=-1.0), "ridge must be >= 0"),
             (dict(layers=["9"]), "layer '9' is not in both"), (dict(layers=["1"]), "layer '1' (SiLU) is not a dense Conv2d or Linear")]
    for kwargs, msg in cases:
        with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
            reconstruct(student, teacher, x, {"0": torch.arange(4)}, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="rows for '2' exceed the teacher layer's 6 outputs"):
        reconstruct(student, teacher, x, {"2": torch.tensor([0, 6])})
    with pytest.raises(UsageError, match="needs at least one input"):
        reconstruct(student, teacher, x[:0])


# ---- the channel_prune option, on the tiny pipeline's decoder ---------------------------------------------
def test_channel_prune_reconstruct_raises_decoder_psnr(tiny):
    opts = {"component": "vae_decoder", "ratio": 0.5, "groups": "whole",
            "reconstruct": {"latents": 8, "source": "random", "positions": 256}}
    res = ChannelPrune(opts).run(tiny, PassContext())
    rec = res.stats["reconstruct"]
    assert rec["layers"] > 5 and rec["latents"] == 8
    assert rec["psnr_after_db"] > rec["psnr_before_db"] + 1  # random-init tiny weights: 15.0 -> 17.0 dB
    assert res.replay_options["reconstruct"] is None  # the replay rebuilds structure only
    assert res.replay_options["keep"]


def test_channel_prune_reconstruct_bad_options(tiny):
    with pytest.raises(UsageError, match="^channel_prune: reconstruct applies to component 'vae_decoder' only"):
        ChannelPrune({"reconstruct": {"latents": 4}}).run(tiny, PassContext())
    with pytest.raises(Exception, match="greater than or equal to 1"):
        ChannelPrune({"component": "vae_decoder", "reconstruct": {"latents": 0}})
    with pytest.raises(Exception, match="Extra inputs are not permitted"):
        ChannelPrune({"component": "vae_decoder", "reconstruct": {"latent": 4}})


# ---- decoder distillation: the teacher decodes each pool latent once ----------------------------------------
def test_decoder_objective_caches_teacher_images(tiny_pipe):
    from snapopt.train.decoder import DecoderObjective
    from snapopt.train.dist import DistInfo
    from snapopt.train.options import DecoderLoss, TrainOptions

    student = tiny_pipe.clone(["vae_decoder"]).component("vae_decoder")
    train = TrainOptions(steps=4, batch=3, data={"source": "teacher", "pool": 4, "teacher_steps": 2})
    obj = DecoderObjective(tiny_pipe, student, train, DecoderLoss(val_latents=2), device=torch.device("cpu"))
    assert sorted(obj._cache) == [0, 1, 2, 3]  # the whole (small) pool decoded up front, in fixed-size batches
    # PSNR's latents are held out: a second pool of the same kind (seed + 1), none of them a training row
    pool_z = obj.data.pool_x0 / obj.scale
    assert obj.val_z.shape == (2, *pool_z.shape[1:])
    assert all(not torch.allclose(v, p) for v in obj.val_z for p in pool_z)
    calls = []
    real = obj.teacher_decoder
    obj.teacher_decoder = lambda z: calls.append(len(z)) or real(z)
    for step in range(6):
        b = obj.data.batch(step, 3)
        z = b.x0 / obj.scale
        with torch.no_grad():
            torch.testing.assert_close(obj.targets(b.x0, z), real(z).float(), rtol=1e-4, atol=1e-5)  # batch-size-dependent float order
            assert torch.equal(obj.data.pool_x0[b.pool_index], b.x0)  # the batch names its pool rows
            assert torch.equal(obj.targets(b.x0, z, b.pool_index), obj.targets(b.x0, z))  # by rows = by lookup, same cache
    assert sum(calls) == 0  # none decoded again while training
    loss, _ = obj.loss(0, DistInfo())
    assert torch.isfinite(loss)


def test_teacher_pool_draws_the_models_own_captions(tiny_pipe):
    """Decoder data distillation learns from what the pipeline decodes at deployment: a teacher-sampled pool of a
    zoo:snapshapes descendant is drawn for its training captions (prompt_set: auto), not for VALIDATION_PROMPTS,
    half of which are scenes it never learnt. An unknown model, or prompt_set: validation, keeps those."""
    from snapopt.quality import VALIDATION_PROMPTS
    from snapopt.train.data import LatentSource
    from snapopt.train.options import DataOptions
    from snapopt.zoo import shapes

    cpu = torch.device("cpu")
    zoo_like = tiny_pipe.clone([])
    zoo_like.extra["origin"] = "zoo:snapshapes"
    opts = {"source": "teacher", "pool": 6, "teacher_steps": 1}
    src = LatentSource(zoo_like, DataOptions(**opts), seed=3, device=cpu)
    assert src.prompts == shapes.sample_scenes(6, 3, split="train").captions()
    assert src.pool_prompt.tolist() == list(range(6)) and src.pool_x0.shape[0] == 6  # one latent per caption
    assert LatentSource(zoo_like, DataOptions(**opts, prompt_set="validation"), seed=3, device=cpu).prompts == list(VALIDATION_PROMPTS)
    assert LatentSource(tiny_pipe, DataOptions(**opts), seed=3, device=cpu).prompts == list(VALIDATION_PROMPTS)
    with pytest.raises(ValueError, match="prompt_set"):
        DataOptions(prompt_set="zoo")


def test_student_pool_is_sampled_by_the_models_own_unet(tiny_pipe):
    """data.source 'student': the decoder learns latents the model being optimised samples (its UNet, its scheduler,
    data.teacher_steps and teacher_cfg), not the teacher's; other stages, which have no such model, are refused."""
    from snapopt.train.data import LatentSource
    from snapopt.train.decoder import DecoderObjective
    from snapopt.train.jobs import RecoverJob, StepDistillJob
    from snapopt.train.options import DataOptions, DecoderLoss, TrainOptions
    from snapopt.train.sampling import sample_latents

    cpu = torch.device("cpu")
    program = tiny_pipe.clone(["unet", "vae_decoder"])
    with torch.no_grad():
        for p in program.unet.parameters():
            p.mul_(0.9)
    data = {"source": "student", "pool": 4, "teacher_steps": 2, "teacher_cfg": 3.0}
    obj = DecoderObjective(tiny_pipe, program.component("vae_decoder"), TrainOptions(steps=1, batch=2, data=data), DecoderLoss(val_latents=2),
                           device=cpu, sampler=program)
    src = obj.data
    own = sample_latents(program, src.cond_bank[src.pool_prompt], src.uncond, steps=2, cfg=3.0, shape=src.shape, seed=0, device=cpu)
    teachers = sample_latents(tiny_pipe, src.cond_bank[src.pool_prompt], src.uncond, steps=2, cfg=3.0, shape=src.shape, seed=0, device=cpu)
    torch.testing.assert_close(src.pool_x0, own)
    assert not torch.allclose(src.pool_x0, teachers)
    with pytest.raises(UsageError, match="data.source 'student'"):
        LatentSource(tiny_pipe, DataOptions(**data), seed=0, device=cpu)
    with pytest.raises(ValueError, match="data.source 'student' is for decoder_distill"):  # refused before any pass runs
        RecoverJob(train={"steps": 1, "batch": 2, "data": data})
    with pytest.raises(ValueError, match="data.source 'student' is for decoder_distill"):
        StepDistillJob(reparametrise={"steps": 1, "data": data})


def test_edge_loss_weighs_outlines_not_offsets():
    """loss.edges: MSE of horizontal and vertical pixel differences. A uniform offset has the same edges (zero edge
    term, full MSE); a blurred square loses its outline (edge term > 0); the value is the plain definition."""
    from snapopt.train.decoder import reconstruction_loss
    from snapopt.train.options import DecoderLoss

    ref = torch.zeros(1, 3, 16, 16)
    ref[..., 4:12, 4:12] = 1.0
    lo = DecoderLoss(mse=0.0, edges=1.0)
    total, parts = reconstruction_loss(lo, ref + 0.3, ref)
    assert float(total) == pytest.approx(0.0, abs=1e-7) and float(parts["edges"]) == pytest.approx(0.0, abs=1e-7)
    blurred = torch.nn.functional.avg_pool2d(ref, 3, stride=1, padding=1)
    total, parts = reconstruction_loss(lo, blurred, ref)
    dx = lambda a: a[..., 1:] - a[..., :-1]  # noqa: E731
    dy = lambda a: a[..., 1:, :] - a[..., :-1, :]  # noqa: E731
    want = ((dx(blurred) - dx(ref)).pow(2).mean() + (dy(blurred) - dy(ref)).pow(2).mean()) / 2
    assert float(total) == pytest.approx(float(want)) and float(want) > 0.01
    assert "edges" not in reconstruction_loss(DecoderLoss(), blurred, ref)[1]  # off by default
