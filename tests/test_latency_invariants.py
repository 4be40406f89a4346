"""One price for what ships: exact rewrites never move the predicted latency, per-block tables sum to the
whole-model price, block_prune budgets against the number the report prints; uncalibrated targets are flagged
and priced from the shared fit; the pipeline price is text encoder + steps × UNet + decoder + overhead."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from snapopt.core import PassContext, PassManager
from snapopt.core.registry import PASSES
from snapopt.devices.latency import build_table, whole_model_us
from snapopt.devices.registry import TARGETS
from snapopt.errors import UsageError

EXACT_UNET_PASSES = ["attention_split_einsum", "attention_original", "attention_sdpa", "fuse_qkv", "linear_to_conv"]


def _all_targets():
    """Every built-in target under every one of its profiles."""
    out = []
    for _tid, t, _src in TARGETS.items():
        out += [t.with_profile(p) for p in t.profile_names()]
    return out


def test_every_exact_unet_pass_is_covered():
    exact = {name for name, cls, _src in PASSES.items() if getattr(cls, "exact", False)}
    assert exact <= set(EXACT_UNET_PASSES), f"new exact pass(es) {exact - set(EXACT_UNET_PASSES)}: add them to the invariant"


def _rewritten_graphs(pipe, shapes):
    from snapopt.capture import block_graph

    graphs = {"input": block_graph(pipe, "unet", shapes)}
    for name in EXACT_UNET_PASSES:
        p = pipe.clone()
        PASSES.get(name)({"component": "unet"}).run(p, PassContext(shapes=shapes))
        graphs[name] = block_graph(p, "unet", shapes)
    return graphs


def _check_invariance(graphs):
    worst = 0.0
    for t in _all_targets():
        base = build_table(graphs["input"], t).total_ms
        for name, g in graphs.items():
            worst = max(worst, abs(build_table(g, t).total_ms / base - 1))
    assert worst < 0.01, worst


def test_exact_rewrites_keep_the_price_on_tiny(tiny, tiny_shapes):
    _check_invariance(_rewritten_graphs(tiny, tiny_shapes))


def test_exact_rewrites_keep_the_price_on_sd15():
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models.loading import load_model

    pipe = load_model("arch:sd-v1.5", components=("unet",), structure_only=True)
    graphs = _rewritten_graphs(pipe, Shapes(resolution=512, batch=2))
    _check_invariance(graphs)
    # and the lookup table sums to the component priced as one op sequence
    for t in _all_targets()[::3]:
        for g in graphs.values():
            assert build_table(g, t).latency_us() == pytest.approx(whole_model_us(g, t), rel=0.01)


def test_table_sum_equals_whole_model_on_tiny(tiny, tiny_shapes):
    from snapopt.capture import block_graph

    for comp in ("unet", "vae_decoder", "text_encoder"):
        g = block_graph(tiny, comp, tiny_shapes)
        for t in _all_targets():
            assert build_table(g, t).latency_us() == pytest.approx(whole_model_us(g, t), rel=0.01)


def test_block_prune_budget_is_what_the_report_prints(tiny, tiny_shapes):
    """The recipe order that used to disagree: an exact attention rewrite, then block_prune."""
    from snapopt.capture import block_graph
    from snapopt.devices.report import latency_report

    target = TARGETS.resolve("iphone-14-pro")
    before = {"unet": block_graph(tiny, "unet", tiny_shapes)}
    ctx = PassContext(shapes=tiny_shapes, targets=[target])
    passes = [PASSES.get("attention_split_einsum")(), PASSES.get("block_prune")(
        {"budget_fraction": 0.93, "prompts": 1, "timesteps": [500],
         "candidates": ["down_blocks.0.attentions.0", "down_blocks.0.resnets.1", "down_blocks.2.attentions.1", "down_blocks.3.resnets.0",
                        "mid_block.resnets.0", "mid_block.attentions.0", "up_blocks.1.attentions.2", "up_blocks.3.attentions.1"]})]
    manager = PassManager(passes, ctx, graphs=dict(before))
    _, records = manager.run(tiny)
    stats = records[1].stats
    report, lines = latency_report([target], before, {"unet": manager.graphs["unet"]})
    unet = report["iphone-14-pro"]["components"]["unet"]
    assert unet["before_ms"] == pytest.approx(stats["baseline_ms"], rel=0.01)
    assert unet["after_ms"] == pytest.approx(stats["final_ms"], rel=0.01)
    assert unet["after_ms"] <= stats["budget_ms"] * 1.01 and unet["before_ms"] / unet["after_ms"] >= 1


def test_block_prune_budget_already_met_is_a_no_op(tiny, tiny_shapes):
    ctx = PassContext(shapes=tiny_shapes, targets=[TARGETS.resolve("iphone-14-pro")])
    out, (rec,) = PassManager([PASSES.get("block_prune")({"budget_fraction": 1.0, "prompts": 1, "timesteps": [500]})], ctx).run(tiny)
    assert rec.stats["removed"] == [] and rec.stats["final_ms"] == rec.stats["baseline_ms"]
    assert not any(type(m).__name__ == "SkippedBlock" for m in out.unet.modules())


@pytest.mark.parametrize("bad", [5000, -1, 1000])
def test_block_prune_timesteps_are_bounded(bad):
    with pytest.raises(Exception, match=f"timestep {bad} is outside \\[0, 999\\]"):
        PASSES.get("block_prune")({"budget_fraction": 0.9, "timesteps": [500, bad]})


def test_uncalibrated_target_is_flagged_and_priced_from_the_shared_fit(tmp_path):
    from snapopt.devices.latency import model_tables
    from snapopt.devices.target import Target

    base = TARGETS.resolve("iphone-16-pro-max")
    new = Target.model_validate(base.model_dump() | {"id": "iphone-17-pro", "calibration": {"coefficients": {}},
                                                    "other_profiles": []})
    new = new.model_copy(update={"device": new.device.model_copy(update={"chip": new.device.chip.model_copy(
        update={"name": "A19 Pro", "ane_tops": 38.0, "memory_bandwidth_gbs": 76.8})})})
    assert not new.calibrated and TARGETS.resolve("iphone-14-pro").calibrated
    tables, _ = model_tables("arch:tiny", [new, base], "unet")
    ratio = tables[1].total_ms / tables[0].total_ms
    assert 1.0 <= ratio < 1.6  # a faster spec, not the 3.5x of uncalibrated defaults


def test_sd15_and_sdxl_follow_chip_generation():
    from snapopt.devices.latency import model_tables

    chain = ["iphone-12-pro-max", "iphone-13-pro-max", "iphone-14-pro", "iphone-15-pro", "iphone-16-pro-max"]
    for model in ("arch:sd-v1.5", "arch:sdxl-base"):
        for prof in ("snapfusion-fp16", "apple-split-einsum-v2-6bit"):
            tables, _ = model_tables(model, [TARGETS.resolve(f"{t}@{prof}") for t in chain], "unet")
            totals = [t.total_ms for t in tables]
            assert totals == sorted(totals, reverse=True), (model, prof, totals)


def test_pipeline_cli_is_text_encoder_steps_unet_and_decoder():
    from snapopt.cli import build_cli
    from snapopt.devices.cost_model import coefficients_for

    r = CliRunner().invoke(build_cli(), ["latency", "arch:tiny", "--pipeline", "--steps", "8", "--json", "-t", "iphone-14-pro",
                                 "-t", "iphone-13@apple-split-einsum-v2-6bit"], env={"COLUMNS": "300"})
    assert r.exit_code == 0, (r.output, r.exception)
    out = json.loads(r.output)
    for p in out["pipelines"]:
        t = TARGETS.resolve(p["target"] + "@" + p["profile"])
        c = coefficients_for(t)
        compute = 2 * p["text_encoder_ms"] + 8 * p["unet_step_ms"] + p["decoder_ms"]
        assert p["total_ms"] == pytest.approx(compute + p["overhead_ms"], rel=1e-3)
        assert p["overhead_ms"] >= c["e2e_overhead_ms"] * 0.999
        assert p["low_ms"] <= p["total_ms"] <= p["high_ms"]
    # the 4 GB iPhone 13 pays reduceMemory's just-in-time loading
    assert out["pipelines"][1]["overhead_ms"] > out["pipelines"][0]["overhead_ms"]
    bad = CliRunner().invoke(build_cli(), ["latency", "arch:tiny", "--pipeline", "--steps", "0"])
    assert isinstance(bad.exception, UsageError) and "--steps" in str(bad.exception)


def test_pipeline_report_headline(tiny, tiny_shapes):
    from snapopt.capture import block_graph
    from snapopt.devices.report import pipeline_report

    graphs = {c: block_graph(tiny, c, tiny_shapes) for c in ("unet", "text_encoder", "vae_decoder")}
    targets = [TARGETS.resolve("iphone-14-pro"), TARGETS.resolve("iphone-16-pro-max")]
    out, lines = pipeline_report(targets, graphs, graphs, steps=8)
    assert out["iphone-14-pro"]["speedup"] > 1  # same model, 8 steps instead of 50
    assert "uncalibrated" in "\n".join(lines) and "iphone-16-pro-max (uncalibrated)" in "\n".join(lines)
    assert pipeline_report(targets, {"unet": graphs["unet"]}, graphs, steps=8) == ({}, [])
