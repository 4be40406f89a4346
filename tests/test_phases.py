"""Phase timings (snapopt.core.phases): exclusive nesting, repeats added up, nothing recorded outside a recording."""

from __future__ import annotations

import time

from snapopt.core.phases import phase, recording


def test_inner_phase_pauses_the_outer_one_and_repeats_add_up():
    with recording() as phases:
        with phase("train"):
            time.sleep(0.05)
            with phase("pool"):  # built lazily on training's first step: charged to the pool, not to training
                time.sleep(0.1)
            time.sleep(0.05)
        with phase("pool"):
            time.sleep(0.05)
    assert set(phases) == {"train", "pool"}
    assert 0.09 <= phases["train"] < 0.14  # 0.05 + 0.05, without the nested 0.1
    assert 0.14 <= phases["pool"] < 0.2  # 0.1 + 0.05


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
