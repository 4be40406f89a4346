"""A small DDIM sampler over snapopt Pipelines (no diffusers pipeline object needed), used to make
teacher latents and by the step-distillation evaluation."""

from __future__ import annotations

import torch

from snapopt.train.diffusion import Schedule, guided


def ddim_timesteps(steps: int, num_train: int = 1000, offset: int = 1) -> list[int]:
    """diffusers' DDIM grid ('leading' spacing, steps_offset 1): t_k = k * (num_train // steps) + offset, descending."""
    ratio = num_train // steps
    return [k * ratio + offset for k in reversed(range(steps))]


@torch.no_grad()
def sample_latents(pipe, cond: torch.Tensor, uncond: torch.Tensor, *, steps: int, cfg: float, shape, seed: int,
                   device, unet=None, batch: int = 16) -> torch.Tensor:
    """x_0 latents from ``pipe``'s UNet (or ``unet``) by deterministic DDIM with classifier-free guidance."""
    unet = unet or pipe.unet
    sched = Schedule(pipe.scheduler, pipe.prediction_type)
    offset = int(pipe.scheduler.config.get("steps_offset", 1))
    ts = ddim_timesteps(steps, sched.num_train, offset)
    ratio = sched.num_train // steps
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(cond), *shape, generator=gen).to(device)
    dtype = next(unet.parameters()).dtype
    out = []
    for i in range(0, len(cond), batch):
        xi, c = x[i:i + batch], cond[i:i + batch]
        u = uncond.expand_as(c)
        for t in ts:
            tt = torch.full((len(xi),), t, dtype=torch.long)
            inp = torch.cat([xi, xi]).to(dtype)
            pred = unet(inp, torch.cat([tt, tt]).to(device), torch.cat([u, c]).to(dtype), return_dict=False)[0].float()
            pu, pc = pred.chunk(2)
            xi = sched.ddim_step(guided(pu, pc, cfg), xi, tt, tt - ratio)
        out.append(xi)
    return torch.cat(out)
