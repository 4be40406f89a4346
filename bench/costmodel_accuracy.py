"""Per-profile calibration (``snapopt target calibrate``) on the first calibration file, UNet predictions per
built-in iPhone, and lookup-table speed. The cross-validated accuracy of the shared fit on every published
number is bench/latency_crossval.py.

Prints and saves bench/results/costmodel_accuracy.json. Not a timed test: it captures full-size presets
(meta device) and refits, ~1 minute on 2 CPU cores.

  python bench/costmodel_accuracy.py [--csv FILE] [--plot docs/img/latency_sd15_unet.png]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from snapopt.devices.calibrate import GraphCache, RowFit, calibrate, read_rows, row_target
from snapopt.devices.latency import build_table, model_tables
from snapopt.devices.registry import TARGETS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT / "snapopt" / "devices" / "data" / "published_latency_calibration.csv"
BUILTINS = ["iphone-12-pro-max", "iphone-13-pro-max", "iphone-14-pro", "iphone-15-pro", "iphone-16-pro-max"]


def builtin_accuracy(rows, cache) -> list[dict]:
    """How well the shipped (built-in, calibrated) targets reproduce every published row."""
    out = []
    for row in rows:
        base = TARGETS.resolve("iphone-14-pro")
        t = row_target(row, base, TARGETS)
        shipped = base.with_profile(row.profile) if row.profile in base.profile_names() else None
        if t is None or shipped is None:
            out.append({"row": row.label, "skipped": "no built-in profile or chip"})
            continue
        t = t.model_copy(update={"calibration": shipped.calibration})
        pred = build_table(cache.graph(row), t).total_ms
        out.append({"row": row.label, "measured_ms": row.latency_ms, "predicted_ms": round(pred, 2),
                    "error_pct": round(100 * (pred / row.latency_ms - 1), 2)})
    return out


def leave_one_out(rows, cache) -> list[dict]:
    """Refit each profile without one of its rows and predict that row: the honest accuracy (a profile's fit
    with as many free coefficients as rows reproduces its rows by construction)."""
    base = TARGETS.resolve("iphone-14-pro")
    out = []
    for i, held in enumerate(rows):
        same = [r for j, r in enumerate(rows) if j != i and r.profile == held.profile]
        if not same:
            out.append({"row": held.label, "skipped": "only row of its profile"})
            continue
        fits, _ = calibrate(same, base, TARGETS, cache=cache)
        coeffs = next(f.coefficients for f in fits if f.profile.name == held.profile)
        t = row_target(held, base, TARGETS)
        pred = build_table(cache.graph(held), t, coeffs).total_ms
        out.append({"row": held.label, "measured_ms": held.latency_ms, "predicted_ms": round(pred, 2),
                    "error_pct": round(100 * (pred / held.latency_ms - 1), 2), "fitted_on": len(same)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=str(DEFAULT_CSV))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "latency_sd15_unet.png"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "costmodel_accuracy.json"))
    args = ap.parse_args()

    rows = read_rows(args.csv)
    cache = GraphCache()
    t0 = time.perf_counter()
    fits, _ = calibrate(rows, TARGETS.resolve("iphone-14-pro"), TARGETS, cache=cache)
    fit_s = time.perf_counter() - t0
    refit = [{"row": r.row.label, "measured_ms": r.row.latency_ms, "fitted_ms": round(r.predicted_ms, 2),
              "error_pct": round(100 * r.error, 2), "free": f.free} for f in fits for r in f.rows]
    shipped = builtin_accuracy(rows, cache)
    loo = leave_one_out(rows, cache)

    targets = [TARGETS.resolve(t) for t in BUILTINS] + [TARGETS.resolve("iphone-14-pro@apple-split-einsum-v2-6bit")]
    predictions, speed = {}, {}
    for model in ("arch:sd-v1.5", "arch:sd-2.1-base", "arch:sdxl-base"):
        t0 = time.perf_counter()
        tables, info = model_tables(model, targets, "unet")
        speed[model] = {"capture_and_price_s": round(time.perf_counter() - t0, 2)}
        predictions[model] = {f"{t.target_id}@{t.profile}": round(t.total_ms, 1) for t in tables}
        t14 = tables[2]
        names = list(t14.blocks)
        n = 10000
        t0 = time.perf_counter()
        for _ in range(n):
            t14.latency_us(names)
        speed[model]["whole_unet_query_us"] = round((time.perf_counter() - t0) / n * 1e6, 3)
        attn64 = sum(b.us for b in t14.blocks.values() if b.kind == "attention" and b.resolution == 64)
        speed[model]["iphone14pro_attention64_share"] = round(attn64 / t14.latency_us(), 3)
        if model == "arch:sd-v1.5" and args.plot:
            from snapopt.devices.plot import plot_tables

            plot_tables(tables[:5], args.plot, title="SD-v1.5 UNet 512² batch 2 (CFG), snapfusion-fp16 profile")
    result = {"csv": os.path.relpath(args.csv, ROOT), "calibration_fit_s": round(fit_s, 2), "refit": refit, "shipped_targets": shipped,
              "leave_one_out": loo, "unet_predictions_ms": predictions, "speed": speed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
