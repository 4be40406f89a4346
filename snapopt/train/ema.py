"""Exponential moving average of the student's trainable weights, kept in fp32."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        # one fused call over all tensors: a per-tensor loop is hundreds of kernel launches per step
        pairs = [(self.shadow[n], p.detach()) for n, p in module.named_parameters() if n in self.shadow]
        if not pairs:
            return
        shadow, live = zip(*pairs)
        live = [t if t.dtype == torch.float32 else t.float() for t in live]
        torch._foreach_lerp_(list(shadow), live, 1 - self.decay)

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
