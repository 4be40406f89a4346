"""Exponential moving average of the student's trainable weights, kept in fp32.

The decay warms up as ``min(decay, (1 + step) / (10 + step))`` (as diffusers' EMAModel does): with a fixed
0.999 a 1600-step run would still carry 20% of the untrained start in its average.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    def update(self, module: nn.Module, step: int) -> None:
        self.lerp_(module, 1 - self.decay_at(step))

    @torch.no_grad()
    def lerp_(self, module: nn.Module, weight: float | torch.Tensor) -> None:
        """shadow += weight * (live - shadow). ``weight`` may be a 0-d device tensor the host refills each
        step: a captured CUDA graph (snapopt.train.graphs) cannot take a new Python number per replay."""
        # fused calls over all tensors: a per-tensor loop is hundreds of kernel launches per step
        pairs = [(self.shadow[n], p.detach()) for n, p in module.named_parameters() if n in self.shadow]
        if not pairs:
            return
        shadow, live = zip(*pairs)
        shadow, live = list(shadow), [t if t.dtype == torch.float32 else t.float() for t in live]
        if torch.is_tensor(weight):  # foreach lerp takes a Python scalar or per-tensor weights, not one tensor
            diff = torch._foreach_sub(live, shadow)
            torch._foreach_mul_(diff, weight)
            torch._foreach_add_(shadow, diff)
        else:
            torch._foreach_lerp_(shadow, live, weight)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n in self.shadow:
            self.shadow[n].copy_(state[n])
