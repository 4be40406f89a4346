"""Phase timings (snapopt.core.phases): exclusive nesting, repeats added up, nothing recorded outside a recording."""

from __future__ import annotations

import time

from snapopt.core.phases import phase, recording


class _Clock:
    """A fake host clock: time moves only when the test says so (no sleeps, no flakiness on a loaded machine)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self, sync: bool = True) -> float:
        return self.now


def test_inner_phase_pauses_the_outer_one_and_repeats_add_up(monkeypatch):
    from snapopt.core import phases as mod

    clock = _Clock()
    monkeypatch.setattr(mod, "_now", clock)
    with recording() as phases:
        with phase("train"):
            clock.now += 5
            with phase("pool"):  # built lazily on training's first step: charged to the pool, not to training
                clock.now += 10
            clock.now += 5
        with phase("pool"):
            clock.now += 5
        clock.now += 100  # outside every phase: charged to nothing
    assert phases == {"train": 10.0, "pool": 15.0}


def test_real_clock_charges_real_time():
    with recording() as phases:
        with phase("sleep"):
            time.sleep(0.02)
    assert 0.02 <= phases["sleep"] < 5


def test_phases_outside_a_recording_do_nothing_and_recordings_do_not_leak():
    with phase("orphan"):
        pass
    with recording() as outer:
        with recording() as inner:
            with phase("a"):
                pass
        with phase("b"):
            pass
    assert set(inner) == {"a"} and set(outer) == {"b"}


def test_a_failing_phase_is_still_charged_and_the_stack_unwinds():
    with recording() as phases:
        try:
            with phase("eval"):
                time.sleep(0.02)
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        with phase("train"):
            pass
    assert phases["eval"] >= 0.02 and "train" in phases
