"""The graphed DDIM sampler (``sample_latents(graphs=True)``) against the eager loop: its static-buffer step is the
one a GPU records as a CUDA graph; on the CPU it runs uncaptured and must give the eager loop's latents bit for bit."""

from __future__ import annotations

import pytest
import torch

from snapopt.train.sampling import halved_transitions, sample_latents


def _inputs(pipe, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ctx = pipe.unet.config.cross_attention_dim
    cond, uncond = torch.randn(n, 77, ctx, generator=gen), torch.randn(77, ctx, generator=gen)
    shape = (pipe.unet.config.in_channels, pipe.latent_size, pipe.latent_size)
    return cond, uncond, shape


@pytest.mark.parametrize("transitions", [None, "halved"])
def test_static_buffer_step_gives_the_eager_latents_bit_for_bit(tiny_pipe, transitions):
    cond, uncond, shape = _inputs(tiny_pipe, 5)
    path = halved_transitions(2) if transitions == "halved" else None
    # batch 2 over 5 prompts: two full batches and a last one of 1, each batch size its own static step
    kw = dict(steps=3, cfg=6.0, shape=shape, seed=3, device=torch.device("cpu"), batch=2, transitions=path)
    eager = sample_latents(tiny_pipe, cond, uncond, graphs=False, **kw)
    static = sample_latents(tiny_pipe, cond, uncond, graphs=True, **kw)
    assert static.shape == (5, *shape)
    assert torch.equal(eager, static)
    assert not torch.equal(eager, sample_latents(tiny_pipe, cond, uncond, graphs=True, **{**kw, "cfg": 1.0}))  # guidance is used


def test_graphs_default_off_on_the_cpu(tiny_pipe, monkeypatch):
    from snapopt.train import sampling

    made = []
    real = sampling.StaticReplay
    monkeypatch.setattr(sampling, "StaticReplay", lambda *a, **k: made.append(1) or real(*a, **k))
    cond, uncond, shape = _inputs(tiny_pipe, 2)
    sample_latents(tiny_pipe, cond, uncond, steps=2, cfg=5.0, shape=shape, seed=0, device=torch.device("cpu"))
    assert made == []
    sample_latents(tiny_pipe, cond, uncond, steps=2, cfg=5.0, shape=shape, seed=0, device=torch.device("cpu"), graphs=True)
    assert made == [1]


def test_trajectory_pool_static_walk_gives_the_eager_states_bit_for_bit(tiny_pipe):
    """The trajectory pool's graphed walk (static buffers, device-side alpha_bar on a GPU), run uncaptured on the CPU:
    the same states as the eager walk, guided (per-trajectory scales) and plain, over a short last chunk."""
    from snapopt.train.options import StepDistillLoss, TrainOptions
    from snapopt.train.step_distill import StepDistillObjective
    from snapopt.train.trajectories import TrajectoryPool

    train = TrainOptions(steps=2, batch=2, progress=False, data=dict(source="random"))
    obj = StepDistillObjective(tiny_pipe, tiny_pipe.clone(["unet"]).unet, train,
                               StepDistillLoss(teacher_steps=8, trajectory_pool=5), device=torch.device("cpu"))
    for guided in (True, False):
        eager = TrajectoryPool(obj, 5, guided=guided, seed=11, batch=2, graphs=False)
        static = TrajectoryPool(obj, 5, guided=guided, seed=11, batch=2, graphs=True)
        assert static.states.shape == eager.states.shape == (5, len(obj.transitions) + 1, *obj.data.shape)
        assert torch.equal(static.states, eager.states) and torch.equal(static.prompt, eager.prompt)
        assert not torch.equal(static.states[:, 0], static.states[:, -1])  # it walked
