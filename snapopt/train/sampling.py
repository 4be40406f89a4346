"""A small DDIM sampler over snapopt Pipelines (no diffusers pipeline object needed), used to make
teacher latents and by the step-distillation evaluation."""

from __future__ import annotations

import torch

from snapopt.train.diffusion import Schedule, guided
from snapopt.train.graphs import DeviceSchedule
from snapopt.train.replay import StaticReplay


def ddim_timesteps(steps: int, num_train: int = 1000, offset: int = 1) -> list[int]:
    """diffusers' DDIM grid ('leading' spacing, steps_offset 1): t_k = k * (num_train // steps) + offset, descending."""
    ratio = num_train // steps
    return [k * ratio + offset for k in reversed(range(steps))]


def ddim_transitions(steps: int, num_train: int = 1000, offset: int = 1) -> list[tuple[int, int]]:
    """(t, t_prev) of each step on diffusers' DDIM grid (t_prev < 0: the final step)."""
    ratio = num_train // steps
    return [(t, t - ratio) for t in ddim_timesteps(steps, num_train, offset)]


def halved_transitions(steps: int, num_train: int = 1000, offset: int = 1) -> list[tuple[int, int]]:
    """Each step of the ``steps``-step DDIM grid split in two (t -> t - r//2 -> t - r): the 2x-step path
    that step distillation trains the ``steps``-step student to reproduce. It is *not* diffusers' own
    2x-step grid (stride 1000 // (2 steps) starts elsewhere: 931 for 16 steps, 876 for the halved 8-step grid)."""
    r = num_train // steps
    out = []
    for t in ddim_timesteps(steps, num_train, offset):
        mid = t - r // 2
        # below t = 0 both halves end at the final alpha: the second would be an identity step
        out += [(t, mid), (mid, t - r)] if mid >= 0 else [(t, t - r)]
    return out


def split_point(t, t_prev, i: int, parts: int):
    """The i-th of ``parts`` points from t to t_prev, t - ((t - t_prev) * i) // parts: ints or per-sample tensors (the
    one rule the teacher's split path and step distillation's teacher walk share)."""
    return t - ((t - t_prev) * i) // parts


def split_transitions(transitions: list[tuple[int, int]], parts: int = 2) -> list[tuple[int, int]]:
    """Every step (t, t_prev) split into ``parts`` at t - ((t - t_prev) * i) // parts: the path step distillation's
    teacher walks for a student on ``transitions`` (two teacher steps per student step, or more for a student
    distilled directly from a finer solve). A split point below 0 would start an identity step (both ends at the
    final alpha), so the step goes from the last point at or above 0 straight to t_prev."""
    out = []
    for t, t_prev in transitions:
        points = [t] + [p for p in (split_point(t, t_prev, i, parts) for i in range(1, parts)) if p >= 0] + [t_prev]
        out += list(zip(points[:-1], points[1:]))
    return out


def student_transitions(student_steps: int, grid: str = "ddim", num_train: int = 1000, offset: int = 1) -> list[tuple[int, int]]:
    """The (t, t_prev) a ``student_steps``-step student is trained and sampled on: diffusers' DDIM grid
    (``ddim``) or the ``student_steps // 2``-step grid with every step split in two (``halved``: the path a
    later distillation to ``student_steps // 2`` walks this model on, so it is trained where it is used)."""
    if grid == "ddim":
        return ddim_transitions(student_steps, num_train, offset)
    if grid == "halved":
        return halved_transitions(student_steps // 2, num_train, offset)
    raise ValueError(f"unknown grid '{grid}'; expected ddim or halved")


@torch.no_grad()
def sample_latents(pipe, cond: torch.Tensor, uncond: torch.Tensor, *, steps: int, cfg: float, shape, seed: int,
                   device, unet=None, batch: int = 128, transitions: list[tuple[int, int]] | None = None,
                   prediction_type: str | None = None, noise: torch.Tensor | None = None,
                   graphs: bool | None = None) -> torch.Tensor:
    """x_0 latents from ``pipe``'s UNet (or ``unet``) by deterministic DDIM with classifier-free guidance,
    on diffusers' ``steps``-step grid or on explicit ``transitions`` (t, t_prev). ``batch`` prompts per UNet
    call (x2 for guidance): a small model is launch-bound, so 16 at a time left the GPU mostly idle; the
    noise is drawn for all prompts up front, so the batch size does not change which sample a prompt gets.
    ``prediction_type``: what ``unet`` outputs, when it is not ``pipe``'s own (a v-prediction student sampled
    with its epsilon teacher's text encoder and scheduler). ``noise``: x_T itself (else drawn from ``seed``).
    ``graphs`` (default: on a GPU): each guided DDIM step is recorded once per batch size as a CUDA graph and
    replayed (:class:`snapopt.train.replay.StaticReplay`): the same kernels on the same values, the same latents."""
    unet = unet or pipe.unet
    sched = Schedule(pipe.scheduler, prediction_type or pipe.prediction_type)
    offset = int(pipe.scheduler.config.get("steps_offset", 1))
    transitions = transitions or ddim_transitions(steps, sched.num_train, offset)
    x = (noise if noise is not None else torch.randn(len(cond), *shape, generator=torch.Generator().manual_seed(seed))).to(device)
    dtype = next(unet.parameters()).dtype
    if graphs is None:
        graphs = x.device.type == "cuda"
    step_of = _guided_ddim_step(unet, sched, cfg, dtype)
    replays: dict[int, StaticReplay] = {}  # one graph per batch size (the last batch may be shorter)
    out = []
    for i in range(0, len(cond), batch):
        xi, c = x[i:i + batch], cond[i:i + batch]
        u = uncond.expand_as(c)
        if graphs:
            context = torch.cat([u, c]).to(dtype)
            n = len(xi)
            step = replays.get(n)
            if step is None:
                dev_sched = DeviceSchedule(sched, x.device)  # on the CPU too: the tests then run what a GPU captures
                t0 = torch.full((n,), transitions[0][0], dtype=torch.long, device=x.device)
                step = replays[n] = StaticReplay(_guided_ddim_step(unet, dev_sched, cfg, dtype),
                                                 {"x": xi, "t": t0, "t_prev": t0, "context": context}, state="x")
            step.load(x=xi, context=context)
            for t, t_prev in transitions:
                step(t=t, t_prev=t_prev)
            out.append(step.buffers["x"].clone())
            continue
        for t, t_prev in transitions:
            tt = torch.full((len(xi),), t, dtype=torch.long)
            xi = step_of(xi, tt, torch.full_like(tt, t_prev), torch.cat([u, c]).to(dtype))
        out.append(xi)
    return torch.cat(out)


def _guided_ddim_step(unet, sched: Schedule, cfg: float, dtype: torch.dtype):
    """One guided DDIM step x_t -> x_{t_prev} (uncond and cond predictions in one UNet call). The eager loop
    passes host timesteps (alpha_bar from the host table); the graphed one device timesteps and a
    :class:`snapopt.train.graphs.DeviceSchedule` (the same float64 table on the device): the same arithmetic."""

    def step(x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t2 = torch.cat([t, t]).to(x.device)
        pred = unet(torch.cat([x, x]).to(dtype), t2, context, return_dict=False)[0].float()
        pu, pc = pred.chunk(2)
        return sched.ddim_step(guided(pu, pc, cfg), x, t, t_prev)

    return step
