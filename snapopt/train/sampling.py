"""A small DDIM sampler over snapopt Pipelines (no diffusers pipeline object needed), used to make
teacher latents and by the step-distillation evaluation."""

from __future__ import annotations

import torch

from snapopt.train.diffusion import Schedule, guided


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
                   prediction_type: str | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_0 latents from ``pipe``'s UNet (or ``unet``) by deterministic DDIM with classifier-free guidance,
    on diffusers' ``steps``-step grid or on explicit ``transitions`` (t, t_prev). ``batch`` prompts per UNet
    call (x2 for guidance): a small model is launch-bound, so 16 at a time left the GPU mostly idle; the
    noise is drawn for all prompts up front, so the batch size does not change which sample a prompt gets.
    ``prediction_type``: what ``unet`` outputs, when it is not ``pipe``'s own (a v-prediction student sampled
    with its epsilon teacher's text encoder and scheduler). ``noise``: x_T itself (else drawn from ``seed``)."""
    unet = unet or pipe.unet
    sched = Schedule(pipe.scheduler, prediction_type or pipe.prediction_type)
    offset = int(pipe.scheduler.config.get("steps_offset", 1))
    transitions = transitions or ddim_transitions(steps, sched.num_train, offset)
    x = (noise if noise is not None else torch.randn(len(cond), *shape, generator=torch.Generator().manual_seed(seed))).to(device)
    dtype = next(unet.parameters()).dtype
    out = []
    for i in range(0, len(cond), batch):
        xi, c = x[i:i + batch], cond[i:i + batch]
        u = uncond.expand_as(c)
        for t, t_prev in transitions:
            tt = torch.full((len(xi),), t, dtype=torch.long)
            inp = torch.cat([xi, xi]).to(dtype)
            pred = unet(inp, torch.cat([tt, tt]).to(device), torch.cat([u, c]).to(dtype), return_dict=False)[0].float()
            pu, pc = pred.chunk(2)
            xi = sched.ddim_step(guided(pu, pc, cfg), xi, tt, torch.full_like(tt, t_prev))
        out.append(xi)
    return torch.cat(out)
