"""SnapFusion's robust training: each step, skip every attention / ResNet block of the student with a
per-kind probability, so that the architecture search (and later removal) of blocks hurts less.

The choice is drawn from the step's generator, so every DDP rank skips the same blocks and a resumed run
skips what the original would have.

The skip decision is data, not structure (:class:`SkipGates`), in the ordinary loop and in a captured CUDA
graph alike: every candidate block runs, a select hands on its input where it is skipped, and the optimizer
step is undone for a skipped block's parameters. So one graph holds every draw, and the eager and graphed
paths run the same kernels (bit-identical on CPU). Blocks a pass already removed are skipped structurally
(``snapopt.models.skipping.skip_blocks``): they are not candidates.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from snapopt.errors import UsageError
from snapopt.models.skipping import skippable_blocks
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


def _select(skip: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x`` where ``skip`` else ``y``, exactly (torch.where copies the chosen operand's values)."""
    if x.dtype != y.dtype:  # keep the computed branch exact; a skipped block hands on its input in the block's dtype
        x = x.to(y.dtype)
    return torch.where(skip, x, y)


def _gated_output(skip: torch.Tensor, x: torch.Tensor, out):
    """The block's output with its tensor replaced by the select, in the block's own return type: a ResNet
    or a bare Attention returns a tensor, a Transformer2DModel a 1-tuple (``return_dict=False``) or an output
    object with ``.sample`` (what :class:`~snapopt.models.blocks.SkippedBlock` returns in each case)."""
    if torch.is_tensor(out):
        return _select(skip, x, out)
    if isinstance(out, tuple):
        return (_select(skip, x, out[0]),) + tuple(out[1:])
    if hasattr(out, "sample"):
        out.sample = _select(skip, x, out.sample)
        return out
    raise TypeError(f"robust training: cannot gate a block returning {type(out).__name__}")


class SkipGates:
    """Random block skipping as data: the step's draw (the same generator and draw order as
    :meth:`RandomSkipper.choose`) becomes a bool vector, one gate per candidate block.

    Why the optimizer step is undone, not left to zero gradients: a skipped block is not part of that step's
    network (SnapFusion), and when it was swapped out structurally its parameters got no gradient, so AdamW
    skipped them (no momentum step, no weight decay, no step count). Zero gradients would still move them by
    their momentum and decay. Undoing the step keeps those semantics: a skipped block's parameters and
    optimizer state are bit-identical across the step. What differs from structural skipping is rounding
    only: gradient sums can add in another order (a structurally skipped block aliases its input) and the
    clipping norm sums exact zeros; and each skipped block's compute is spent and discarded (~p of the
    candidates' FLOPs), the price of one fixed graph (and of DDP without find_unused_parameters).
    """

    def __init__(self, unet: nn.Module, skipper: RandomSkipper):
        self.unet, self.skipper = unet, skipper
        self.names = [name for name, _ in skipper.candidates]
        self._params: list[list[nn.Parameter]] | None = None

    def draw(self, gen: torch.Generator) -> tuple[list[str], torch.Tensor]:
        """The skipped blocks' names and the gate vector (True: skipped) of one step."""
        names = self.skipper.choose(gen)
        chosen = set(names)
        return names, torch.tensor([n in chosen for n in self.names], dtype=torch.bool)

    @contextmanager
    def gated(self, skip: torch.Tensor) -> Iterator[None]:
        """Within the context, candidate ``i`` hands on its input where ``skip[i]`` is set (forward hooks,
        so module names, the state dict and feature hooks are untouched)."""
        handles = []
        try:
            for i, name in enumerate(self.names):
                handles.append(self.unet.get_submodule(name).register_forward_hook(self._hook(skip, i), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _hook(skip: torch.Tensor, i: int):
        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            return _gated_output(skip[i], x, out)

        return hook

    @contextmanager
    def frozen(self, opt: torch.optim.Optimizer, skip: torch.Tensor) -> Iterator[None]:
        """Undo, for the skipped blocks, what the optimizer step in the context did: their parameters and
        optimizer state (moments, step count) come back bit for bit; state the step created is reset to the
        zeros AdamW starts from (the same as no state). Device-only (masks multiply), so it can be captured."""
        groups = self._groups(opt)
        with torch.no_grad():
            before = []
            for params in groups:
                olds = list(params) + [v for p in params for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]
                before.append((params, olds, torch._foreach_mul(olds, 1.0) if olds else []))
        yield
        with torch.no_grad():
            on = skip.to(torch.float32)
            off = 1.0 - on
            for i, (params, olds, saved) in enumerate(before):
                if olds:
                    torch._foreach_mul_(olds, off[i])
                    torch._foreach_add_(olds, torch._foreach_mul(saved, on[i]))
                known = {id(t) for t in olds}
                new = [v for p in params for v in opt.state.get(p, {}).values() if torch.is_tensor(v) and id(v) not in known]
                if new:  # state created by this step: back to AdamW's zeros where the block was skipped
                    torch._foreach_mul_(new, off[i])

    def _groups(self, opt: torch.optim.Optimizer) -> list[list[nn.Parameter]]:
        if self._params is None:
            trained = {id(p) for g in opt.param_groups for p in g["params"]}
            self._params = [[p for p in self.unet.get_submodule(n).parameters() if id(p) in trained] for n in self.names]
        return self._params
