"""The run report: one JSON document, rendered to markdown tables for people."""

from __future__ import annotations

from typing import Any


def _g(n: int | float) -> str:
    return f"{n / 1e9:.2f} G"


def _m(n: int | float) -> str:
    return f"{n / 1e6:.2f} M"


def _brief(value: Any) -> str:
    """A stats value for a table cell; long structures stay in report.json."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        if any(isinstance(v, (dict, list)) for v in value):
            return f"{len(value)} entries (see report.json)"
        return ", ".join(map(str, value)) or "–"
    if isinstance(value, dict):
        return f"{len(value)} entries (see report.json)" if value else "–"
    return str(value)


def block_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| block | kind | params | MACs | attention MACs | output |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | {r['params']:,} | {_g(r['macs'])} | {_g(r['attention_macs'])} | "
                     f"{'×'.join(map(str, r['out_shape']))} |")
    return lines


#: quality metrics in the report: (key, label, higher is better)
QUALITY_METRICS = (("fid", "FID", False), ("clip_score", "CLIP score", True), ("attribute_accuracy", "attribute accuracy", True),
                   ("shape_accuracy", "shape", True), ("colour_accuracy", "colour", True), ("position_accuracy", "position", True))


def quality_section(q: dict[str, Any] | None) -> list[str]:
    """Quality retained: the output at the recipe's steps vs the input at its steps, and the sample grid."""
    if not q:
        return []
    t, s = q["teacher"], q["student"]
    out = ["## Quality retained", "",
           f"{q['prompts']} held-out snapshapes prompts, CFG {q['cfg']}, seed {q['seed']}, the same initial noise for both "
           "(DDIM; FID on so few images is only comparable between these two rows).", "",
           f"| metric | input, {t['steps']} steps | output, {s['steps']} steps | retained |", "|---|---:|---:|---:|"]
    for key, label, higher in QUALITY_METRICS:
        if key not in t or key not in s:
            continue
        a, b = float(t[key]), float(s[key])
        pct = key.endswith("accuracy")
        fmt = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.2f}")
        retained = f"{100 * b / a:.0f}%" if higher and a > 0 else f"{b - a:+.2f}"
        out.append(f"| {label} | {fmt(a)} | {fmt(b)} | {retained} |")
    out.append(f"| seconds per image (this machine) | {t['seconds_per_image']:.2f} | {s['seconds_per_image']:.2f} | |")
    if q.get("grid"):
        out += ["", f"Samples, prompt by prompt: input ({t['steps']} steps) in the upper row of each pair, output "
                f"({s['steps']} steps) below it.", "", f"![input above, output below]({q['grid']})"]
    return out + [""]


def recipe_section(report: dict[str, Any]) -> list[str]:
    """The ``--set`` overrides and the effective recipe they gave (what reproduces the run), folded away."""
    import yaml

    sets = report.get("overrides") or []
    out = ["## Recipe", ""]
    if sets:
        out += ["Overrides (`snapopt apply --set`, in order): " + ", ".join(f"`{s}`" for s in sets), ""]
    out += ["<details><summary>Effective recipe (defaults filled in, overrides applied; also recipe.resolved.yaml)</summary>", "",
            "```yaml", yaml.safe_dump(report["recipe"], sort_keys=False).rstrip(), "```", "", "</details>", ""]
    return out


def render_markdown(report: dict[str, Any]) -> str:
    out = [f"# snapopt run: {report['recipe']['name']}", ""]
    out += [f"- model: `{report['model']['source']}` at {report['shapes']['resolution']}² (UNet batch {report['shapes']['batch']})",
            f"- targets: {', '.join(t['id'] for t in report['targets'])}",
            f"- wall time: {report['seconds']:.1f} s"]
    if report.get("overrides"):
        out.append(f"- overrides: {', '.join(f'`--set {s}`' for s in report['overrides'])} (effective recipe under Recipe)")
    out.append("")
    out += ["## Components", "", "| component | params before | params after | MACs before | MACs after | blocks after |",
            "|---|---:|---:|---:|---:|---:|"]
    for comp, c in report["components"].items():
        out.append(f"| {comp} | {c['before']['params']:,} | {c['after']['params']:,} | {_g(c['before']['macs'])} | "
                   f"{_g(c['after']['macs'])} | {c['after']['blocks']} |")
    out.append("")
    if report["passes"]:
        out += ["## Passes", "", "| # | pass | modified | component | params | MACs | blocks | verification | s |",
                "|---:|---|---|---|---|---|---|---|---:|"]
        for i, p in enumerate(report["passes"]):
            for comp, ch in p["changes"].items():
                v = p["verification"].get(comp, {})
                ver = (f"{'exact' if p.get('exact') else 'divergence'}: rel err {v['relative_error']:.2e}" if "relative_error" in v else ""
                       ) if "relative_error" in v else ("runs, finite" if v.get("runs") is True else str(v.get("runs", "")))
                removed = f"{ch['blocks_before']} → {ch['blocks_after']}"
                out.append(f"| {i} | {p['pass']} | {p['modified']} | {comp} | {_m(ch['params_before'])} → {_m(ch['params_after'])} | "
                           f"{_g(ch['macs_before'])} → {_g(ch['macs_after'])} | {removed} | {ver} | {p['seconds']:.2f} |")
            if p["stats"]:
                stats = "; ".join(f"{k}: {_brief(v)}" for k, v in p["stats"].items())
                out.append(f"|  | ↳ {stats} |||||||")
            if p.get("phases"):  # where the pass's seconds went
                named = sum(p["phases"].values())
                parts = [f"{k} {v:.1f}" for k, v in sorted(p["phases"].items(), key=lambda kv: -kv[1])]
                out.append(f"|  | ↳ time (s): {', '.join(parts)}, other {max(p['seconds'] - named, 0):.1f} |||||||")
        out.append("")
    out += quality_section(report.get("quality"))
    sched = report.get("scheduler")
    if sched:
        note = "the input's" if sched["same"] else f"changed from the input's {sched['input']}"
        out += ["## Scheduler", "", f"The saved model ships `{sched['output']}` ({note}).", ""]
    for section in report.get("extra_sections", []):
        out += [f"## {section['title']}", "", *section["lines"], ""]
    ex = report.get("exports", {})
    if ex.get("coreml") or ex.get("onnx") or ex.get("coreai"):
        out += ["## Exports", "", "| format | component | file | size | interface | check |", "|---|---|---|---:|---|---|"]
        for e in ex.get("coreml", []):
            names = ", ".join(e["inputs"]) + " → " + ", ".join(e["outputs"])
            out.append(f"| Core ML | {e['component']} | {e['file']} | {e['bytes'] / 1e6:.1f} MB | {names} | spec v{e['specification_version']} |")
        for e in ex.get("onnx", []):
            check = f"onnxruntime rel err {e['onnxruntime_relative_error']:.2e}" if "onnxruntime_relative_error" in e else "–"
            out.append(f"| ONNX | {e['component']} | {e['file']} | {e['bytes'] / 1e6:.1f} MB | | {check} |")
        for e in ex.get("coreai", []):
            check = f"coreai.runtime rel err {e['coreai_runtime_relative_error']:.2e}" if "coreai_runtime_relative_error" in e else "–"
            out.append(f"| Core AI | {e['component']} | {e['file']} | {e['bytes'] / 1e6:.1f} MB | "
                       f"{', '.join(e['inputs'])} → {', '.join(e['outputs'])} | {check} |")
        if ex.get("resources"):
            out += ["", f"Core ML resources also hold: {', '.join(ex['resources'])}. Compile the packages on a Mac "
                    "(`xcrun coremlcompiler compile X.mlpackage .`) for Apple's Swift StableDiffusionPipeline."]
        out.append("")
    out += recipe_section(report)
    out += ["## Blocks after optimisation", ""]
    for comp, c in report["components"].items():
        out += [f"### {comp}", "", *block_table(c["blocks"]), ""]
    return "\n".join(out)
