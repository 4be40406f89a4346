"""A no-grad function of fixed-shape tensors, recorded once as a CUDA graph and replayed (teacher sampling loops).

A small UNet's forward is ~1,600 kernel launches. Sampled eagerly, the host spends longer launching them than the GPU
spends running them, and every host tensor copied to the device makes the host wait for the GPU first. Recorded
once, one replay queues them all. :class:`StaticReplay` holds the static input buffers a graph reads: a call fills
them (tensors copied, Python numbers filled, so nothing waits on the host) and replays. On the CPU the same
function runs on the same buffers uncaptured, so a test can check a caller's static path against its eager one.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Callable

import torch


class StaticReplay:
    """``fn(**buffers) -> Tensor`` over static buffers shaped like ``example`` (name -> tensor on one device).
    ``state``: the buffer the result is written back to, inside the graph (a sampler's x_t), so that each call
    advances it: load it once, then only the per-step numbers change.

    ``fn`` must read only its arguments and module state that does not change between calls, and must not
    synchronise with the host (no ``.item()``, no host tensors), nor build CUDA graphs of its own (a module
    compiled with ``mode="reduce-overhead"``); a capture that fails anyway falls back, best effort, to running
    ``fn`` uncaptured. The result is a view of the graph's output, valid until the next call (clone it to keep it)."""

    def __init__(self, fn: Callable[..., torch.Tensor], example: dict[str, torch.Tensor], *, state: str | None = None,
                 warmup: int = 2):
        self.fn, self.state = fn, state
        self.buffers = {k: v.detach().clone() for k, v in example.items()}
        device = next(iter(self.buffers.values())).device
        self.graph = None
        if device.type == "cuda":
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.no_grad(), _no_cast_cache(), torch.cuda.stream(side):  # cuDNN's choices and the allocator's blocks first
                for _ in range(warmup):
                    self._run()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            before = torch.cuda.current_stream(device)
            try:
                with torch.no_grad(), _no_cast_cache(), torch.cuda.graph(graph):
                    self.out = self._run()
                self.graph = graph
            except RuntimeError as exc:  # e.g. a module that synchronises: best effort, the same function uncaptured
                # a failed capture_end() skips torch.cuda.graph's own stream restore: later work must not stay on
                # the capture stream
                torch.cuda.set_stream(before)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                warnings.warn(f"CUDA graph capture failed ({first}); running uncaptured instead (same results, slower)")

    def _run(self) -> torch.Tensor:
        out = self.fn(**self.buffers)
        if self.state is None:
            return out
        return self.buffers[self.state].copy_(out)

    def load(self, **values) -> None:
        """Fill buffers: tensors are copied, Python numbers filled (no host tensor, so nothing waits on the GPU)."""
        for k, v in values.items():
            if torch.is_tensor(v):
                self.buffers[k].copy_(v)
            else:
                self.buffers[k].fill_(v)

    def __call__(self, **values) -> torch.Tensor:
        self.load(**values)
        if self.graph is None:
            with torch.no_grad():
                return self._run()
        self.graph.replay()
        return self.out


def _no_cast_cache():
    """Under autocast, its cache of cast weights would hand the graph tensors freed when autocast exits: record
    under the same autocast with the cache off (the casts become part of the graph)."""
    if not torch.is_autocast_enabled("cuda"):
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
