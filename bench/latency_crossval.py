"""Out-of-sample accuracy of the latency cost model on every published number (issue 10).

Fits the shared coefficients on all usable rows of snapopt/devices/data/published_latency_*.csv, then refits
leaving out one device, one model and one era at a time and predicts the left-out rows. Prints every
left-out row's error, the median and the maximum (unet_step + e2e rows, and all rows), and saves
bench/results/costmodel_crossval.json and bench/results/costmodel_crossval.png (predicted vs measured).
A left-out era has no fitted factor: its rows are predicted at the fit's overall level (the typical runtime),
which is what a new runtime would get. Rows that are the only unet_step/e2e evidence of their era (SnapFusion's
UNet row, Apple's August 2023 row) are also summarised apart: held out, nothing is left to price their runtime.
~1.5 minutes on 2 CPU cores (captures are on the meta device).

  python bench/latency_crossval.py [--write-fit]   # --write-fit: ship the full fit as snapopt/devices/data/latency_fit.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from snapopt.devices.fit import FREE, LATEST_ERA, Graphs, cross_validate, fit, read_published, summarize

ROOT = Path(__file__).resolve().parents[1]
FIT_FILE = ROOT / "snapopt" / "devices" / "data" / "latency_fit.json"


def plot(cv: list[dict], insample: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    marks = {"unet_step": "o", "e2e": "s", "vae_decoder": "^", "text_encoder": "v"}
    for kind, color in (("device", "tab:blue"), ("chip", "tab:purple"), ("model", "tab:orange"), ("arch", "tab:green"), ("era", "tab:red")):
        pts = [r for r in cv if r["fold"].startswith(kind)]
        for metric, m in marks.items():
            sel = [r for r in pts if r["metric"] == metric]
            if sel:
                ax.scatter([r["measured_ms"] for r in sel], [r["predicted_ms"] for r in sel], marker=m, color=color, alpha=0.7,
                           label=f"leave one {kind} out, {metric}")
    sole = [r for r in cv if r.get("sole_era_evidence")]
    ax.scatter([r["measured_ms"] for r in sole], [r["predicted_ms"] for r in sole], s=140, facecolors="none",
               edgecolors="k", label="sole evidence of its era (shown apart)")
    ax.scatter([r["measured_ms"] for r in insample], [r["predicted_ms"] for r in insample], marker="x", color="k", alpha=0.5,
               label="in-sample (all rows)")
    lo, hi = 2, 60000
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="gray", alpha=0.15, label="±10%")
    ax.plot([lo, hi], [lo * 0.75, hi * 0.75], "k:", lw=0.6)
    ax.plot([lo, hi], [lo * 1.25, hi * 1.25], "k:", lw=0.6, label="±25%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("published latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title("Cost model: cross-validated predictions vs published numbers")
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "costmodel_crossval.json"))
    ap.add_argument("--plot", default=str(ROOT / "bench" / "results" / "costmodel_crossval.png"))
    ap.add_argument("--write-fit", action="store_true", help="write the full fit to snapopt/devices/data/latency_fit.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    rows, skipped = read_published()
    graphs = Graphs(progress=lambda m: print(f"[bench] {m}", flush=True))
    full = fit(rows, graphs)
    fit_s = time.perf_counter() - t0
    insample = [{"row": r.label, "metric": r.metric, "measured_ms": r.latency_ms, "predicted_ms": round(p, 2),
                 "error_pct": round(100 * (p / r.latency_ms - 1), 2)} for r, p in zip(rows, full.predicted_ms)]
    cv = cross_validate(rows, graphs, full, progress=lambda m: print(f"[bench] {m}", flush=True))
    total_s = time.perf_counter() - t0

    print(f"\n{len(rows)} rows, {full.n_free} free coefficients ({len(FREE)} shared physics + overall level + "
          f"{len(full.eras)} era factors); {len(skipped)} non-diffusion rows not used")
    print(f"{'fold':34s} {'row':72s} {'measured':>9s} {'predicted':>9s} {'error':>7s}")
    for r in cv:
        flag = "  (sole evidence of its era)" if r["sole_era_evidence"] else ""
        print(f"{r['fold']:34s} {r['row']:72s} {r['measured_ms']:9.0f} {r['predicted_ms']:9.0f} {r['error_pct']:+6.1f}%{flag}")
    rest = [r for r in cv if not r["sole_era_evidence"]]
    kinds = ("device", "chip", "model", "arch", "era")
    summary = {
        "unet_step+e2e": summarize(cv), "all": summarize(cv, ("unet_step", "e2e", "vae_decoder", "text_encoder")),
        "unet_step+e2e, sole era evidence apart": summarize(rest),
        "unet_step+e2e, sole era evidence only": summarize([r for r in cv if r["sole_era_evidence"]]),
        "unet_step+e2e, era seen": summarize([r for r in cv if r["era_seen"]]),
        "by fold kind": {k: summarize([r for r in cv if r["fold"].startswith(k)]) for k in kinds},
        "by fold kind, sole era evidence apart": {k: summarize([r for r in rest if r["fold"].startswith(k)]) for k in kinds},
        "in-sample unet_step+e2e": summarize([dict(r) for r in insample]),
    }
    for k, v in summary.items():
        print(f"{k}: {v}")
    result = {"rows": len(rows), "free_coefficients": full.n_free, "free": [*FREE, "level", *(f"era {e}" for e in full.eras)],
              "skipped": skipped, "latest_era": LATEST_ERA, "coefficients": full.coefficients, "eras": full.eras,
              "unseen_era": full.unseen_era, "insample": insample, "crossval": cv, "summary": summary,
              "seconds": {"fit": round(fit_s, 1), "total": round(total_s, 1)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(cv, insample, Path(args.plot))
    print(f"wrote {args.out} and {args.plot} in {total_s:.0f} s")
    if args.write_fit:
        # the interval a prediction carries: left-out rows whose runtime era the fit still knew (a profile fixes
        # its era; a new phone or a new model is what the interval is for)
        s = summary["unet_step+e2e, era seen"]
        lo, hi = s["log_residual_p10_p90"]
        shipped = {"about": "shared latency cost-model fit; written by bench/latency_crossval.py --write-fit",
                   "latest_era": LATEST_ERA, "coefficients": {k: round(v, 6) for k, v in full.coefficients.items()},
                   "eras": {k: round(v, 6) for k, v in full.eras.items()}, "unseen_era": round(full.unseen_era, 6),
                   "rows": [r.label for r in rows],
                   "free_coefficients": full.n_free,
                   # log(predicted / measured) of left-out rows, 10th and 90th percentile: the prediction interval
                   "crossval": {"rows": "unet_step and e2e rows left out by any fold whose fit still knew their era",
                             "median_abs_error_pct": s["median_abs_error_pct"], "max_abs_error_pct": s["max_abs_error_pct"],
                                "log_residual_p10_p90": [lo, hi],
                                "interval_factor": [round(math.exp(-hi), 4), round(math.exp(-lo), 4)]}}
        FIT_FILE.write_text(json.dumps(shipped, indent=1))
        print(f"wrote {FIT_FILE}")


if __name__ == "__main__":
    main()
