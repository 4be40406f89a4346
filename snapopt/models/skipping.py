"""Switch UNet blocks to identity at run time, without restructuring the model.

Used to score blocks (``block_prune``: how much does quality drop when this block is skipped?) and for robust
training (SnapFusion: randomly skip blocks during training so that removing them later hurts less). The
state dict is untouched: blocks are swapped for parameter-free stand-ins inside the context and put back
on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import nn

from snapopt.errors import UsageError
from snapopt.models.blocks import SkippedBlock

_KINDS = {"ResnetBlock2D": "resnet", "Transformer2DModel": "attention", "Attention": "attention"}


def skippable_blocks(root: nn.Module) -> dict[str, str]:
    """Blocks that can become identity: attention blocks, and ResNets whose input and output channels match.
    Returns name -> kind, in module order."""
    out = {}
    for name, module in root.named_modules():
        kind = _KINDS.get(type(module).__name__)
        if kind is None or not _in_list(name):
            continue
        if kind == "resnet" and module.in_channels != module.out_channels:
            continue
        if any(name.startswith(p + ".") for p in out):
            continue
        out[name] = kind
    return out


def _in_list(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1].isdigit() and parts[-2] in ("resnets", "attentions")


@contextmanager
def skip_blocks(root: nn.Module, names: Iterable[str]) -> Iterator[list[str]]:
    """Within the context, the named blocks of ``root`` pass their input through."""
    names = list(names)
    allowed = skippable_blocks(root)
    swapped = []
    try:
        for name in names:
            if name not in allowed:
                raise UsageError(f"block '{name}' cannot be skipped (not an attention block or a channel-preserving ResNet)")
            parent_name, idx = name.rsplit(".", 1)
            container = root.get_submodule(parent_name)
            swapped.append((container, int(idx), container[int(idx)]))
            container[int(idx)] = SkippedBlock(allowed[name], name)
        yield names
    finally:
        for container, idx, original in reversed(swapped):
            container[idx] = original
