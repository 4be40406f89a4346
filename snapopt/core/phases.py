"""Where a pass's time goes: named phases (a teacher's latent pool, evaluations, training) timed into its record.

A pass's ``seconds`` says how long it took, not why: a decoder_distill pass of 147 s trained for 97 s, and the
rest went to sampling its teacher pool, decoding it and scoring the result. The pass manager records every pass
under :func:`recording`; the code doing the work marks it with :func:`phase`. Phases are exclusive: an inner
phase pauses the one around it (a trajectory pool built on training's first step counts as the pool, not as
training), so the phases of a pass add up to at most its ``seconds`` and the rest is unnamed work.

On a GPU each boundary synchronises the device, so the kernels queued in a phase are charged to it and not to
the next one. That is a handful of synchronisations per phase, never one per training step. Outside a
recording (a training job, a test) :func:`phase` does nothing. ``phase(name)`` also decorates a function whose
every call is the phase (``Trainer.run`` is ``train``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

_ACTIVE: ContextVar["_Recorder | None"] = ContextVar("snapopt_phases", default=None)


class _Recorder:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.stack: list[tuple[str, float]] = []  # (name, when it last resumed)

    def _charge_top(self, now: float) -> None:
        if self.stack:
            name, since = self.stack[-1]
            self.totals[name] = self.totals.get(name, 0.0) + now - since

    def enter(self, name: str) -> None:
        now = _now()
        self._charge_top(now)
        self.stack.append((name, now))

    def leave(self, sync: bool = True) -> None:
        now = _now(sync)
        self._charge_top(now)
        self.stack.pop()
        if self.stack:  # the enclosing phase resumes
            self.stack[-1] = (self.stack[-1][0], now)


def _now(sync: bool = True) -> float:
    """The host clock after the device has finished what was queued (CUDA runs asynchronously)."""
    import torch

    if sync and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Collect the phases run inside; the dict (phase -> seconds, rounded to ms) is filled when the block ends."""
    rec = _Recorder()
    token = _ACTIVE.set(rec)
    out: dict[str, float] = {}
    try:
        yield out
    finally:
        _ACTIVE.reset(token)
        out.update({k: round(v, 3) for k, v in rec.totals.items()})


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the time spent inside to ``name`` (added up over repeats) in the enclosing :func:`recording`."""
    rec = _ACTIVE.get()
    if rec is None:
        yield
        return
    rec.enter(name)
    try:
        yield
    except BaseException:
        rec.leave(sync=False)  # a sticky CUDA error would raise again from the sync and hide the original
        raise
    rec.leave()
