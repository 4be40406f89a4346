"""Cost model and latency lookup table: physics trends, placement, LUT sums and speed, calibration."""

from __future__ import annotations

import time

import pytest

from snapopt.devices.cost_model import ChipRates, CostModel
from snapopt.devices.latency import build_table
from snapopt.devices.registry import TARGETS
from snapopt.errors import TargetError, UsageError
from snapopt.ir.ops import OpRecord

BUILTINS = ["iphone-12-pro-max", "iphone-13-pro-max", "iphone-14-pro", "iphone-15-pro", "iphone-16-pro-max"]  # one per chip


def _target(tid="iphone-14-pro", **profile):
    t = TARGETS.resolve(tid)
    return t.model_copy(update={"profile": t.profile.model_copy(update=profile)}) if profile else t


def _chip(t, **chip):
    dev = t.device.model_copy(update={"chip": t.device.chip.model_copy(update=chip)})
    return t.model_copy(update={"device": dev})


def _attention(q: int, heads: int = 8, batch: int = 2, dim: int = 40) -> OpRecord:
    lead = batch * heads
    return OpRecord("attn", "scaled_dot_product_attention", "attention", macs=lead * q * q * 2 * dim,
                    in_bytes=3 * lead * q * dim * 2, out_bytes=lead * q * dim * 2, weight_params=0,
                    out_shape=(batch, heads, q, dim), extra={"heads": heads, "q_len": q, "kv_len": q, "head_dim": dim,
                                                              "score_bytes": lead * q * q * 2})


def _us(model: CostModel, op: OpRecord, stream: bool = True) -> float:
    return sum(c.us for c in model.ops_cost([op], stream))


def test_int8_tops_count_half_for_fp16():
    assert ChipRates.of(TARGETS.resolve("iphone-15-pro")).ane_flops == pytest.approx(17.5e12)
    assert ChipRates.of(TARGETS.resolve("iphone-14-pro")).ane_flops == pytest.approx(17e12)


def test_high_resolution_attention_spills_and_costs_more_per_score():
    m = CostModel(_target())
    per_score = {q: _us(m, _attention(q)) / (16 * q * q) for q in (256, 1024, 4096)}
    assert per_score[4096] > 2 * per_score[1024]  # 64x64 scores no longer fit on chip
    assert sum(c.dram_bytes for c in m.ops_cost([_attention(4096)], False)) > 16 * 4096 * 4096 * 2


def test_attention_implementations_order_at_64x64():
    op = _attention(4096)
    t = {impl: _us(CostModel(_target(attention=impl)), op) for impl in ("original", "split_einsum", "split_einsum_v2")}
    assert t["original"] > t["split_einsum"] > t["split_einsum_v2"]


def test_faster_spec_is_never_slower():
    base = _target()
    ops = [_attention(4096), OpRecord("c", "conv2d", "conv", 10**10, 2 * 10**7, 2 * 10**7, 10**7, (2, 320, 64, 64))]
    before = sum(c.us for c in CostModel(base).ops_cost(ops, True))
    for change in ({"ane_tops": 34.0}, {"memory_bandwidth_gbs": 102.4}, {"system_cache_mb": 64.0}):
        assert sum(c.us for c in CostModel(_chip(base, **change)).ops_cost(ops, True)) <= before


def test_palettized_weights_stream_faster():
    op = OpRecord("fc", "linear", "linear", macs=77 * 768 * 3072, in_bytes=77 * 768 * 2, out_bytes=77 * 3072 * 2,
                  weight_params=768 * 3072, out_shape=(1, 77, 3072))
    assert _us(CostModel(_target(weight_bits=6)), op) < _us(CostModel(_target(weight_bits=16)), op)
    assert _us(CostModel(_target()), op, stream=False) < _us(CostModel(_target()), op, stream=True)


def test_unsupported_ops_fall_back_with_a_transfer():
    gather = OpRecord("emb", "embedding", "gather", 0, 0, 77 * 768 * 2, 49408 * 768, (1, 77, 768))
    ane = CostModel(_target())
    [cost] = ane.ops_cost([gather], True)
    assert cost.unit == "cpu" and cost.transfer_us > 0
    assert CostModel(_target(compute_units="ALL")).unit_of(gather) == "gpu"
    assert CostModel(_target(compute_units="CPU_AND_GPU")).unit_of(_attention(64)) == "gpu"
    # an embedding reads only the rows it gathers, not the whole table
    assert ane.weight_bytes(gather) == 77 * 768 * 2


def test_unknown_coefficient_is_a_one_line_error():
    with pytest.raises(TargetError, match="unknown cost-model coefficient 'warp_speed'") as e:
        CostModel(_target(), {"warp_speed": 9.0})
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tiny_unet():
    from snapopt.capture import block_graph
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models.loading import load_model

    pipe = load_model("arch:tiny", components=("unet",), structure_only=True)
    return {b: block_graph(pipe, "unet", Shapes(resolution=64, batch=b)) for b in (1, 2)}


def test_lut_subset_sums_and_errors(tiny_unet):
    table = build_table(tiny_unet[2], _target())
    names = list(table.blocks)
    subset = names[::3]
    assert table.latency_us(subset) == pytest.approx(table.fixed_us + sum(table.blocks[n].us for n in subset))
    assert table.without_us(subset) == pytest.approx(table.latency_us() - sum(table.blocks[n].us for n in subset))
    assert table.latency_us() == pytest.approx(table.latency_us(names))
    with pytest.raises(UsageError, match="unknown block 'nope'"):
        table.latency_us(["nope"])


def test_batch_two_costs_more_than_batch_one(tiny_unet):
    t = _target()
    assert build_table(tiny_unet[2], t).total_ms > build_table(tiny_unet[1], t).total_ms
    # weights stay on chip when they fit the usable part of the system cache (the fit puts it at a few MB)
    assert build_table(tiny_unet[2], _chip(t, system_cache_mb=512.0)).meta["weights_streamed"] is False


@pytest.fixture(scope="module")
def sd15_tables():
    from snapopt.devices.latency import model_tables

    tables, _ = model_tables("arch:sd-v1.5", [TARGETS.resolve(t) for t in BUILTINS], "unet")
    return dict(zip(BUILTINS, tables))


def test_sd15_predictions_follow_chip_generation(sd15_tables):
    totals = [sd15_tables[t].total_ms for t in BUILTINS]
    assert totals == sorted(totals, reverse=True), totals
    assert sd15_tables["iphone-14-pro"].meta["weights_streamed"]


def test_64x64_attention_dominates_on_iphone_14_pro(sd15_tables):
    table = sd15_tables["iphone-14-pro"]
    attn64 = sum(b.us for b in table.blocks.values() if b.kind == "attention" and b.resolution == 64)
    assert attn64 > 0.5 * table.latency_us()
    assert max(table.blocks.values(), key=lambda b: b.us).resolution == 64


def test_whole_unet_from_the_table_under_10ms(sd15_tables):
    table = sd15_tables["iphone-14-pro"]
    names = list(table.blocks)
    start = time.perf_counter()
    for _ in range(100):
        table.latency_us(names)
    assert (time.perf_counter() - start) / 100 < 0.010


def test_unseen_era_is_priced_at_the_fitted_level():
    from snapopt.devices.cost_model import shared_coefficients, shared_fit

    fit = shared_fit()
    assert shared_coefficients("1999-01")["scale"] == pytest.approx(fit["unseen_era"])
    assert shared_coefficients("2023-06")["scale"] == pytest.approx(fit["eras"]["2023-06"])
    assert shared_coefficients()["scale"] == pytest.approx(fit["eras"][fit["latest_era"]])
    # the level sits among the fitted runtimes (eras are deviations about it), not at an arbitrary anchor
    eras = sorted(fit["eras"].values())
    assert eras[0] < fit["unseen_era"] < eras[-1]


def test_shipped_fit_is_physical_and_far_smaller_than_the_data():
    from snapopt.devices.cost_model import shared_fit
    from snapopt.devices.fit import FIXED, FREE, PRIORS

    fit = shared_fit()
    assert fit["free_coefficients"] == len(FREE) + 1 + len(fit["eras"])
    assert fit["free_coefficients"] * 2 < len(fit["rows"])
    for k, v in FIXED.items():
        assert fit["coefficients"][k] == pytest.approx(v)
    for k in FREE:  # every free coefficient within a factor e² of its physics prior (none ran to a bound)
        prior, _ = PRIORS[k]
        assert prior / 7.4 < fit["coefficients"][k] < prior * 7.4, k


def test_sole_era_evidence_rows_are_snapfusion_unet_and_august_2023():
    from snapopt.devices.fit import read_published, sole_evidence

    rows, _ = read_published()
    labels = sorted(rows[i].label for i in sole_evidence(rows))
    assert labels == ["iphone-14-pro-max/sd-2.1-base/unet_step/2023-08/split_einsum_v2-6b",
                      "iphone-14-pro/sd-v1.5/unet_step/snapfusion/split_einsum-16b"]


def test_committed_crossval_meets_the_target():
    """bench/results/costmodel_crossval.json (python bench/latency_crossval.py): median ≤ 10%, max ≤ 25% on
    left-out unet_step and e2e rows, rows that are the sole evidence of their era shown apart."""
    import json
    from pathlib import Path

    cv = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results" / "costmodel_crossval.json").read_text())
    s = cv["summary"]["unet_step+e2e, sole era evidence apart"]
    assert s["rows"] >= 100 and s["median_abs_error_pct"] <= 10 and s["max_abs_error_pct"] <= 25
    for kind, k in cv["summary"]["by fold kind, sole era evidence apart"].items():
        assert k["median_abs_error_pct"] <= 10 and k["max_abs_error_pct"] <= 25, kind


def test_w8a8_is_faster_only_where_the_neural_engine_computes_int8(tiny_unet):
    """A17 Pro quotes int8 TOPS: W8A8 convolutions run at twice the fp16 rate there; an A16 dequantizes, so its
    W8A8 price equals int8 weights'."""
    from snapopt.devices.report import component_table
    from snapopt.lowering.schemes import retarget

    graph = tiny_unet[2]
    for tid, faster in (("iphone-15-pro", True), ("iphone-14-pro", False)):
        t = TARGETS.resolve(tid)
        w8 = component_table(graph, retarget(t, 8)).total_ms
        w8a8 = component_table(graph, retarget(t, 8, 8)).total_ms
        assert (w8a8 < w8) if faster else w8a8 == pytest.approx(w8, rel=1e-9), (tid, w8, w8a8)
