"""Each compression scheme measured: stored bits, package size, predicted UNet latency per target (the cost
model, priced at the scheme's stored bits) and quality with the scheme's weights simulated in torch (UNet output
PSNR against fp; FID / CLIP / attributes on held-out snapshapes prompts when the recipe asks).

Used by the export (the report's "Compression per target" section) and by ``bench/compression_schemes.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from snapopt.lowering import compression as cmp
from snapopt.lowering.interfaces import Shapes


def probe_for(pipe, shapes: Shapes) -> cmp.UnetProbe:
    return cmp.UnetProbe.prepare(pipe, latent=shapes.latent(pipe))


def prepare_scheme(pipe, shapes: Shapes, comp: dict[str, Any], folder: Path | None = None, *,
                   probe: cmp.UnetProbe | None = None, sens: cmp.Sensitivity | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """What a per-layer scheme needs before lowering: the mixed-bit recipe (sensitivity analysis, written to
    ``<folder>/compression_sensitivity.json``) or W8A8's activation scales (calibrated in torch)."""
    probe = probe or probe_for(pipe, shapes)
    if comp["scheme"] == "mixed":
        sens = sens or cmp.sensitivity(pipe.unet, probe, progress=progress)
        recipe, threshold = cmp.allocate(sens, comp["bits"])
        comp = {**comp, "recipe": recipe, "psnr_threshold_db": round(threshold, 3),
                "average_bits": round(cmp.average_bits(recipe, {**sens.sizes, **sens.fixed}), 3),
                "analysed_layers": len(sens.psnr), "fixed_layers": len(sens.fixed), "fixed_width": cmp.fixed_width(comp["bits"]),
                "bits_histogram": {str(b): sum(1 for v in recipe.values() if v == b) for b in sorted(set(recipe.values()))}}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "compression_sensitivity.json").write_text(json.dumps(
                {"target_bits": comp["bits"], "threshold_db": comp["psnr_threshold_db"], "recipe": recipe, **sens.to_json()}, indent=1))
            comp["sensitivity_file"] = "compression_sensitivity.json"
    elif comp["scheme"] == "w8a8":
        comp = {**comp, "act_scales": cmp.calibrate_activations(pipe.unet, [probe.inputs]),
                "calibration": f"{probe.inputs[0].shape[0]} UNet inputs (prompts x timesteps), max |x| per layer input"}
    return comp


def retarget(target, bits: float, activation_bits: int = 16):
    """``target`` with its profile's weights at ``bits`` (fractional for a mixed scheme's average) and activations
    at ``activation_bits``: how the cost model prices a compression scheme, through its public profile fields."""
    update = {"weight_bits": bits, "activation_bits": activation_bits}
    return target.model_copy(update={"profile": target.profile.model_copy(update=update)})


def unet_latency_ms(graph, targets, bits: float, activation_bits: int = 16) -> dict[str, float]:
    from snapopt.devices.report import component_table

    return {t.id: round(component_table(graph, retarget(t, bits, activation_bits)).total_ms, 3) for t in targets}


def measure(pipe, comp: dict[str, Any], probe: cmp.UnetProbe, graph, targets, *, package_mb: dict[str, float] | None = None,
            say: Callable[[str], None] | None = None) -> cmp.SchemeResult:
    """One scheme: stored bits, PSNR of the simulated UNet, predicted UNet latency per target, optional eval."""
    sim = cmp.simulate(pipe.unet, comp, comp.get("act_scales"))
    bits = cmp.stored_bits(pipe.unet, comp)
    res = cmp.SchemeResult(scheme=label(comp), bits=round(bits, 3), psnr_db=round(probe.psnr(sim), 2),
                           latency_ms=unet_latency_ms(graph, targets, bits, 8 if comp["scheme"] == "w8a8" else 16)
                           if graph is not None else {})
    res.package_mb = package_mb if package_mb is not None else predicted_mb(pipe, bits)
    if comp["scheme"] == "w8a8":
        res.notes.append("latency priced with int8 convolutions/matmuls at the chip's int8 rate where its Neural Engine has one "
                         "(A17 Pro+), else as int8 weights")
    if comp.get("quality") == "eval":
        from snapopt.quality import snapshapes_model

        if snapshapes_model(pipe):
            res.quality = eval_quality(pipe, sim, comp, say=say)
        else:
            res.notes.append("quality: eval needs a zoo:snapshapes model; PSNR only")
    return res


_FP_EVALS: dict[tuple, dict] = {}


def eval_quality(pipe, sim_unet, comp: dict[str, Any], say=None) -> dict[str, Any]:
    """FID / CLIP / attributes of the pipeline with the simulated UNet against the input, same held-out prompts
    and initial noise (the input's scores are computed once per pipeline, prompts and steps)."""
    from snapopt.zoo import evaluate as zev

    steps, n = comp.get("eval_steps", 25), comp.get("eval_prompts", 8)
    key = (id(pipe), steps, n)

    def run(p):
        r = zev.evaluate(p.to_diffusers(), steps=steps, n_prompts=n, seed=0)
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}

    if key not in _FP_EVALS:
        if say:
            say(f"quality: fp pipeline, {n} prompts x {steps} steps")
        _FP_EVALS[key] = run(pipe)
    student = pipe.clone()
    student.unet = sim_unet
    if say:
        say(f"quality: {label(comp)}, {n} prompts x {steps} steps")
    return {"steps": steps, "prompts": n, "fp": _FP_EVALS[key], "compressed": run(student)}


def predicted_mb(pipe, bits: float) -> dict[str, float]:
    """UNet package size predicted from its weights: compressible layers at ``bits``, the rest at fp16."""
    layers = cmp.quantizable(pipe.unet)
    q = sum(m.weight.numel() for _, m in layers)
    total = sum(p.numel() for p in pipe.unet.parameters())
    return {"unet (predicted)": round((q * bits + (total - q) * 16) / 8 / 1e6, 3)}


def label(comp: dict[str, Any]) -> str:
    s = comp["scheme"]
    if s == "mixed":
        return f"mixed {comp['bits']:g}"
    if s.startswith("palettize"):
        return f"{s} {comp['bits']}-bit"
    return s


def compression_section(pipe, shapes: Shapes, comp: dict[str, Any], coreml_entries: list[dict], targets, *,
                        graph=None) -> tuple[dict, list[str]]:
    """The report section: the exported scheme against fp16, per target. ``graph``: the UNet's block graph at
    batch 2 when the caller has it (the pass manager's last capture), so the UNet is not captured again."""
    t0 = time.perf_counter()
    probe = probe_for(pipe, shapes)
    if targets and graph is None:
        from snapopt.capture import block_graph

        graph = block_graph(pipe, "unet", Shapes(resolution=shapes.resolution, batch=2))
    sizes = {e["package"]: round(e["bytes"] / 1e6, 3) for e in coreml_entries if e["component"] == "unet"}
    all_mb = sum(e["bytes"] for e in coreml_entries) / 1e6
    got = measure(pipe, comp, probe, graph, targets, package_mb=sizes)
    # an fp16 export is its own reference: measured once (the simulation and the probe's UNet forward are the cost)
    ref = got if comp["scheme"] == "fp16" else measure(pipe, {"scheme": "fp16", "bits": 16}, probe, graph, targets)
    rows = [got] if got.scheme == ref.scheme else [ref, got]  # an fp16 export is its own reference
    out = {"exported": got.to_json(), "fp16": ref.to_json(), "seconds": round(time.perf_counter() - t0, 1)}
    lines = [f"Weights {label(comp)} ({comp['source']}); quality = UNet output PSNR against fp with the scheme's weights "
             f"simulated in torch ({probe.inputs[0].shape[0]} inputs: prompts x timesteps); latency = cost model, UNet per "
             "call, priced at the stored bits.", ""]
    if comp.get("refused"):
        lines += [f"- {comp['refused']}.", ""]
    head = "| scheme | UNet avg bits | UNet package MB | UNet PSNR dB |" + "".join(f" {t.id} UNet ms |" for t in targets)
    lines += [head, "|---|---:|---:|---:|" + "---:|" * len(targets)]
    for r in rows:
        mb = sum(r.package_mb.values())
        pk = f"{mb:.2f}" + (" (predicted)" if any("predicted" in k for k in r.package_mb) else "")
        name = f"{r.scheme} (exported)" if r is got else f"{r.scheme} (reference)"
        lines.append(f"| {name} | {r.bits:g} | {pk} | {r.psnr_db:.1f} |" + "".join(f" {r.latency_ms[t.id]:.2f} |" for t in targets))
    lines += ["", f"- All exported packages: {all_mb:.2f} MB ({', '.join(sorted({e['component'] for e in coreml_entries}))})."]
    if comp["scheme"] == "mixed":
        lines += [f"- mixed-bit recipe: {comp.get('bits_histogram')} layers per width, single-layer PSNR threshold "
                      f"{comp.get('psnr_threshold_db')} dB, average {comp.get('average_bits')} bits "
                      f"(`{comp.get('sensitivity_file', '')}`)."]
    for r in rows:
        lines += [f"- {r.scheme}: {n}." for n in r.notes]
        if r.quality:
            q = r.quality
            lines.append(f"- {r.scheme} on {q['prompts']} held-out prompts at {q['steps']} steps: FID {q['fp']['fid']:.1f} → "
                         f"{q['compressed']['fid']:.1f}, CLIP {q['fp']['clip_score']:.3f} → {q['compressed']['clip_score']:.3f}, "
                         f"attributes {q['fp'].get('attribute_accuracy', float('nan')):.3f} → "
                         f"{q['compressed'].get('attribute_accuracy', float('nan')):.3f}.")
    return out, lines
