"""The latency sections of a run report: every component before and after the passes, per target, and the
pipeline headline (optimised model at the recipe's steps vs the input at 50 steps), each from one code path.

``component_table`` is the one price of a component on a target: block_prune budgets against it and the
report prints it, so the two can never disagree.
"""

from __future__ import annotations

from typing import Any

#: steps the input model is compared at (SnapFusion's 85 s baseline: SD-v1.5, 50 steps, iPhone 14 Pro)
BASELINE_STEPS = 50


def component_table(graph, target):
    """Per-block latency table of a captured component on a target (the number every consumer uses)."""
    from snapopt.devices.latency import build_table

    return build_table(graph, target)


def _flag(target) -> str:
    return "" if target.calibrated else " (uncalibrated)"


def latency_report(targets, before, after) -> tuple[dict[str, Any], list[str]]:
    """Cost-model latency of every component before and after the passes, per target (see snapopt.devices)."""
    out: dict[str, Any] = {}
    lines = ["| target | profile | component | before ms | after ms | speed-up | largest block after |",
             "|---|---|---|---:|---:|---:|---|"]
    for t in targets:
        per = out.setdefault(t.id, {"profile": t.profile.name, "calibrated": t.calibrated, "components": {}})
        for comp, g in after.items():
            b, a = component_table(before[comp], t), component_table(g, t)
            top = max(a.blocks.values(), key=lambda x: x.us) if a.blocks else None
            per["components"][comp] = {"before_ms": round(b.total_ms, 3), "after_ms": round(a.total_ms, 3),
                                       "blocks_us": {n: round(x.us, 2) for n, x in a.blocks.items()}}
            lines.append(f"| {t.id}{_flag(t)} | {t.profile.name} | {comp} | {b.total_ms:.2f} | {a.total_ms:.2f} | "
                         f"{b.total_ms / max(a.total_ms, 1e-9):.2f}× | {top.name + f' ({top.us / 1e3:.2f} ms)' if top else '–'} |")
    return out, (lines if out else [])


def interval_factor() -> tuple[float, float]:
    """(low, high) multipliers of a prediction: 10th-90th percentile of cross-validated measured/predicted
    on the published unet_step and e2e rows (bench/latency_crossval.py); (1, 1) without a shipped fit."""
    from snapopt.devices.cost_model import shared_fit

    lo, hi = shared_fit().get("crossval", {}).get("interval_factor", [1.0, 1.0])
    return float(lo), float(hi)


def pipeline_latency(unet, text_encoder, decoder, target, steps: int) -> dict[str, float]:
    """End-to-end image time on ``target`` from captured components (snapopt.devices.fit.pipeline_ms, the
    formula the fit was made with), with the cross-validated interval."""
    from snapopt.devices.cost_model import coefficients_for
    from snapopt.devices.fit import pipeline_ms

    p = pipeline_ms(unet, text_encoder, decoder, target, coefficients_for(target), steps,
                    reduce_memory=target.device.chip.ram_gb <= 4)
    lo, hi = interval_factor()
    return p | {"low_ms": p["total_ms"] * lo, "high_ms": p["total_ms"] * hi, "calibrated": target.calibrated}


def pipeline_report(targets, before, after, steps: int, baseline_steps: int = BASELINE_STEPS) -> tuple[dict[str, Any], list[str]]:
    """The run report's headline: the optimised pipeline at ``steps`` against the input at ``baseline_steps``,
    per target, each with its interval. ``before``/``after``: component → block graph (unet, text_encoder,
    vae_decoder all needed; returns ({}, []) otherwise)."""
    need = ("unet", "text_encoder", "vae_decoder")
    if any(c not in before or c not in after for c in need):
        return {}, []
    out: dict[str, Any] = {}
    lines = [f"| target | profile | input, {baseline_steps} steps | optimised, {steps} steps | speed-up |", "|---|---|---:|---:|---:|"]
    for t in targets:
        b = pipeline_latency(before["unet"], before["text_encoder"], before["vae_decoder"], t, baseline_steps)
        a = pipeline_latency(after["unet"], after["text_encoder"], after["vae_decoder"], t, steps)
        out[t.id] = {"profile": t.profile.name, "calibrated": t.calibrated, "input": _round(b), "optimised": _round(a),
                     "speedup": round(b["total_ms"] / max(a["total_ms"], 1e-9), 2)}
        lines.append(f"| {t.id}{_flag(t)} | {t.profile.name} | {_s(b)} | {_s(a)} | {out[t.id]['speedup']:.1f}× |")
    lo, hi = interval_factor()
    lines.append("")
    lines.append(f"Intervals: 10th–90th percentile of the cost model's cross-validated error on published numbers "
                 f"(×{lo:.2f}–×{hi:.2f}; docs/cost-model.md).")
    return out, lines


def _round(p: dict) -> dict:
    return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in p.items()}


def _s(p: dict) -> str:
    return f"{p['total_ms'] / 1e3:.2f} s ({p['low_ms'] / 1e3:.2f}–{p['high_ms'] / 1e3:.2f})"
