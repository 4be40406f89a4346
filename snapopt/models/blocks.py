"""Modules that stand in for blocks a pass removed."""

from __future__ import annotations

from torch import nn


class SkippedBlock(nn.Module):
    """A removed block: passes its input through, holds no parameters.

    Used where a block cannot leave its container without breaking the container's wiring (an attention
    paired with a surviving ResNet in a diffusers down block). ``kind`` and ``replaced`` record what it was,
    so the IR, reports and the architecture file can say so."""

    def __init__(self, kind: str, replaced: str = ""):
        super().__init__()
        self.kind = kind
        self.replaced = replaced

    def forward(self, hidden_states, *args, **kwargs):
        if self.kind == "attention" and kwargs.get("return_dict", True) is False:
            return (hidden_states,)
        if self.kind == "attention" and "return_dict" in kwargs:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=hidden_states)
        return hidden_states

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, replaced={self.replaced!r}"
