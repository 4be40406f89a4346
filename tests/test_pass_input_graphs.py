"""A pass that selects blocks by resolution reads the manager's capture of its input (ctx.input_graphs) instead
of capturing the model again, and selects exactly what a fresh capture selects."""

import snapopt.capture as capture_pkg
import snapopt.capture.export as export_mod
from snapopt.core import PassContext, PassManager
from snapopt.ir.select import select_blocks
from snapopt.passes.attention_structure import RemoveSelfAttention
from snapopt.passes.conv_rewrites import SeparableConv


def _counting(monkeypatch):
    calls = []
    real = export_mod.capture

    def counted(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("component"))
        return real(*args, **kwargs)

    monkeypatch.setattr(capture_pkg, "capture", counted)
    return calls


def test_selection_reuses_the_managers_capture(tiny, tiny_shapes, monkeypatch):
    fresh = {kind: select_blocks(tiny, "unet", tiny_shapes, kind=kind, resolutions=[8]) for kind in ("attention", "resnet")}
    calls = _counting(monkeypatch)
    ctx = PassContext(shapes=tiny_shapes)
    out, (rm, sep) = PassManager([RemoveSelfAttention({"resolutions": [8]}), SeparableConv({"resolutions": [8]})], ctx).run(tiny)
    # the manager captures the input once and each result once; the passes themselves capture nothing
    assert calls == ["unet"] * 3
    assert rm.stats["blocks"] == fresh["attention"]
    assert sep.stats["blocks"] == fresh["resnet"]
    assert ctx.input_graphs == {}  # cleared once the pass returns: it described the pass's input only


def test_a_pass_run_outside_a_manager_still_captures(tiny, tiny_shapes, monkeypatch):
    calls = _counting(monkeypatch)
    result = RemoveSelfAttention({"resolutions": [8]}).run(tiny.clone(["unet"]), PassContext(shapes=tiny_shapes))
    assert calls == ["unet"] and result.stats["blocks"]


def test_block_prune_prices_its_input_from_the_managers_capture(tiny, tiny_shapes, monkeypatch):
    from snapopt.passes.block_prune import BlockPrune

    calls = _counting(monkeypatch)
    options = {"target": "iphone-14-pro", "budget_fraction": 0.9, "prompts": 2, "timesteps": [500], "prompt_set": "validation"}
    under_manager = PassManager([BlockPrune(options)], PassContext(shapes=tiny_shapes)).run(tiny)[1][0].stats
    assert calls == ["unet"] * 2  # before and after, both the manager's
    alone = BlockPrune(options).run(tiny.clone(["unet"]), PassContext(shapes=tiny_shapes)).stats
    assert len(calls) == 3  # outside a manager the pass captures its input itself ...
    assert alone["baseline_ms"] == under_manager["baseline_ms"]  # ... and prices it the same
    assert alone["removed"] == under_manager["removed"]
