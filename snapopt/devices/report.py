"""The latency section of a run report: every component before and after the passes, per target."""

from __future__ import annotations

from typing import Any


def latency_report(targets, before, after) -> tuple[dict[str, Any], list[str]]:
    """Cost-model latency of every component before and after the passes, per target (see snapopt.devices)."""
    from snapopt.devices.latency import build_table

    out: dict[str, Any] = {}
    lines = ["| target | profile | component | before ms | after ms | speed-up | largest block after |",
             "|---|---|---|---:|---:|---:|---|"]
    for t in targets:
        per = out.setdefault(t.id, {"profile": t.profile.name, "components": {}})
        for comp, g in after.items():
            b, a = build_table(before[comp], t), build_table(g, t)
            top = max(a.blocks.values(), key=lambda x: x.us) if a.blocks else None
            per["components"][comp] = {"before_ms": round(b.total_ms, 3), "after_ms": round(a.total_ms, 3),
                                       "blocks_us": {n: round(x.us, 2) for n, x in a.blocks.items()}}
            lines.append(f"| {t.id} | {t.profile.name} | {comp} | {b.total_ms:.2f} | {a.total_ms:.2f} | "
                         f"{b.total_ms / max(a.total_ms, 1e-9):.2f}× | {top.name + f' ({top.us / 1e3:.2f} ms)' if top else '–'} |")
    return out, (lines if out else [])
