"""SnapFusion's robust training: each step, skip every attention / ResNet block of the student with a
per-kind probability, so that the architecture search (and later removal) of blocks hurts less.

The choice is drawn from the step's generator, so every DDP rank skips the same blocks and a resumed run
skips what the original would have.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from snapopt.errors import UsageError
from snapopt.models.skipping import skip_blocks, skippable_blocks
from snapopt.train.options import RobustOptions


class RandomSkipper:
    def __init__(self, unet: nn.Module, o: RobustOptions):
        self.unet, self.o = unet, o
        allowed = skippable_blocks(unet)
        if o.blocks:
            missing = [b for b in o.blocks if b not in allowed]
            if missing:
                raise UsageError(f"robust.blocks: '{missing[0]}' is not a skippable attention block or channel-preserving ResNet")
            allowed = {b: allowed[b] for b in o.blocks}
        prob = {"attention": o.attention, "resnet": o.resnet}
        self.candidates = [(name, prob[kind]) for name, kind in allowed.items() if prob[kind] > 0]

    def choose(self, gen: torch.Generator) -> list[str]:
        if not self.candidates:
            return []
        draws = torch.rand(len(self.candidates), generator=gen)
        return [name for (name, p), u in zip(self.candidates, draws.tolist()) if u < p]

    def context(self, names: list[str]):
        return skip_blocks(self.unet, names) if names else nullcontext()
