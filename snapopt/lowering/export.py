"""Lower a pipeline's components for the recipe's targets: Core ML packages laid out as Apple's Swift pipeline
reads them (checked by :mod:`snapopt.lowering.apple_check`) and checked ONNX.

The Core ML folder is a Swift resources folder: ``Unet`` (or ``UnetChunk1``/``UnetChunk2`` when the target's
per-model limit requires), ``TextEncoder``, ``VAEDecoder``, optional ``VAEEncoder``, ``vocab.json``,
``merges.txt``, ``snapopt-apple.json`` (what an app must set) and ``README.txt`` (how to compile on a Mac).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snapopt.lowering.interfaces import Shapes


def int8_compute(target) -> bool:
    """Whether the target's Neural Engine computes int8 (A17 Pro and later: Apple quotes their TOPS at int8)."""
    return target.device.chip.ane_tops_precision == "int8" and target.ios_major >= 17


def compression_plan(spec, targets) -> dict[str, Any]:
    """Which weight compression the Core ML packages get, and why (explicit recipe bits win over the target).

    W8A8 is chosen only when every target computes int8 (:func:`int8_compute`); otherwise the plan falls back
    to int8 weights and says which target refused it."""
    from snapopt.lowering.spec import CompressionSpec

    c = spec.compression
    opts = {"quality": "psnr", "eval_prompts": 8, "eval_steps": 25}
    if isinstance(c, CompressionSpec):
        opts = {"quality": c.quality, "eval_prompts": c.eval_prompts, "eval_steps": c.eval_steps}
        src = "recipe export.compression"
        if c.scheme == "fp16":
            plan = {"scheme": "fp16", "bits": 16}
        elif c.scheme == "int8":
            plan = {"scheme": "int8", "bits": 8}
        elif c.scheme == "w8a8":
            plan = {"scheme": "w8a8", "bits": 8}
        elif c.scheme == "mixed":
            plan = {"scheme": "mixed", "bits": float(c.bits)}
        elif c.scheme == "int4":
            plan = {"scheme": "int4", "bits": 4, "block_size": getattr(c, "block_size", 0) or 32}
        else:
            g = c.group_size
            plan = {"scheme": "palettize" if not g else f"palettize_g{g}", "bits": int(c.bits), "group_size": g}
        plan = {**plan, "source": src}
    else:
        bits = spec.weight_bits
        source = "recipe export.weight_bits"
        if c == "auto" and bits == 16 and targets:
            bits = min(t.profile.weight_bits for t in targets)
            source = "target profile weight_bits"
        if c == "none":
            plan = {"scheme": "fp16", "bits": 16, "source": "recipe export.compression"}
        elif c == "int8":
            plan = {"scheme": "int8", "bits": 8, "source": "recipe export.compression"}
        elif c == "w8a8":
            plan = {"scheme": "w8a8", "bits": 8, "source": "recipe export.compression"}
        elif c == "int4":
            plan = {"scheme": "int4", "bits": 4, "block_size": 32, "source": "recipe export.compression"}
        elif c == "mixed":
            plan = {"scheme": "mixed", "bits": float(bits), "source": "recipe export.compression + weight_bits"}
        elif bits >= 16:
            plan = {"scheme": "fp16", "bits": 16, "source": source}
        else:
            scheme = "palettize" if spec.palettize_group_size == 0 else f"palettize_g{spec.palettize_group_size}"
            plan = {"scheme": scheme, "bits": bits, "group_size": spec.palettize_group_size, "source": source}
    if plan["scheme"] == "w8a8":
        refusing = [t for t in targets if not int8_compute(t)]
        if refusing:
            t = refusing[0]
            plan = {"scheme": "int8", "bits": 8, "source": plan["source"], "requested": "w8a8",
                    "refused": f"W8A8 refused: {t.id}'s {t.device.chip.name} computes fp16 on the Neural Engine (int8 "
                               "compute needs A17 Pro or later); int8 weights instead"}
    return {**plan, **opts}


def coreai_compression(spec, targets) -> dict[str, Any] | None:
    """The plan the Core AI assets get: the Core ML one where the recipe or the target asks for compression (or an
    explicit ``{scheme: fp16}``); None keeps today's fp32 assets."""
    from snapopt.lowering.spec import CompressionSpec

    comp = compression_plan(spec, targets)
    if comp["scheme"] == "fp16" and not isinstance(spec.compression, CompressionSpec):
        return None
    return comp


def coreai_lines(entries: list[dict[str, Any]], plan: dict[str, Any] | None) -> list[str]:
    """The report's Core AI section: one row per asset, with the compression check when there is one."""
    head = ("Apple's Core AI assets (coreai-torch), with the Core ML packages' interface names, fp32 inputs and outputs; "
            "checked by running each in coreai.runtime's Linux interpreter")
    if plan is None:
        return [head + ":", ""] + [
            f"- `{e['file']}`: {', '.join(e['inputs'])} → {', '.join(e['outputs'])}, {e['bytes'] / 1e6:.1f} MB"
            + (f", coreai.runtime vs torch rel err {e['coreai_runtime_relative_error']:.1e}" if "coreai_runtime_relative_error" in e else "")
            for e in entries]
    lines = [head + f". Weights {describe_compression(plan)}, compressed through coreai-opt; fp16 weights and compute "
             "elsewhere. PSNR / rel err: the asset in coreai.runtime against the fp32 torch model; sim rel err: coreai-opt's "
             "torch simulation of the scheme against fp32 torch; runtime vs sim: the asset against that simulation; "
             "bits/weight: coreai-opt's count over the compressible layers, LUT/scale overhead included.", "",
             "| asset | scheme | layers compressed | bits/weight | MB | PSNR dB | rel err | sim rel err | runtime vs sim |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        c = e.get("compression", {})
        chk = ("–", "–", "–", "–")
        if "coreai_runtime_psnr_db" in e:
            p = e["coreai_runtime_psnr_db"]
            chk = (f"{p:.1f}" if isinstance(p, float) else str(p), f"{e['coreai_runtime_relative_error']:.1e}",
                   f"{e['simulation_relative_error']:.1e}", f"{e['coreai_runtime_vs_simulation_relative_error']:.1e}")
        layers = f"{c['layers_compressed']}/{c['layers']}" if "layers_compressed" in c else str(c.get("layers", 0))
        lines.append(f"| `{e['file']}` | {c.get('scheme', '–')} | {layers} | {c.get('measured_bits', c.get('weight_bits', 16)):g} | "
                     f"{e['bytes'] / 1e6:.2f} | " + " | ".join(chk) + " |")
    lines += [""] + sorted({f"- {e['compression']['scheme']}: {e['compression']['description']}." for e in entries if "compression" in e})
    if plan.get("refused"):
        lines.append(f"- {plan['refused']}.")
    return lines


def describe_compression(comp: dict[str, Any]) -> str:
    if comp["scheme"] == "fp16":
        return f"fp16; {comp['source']}"
    bits = f"{comp['bits']:g}-bit average" if comp["scheme"] == "mixed" else f"{comp['bits']}-bit"
    text = f"{comp['scheme']} {bits}; {comp['source']}"
    return text + (f" ({comp['refused']})" if comp.get("refused") else "")


def component_bits(pipe, comp: dict[str, Any]) -> dict[str, float]:
    """Stored bits per weight of each lowered component under ``comp`` (the UNet's average for a mixed recipe)."""
    from snapopt.lowering.compression import stored_bits
    from snapopt.lowering.coreml import uniform_bits

    other = {"fp16": 16.0, "int8": 8.0, "w8a8": 8.0}.get(comp["scheme"])
    if other is None:
        other = float(uniform_bits(comp["bits"]) if comp["scheme"] == "mixed" else comp["bits"])
    unet = stored_bits(pipe.unet, comp) if comp["scheme"] == "mixed" and "recipe" in comp else other
    return {"unet": unet, "text_encoder": other, "vae_decoder": other}


def per_model_limit_mb(targets) -> float | None:
    return min((t.device.max_weights_per_model_mb for t in targets), default=None)


def should_chunk(spec, unet, bits: int, targets) -> tuple[bool, str]:
    from snapopt.lowering.chunking import weight_bytes

    size = weight_bytes(unet, bits)
    limit = per_model_limit_mb(targets)
    if spec.chunk_unet is True:
        return True, "recipe export.chunk_unet: true"
    if spec.chunk_unet is False:
        return False, "recipe export.chunk_unet: false"
    if limit is None:
        return False, "no target"
    over = size > limit * 1e6
    return over, f"UNet weights {size / 1e6:.1f} MB at {bits} bits {'>' if over else '≤'} {limit:g} MB per-model limit"


def chunk_lines(info: dict[str, Any] | None) -> list[str]:
    if not info:
        return []
    if not info["chunked"]:
        return [f"- UNet not chunked: {info['reason']}."]
    line = (f"- UNet chunked ({info['reason']}): cut before `{info['cut_before']}`, {info['params'][0]:,} + {info['params'][1]:,} "
            f"parameters; chunk1∘chunk2 vs UNet in torch: rel err {info['torch_compose_relative_error']:.1e}")
    if "onnxruntime_compose_relative_error" in info:
        line += f", in ONNX Runtime: {info['onnxruntime_compose_relative_error']:.1e}"
    return [line + "."]


def _onnx_jobs(wanted, ios, plan) -> list[tuple[str, str, str | None, Any]]:
    """(stage label, component, file name, interface) per ONNX file: a chunked UNet gives two."""
    jobs = []
    for c in wanted:
        if c == "unet" and plan is not None:
            from snapopt.lowering.chunking import CHUNK_NAMES

            jobs += [(f"export {name} to ONNX", c, name, io) for name, io in zip(CHUNK_NAMES, plan.io)]
        else:
            jobs.append((f"export {c} to ONNX", c, None, ios[c]))
    return jobs


def lower_exports(pipe, resolved, shapes: Shapes, folder: Path, stage, *, parallel: bool | None = None,
                  graphs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Lower ``pipe`` as the recipe's ``export`` section asks, inside ``stage`` (the run's timed progress stages).

    Each component is traced once (``torch.export``) for both Core ML and ONNX. ``parallel`` (default: on with
    :data:`snapopt.lowering.parallel.MIN_CPUS` cores or more) runs the ONNX exports in a worker process while Core ML
    lowers here: their stage timings then overlap (``result["parallel"]`` says so) and each trace is the worker's own.
    ``graphs``: the pipeline's block graphs at ``shapes`` when the caller has them (the pass manager's last captures),
    so the report's measurements do not capture the components again."""
    from snapopt.lowering import apple, onnx
    from snapopt.lowering.parallel import OnnxWorker, use_worker

    spec = resolved.recipe.export
    wanted = [c for c in spec.components if c in pipe.components()]
    result: dict[str, Any] = {"coreml": [], "onnx": [], "resources": [], "sections": []}
    if spec.coreai:
        result["coreai"] = []
    targets = list(resolved.targets)
    cplan = coreai_compression(spec, targets) if spec.coreai and wanted else None
    if cplan is not None:  # a scheme Core AI cannot lower fails before any lowering starts
        from snapopt.lowering.coreai_compress import check_plan

        check_plan(cplan)
    chunked, plan = False, None
    if "unet" in wanted and (spec.coreml or spec.onnx):
        comp = compression_plan(spec, targets)
        chunked, why = should_chunk(spec, pipe.unet, comp["bits"], targets)
        result["unet_chunking"] = {"chunked": chunked, "reason": why}
        if chunked and pipe.prediction_type != "epsilon":
            from snapopt.errors import LoweringError

            raise LoweringError(f"cannot chunk a {pipe.prediction_type} UNet: its epsilon re-expression needs sample and timestep in "
                                "the last chunk, which UnetChunk2 does not take; export it unchunked (export.chunk_unet: false)")
        if chunked:
            from snapopt.lowering.chunking import compose_error, plan_chunks

            with stage("plan UNet chunks"):
                plan = plan_chunks(pipe, shapes, io_fn=apple.apple_io)
                result["unet_chunking"].update(cut_before=plan.stage, params=list(plan.params),
                                               torch_compose_relative_error=compose_error(pipe, plan, shapes))
    ios: dict[str, Any] = {}
    worker = None
    if spec.onnx and wanted:
        if pipe.structure_only:
            from snapopt.errors import LoweringError

            raise LoweringError(f"cannot export '{wanted[0]}' of a structure-only model to ONNX: load it with weights")
        ios = {c: apple.apple_io(pipe, c, shapes) for c in wanted}
        if parallel is None:
            weights = sum(t.numel() * t.element_size() for io in ios.values() for t in io.module.state_dict().values())
            parallel = bool(spec.coreml or spec.coreai) and use_worker(weight_bytes=weights)
        if parallel:
            worker = OnnxWorker(_onnx_jobs(wanted, ios, plan), folder / "onnx", check=spec.onnx_check, stage=stage).start()
            result["parallel"] = {"onnx_worker": True, "note": "ONNX exports ran in a worker process alongside the Core ML / "
                                  "Core AI lowering: their stage timings overlap those stages' (wall time each)"}
    captures: dict[str, Any] | None = {} if worker is None and spec.onnx else None
    try:
        _lower_apple(pipe, resolved, shapes, folder, stage, wanted, targets, plan, cplan, ios, captures, result, graphs or {})
    except BaseException:
        if worker is not None:
            worker.close()
        raise
    if spec.onnx and wanted:
        if worker is not None:
            with stage("wait for the ONNX export worker"):
                infos = worker.join()
        else:
            infos = []
            for label, c, name, io in _onnx_jobs(wanted, ios, plan):
                with stage(label):
                    infos.append(onnx.export_io(io, c, folder / "onnx", check=spec.onnx_check, name=name,
                                                program=captures.get(c) if name is None else None))
        for info in infos:
            info["file"] = str(Path(info.pop("path")).relative_to(folder.parent))
            result["onnx"].append(info)
        if plan is not None and spec.onnx_check:
            from snapopt.lowering.chunking import onnx_compose_error

            with stage("check UNet chunks composed in ONNX Runtime"):
                err = onnx_compose_error(pipe, shapes, folder / "onnx")
            result["unet_chunking"]["onnxruntime_compose_relative_error"] = err
    return result


def _lower_apple(pipe, resolved, shapes, folder, stage, wanted, targets, plan, cplan, ios, captures, result, graphs) -> None:
    """The Core ML resources folder and the Core AI assets, lowering ``ios``' interfaces where given. ``captures``
    (a dict) keeps each component's ``torch.export`` capture for the ONNX export that follows in this process."""
    from snapopt.lowering import apple, coreml
    from snapopt.lowering.interfaces import PACKAGE_NAMES

    spec = resolved.recipe.export
    if spec.coreml and wanted:
        target = min(targets, key=lambda t: t.ios_major) if targets else None
        deployment = target.coreml_deployment_target() if target else None
        result["coreml_deployment_target"] = deployment.name if deployment is not None else "iOS16"
        comp = compression_plan(spec, targets)
        if comp["scheme"] == "int4":
            from snapopt.errors import UsageError

            raise UsageError("export.compression: int4 (per-block int4 weights) is a Core AI scheme (coreai-opt); "
                             "set export.coreml: false or pick palettize/int8/mixed/w8a8 for Core ML")
        if comp["scheme"] in ("mixed", "w8a8") and "unet" in wanted:
            from snapopt.lowering.schemes import prepare_scheme

            with stage(f"analyse UNet for {comp['scheme']} compression"):
                comp = prepare_scheme(pipe, shapes, comp, folder)
        result["compression"] = comp
        res = folder / "coreml"
        kw = dict(deployment_target=deployment, compression=comp,
                  compute_units=target.profile.compute_units if target else "CPU_AND_NE")
        for c in wanted:
            jobs = [(PACKAGE_NAMES[c], None)]
            if c == "unet" and plan is not None:
                from snapopt.lowering.chunking import CHUNK_NAMES

                jobs = list(zip(CHUNK_NAMES, plan.io))
            for name, io in jobs:
                with stage(f"lower {name} to Core ML"):
                    program = None
                    if io is None and c in ios:
                        io = ios[c]
                        if captures is not None:
                            from snapopt.capture.export import export_component

                            program = captures[c] = export_component(io)
                    info = coreml.lower_component(pipe, c, shapes, res, name=name, io=io, program=program, **kw)
                    info["file"] = str(Path(info.pop("path")).relative_to(folder.parent))
                    result["coreml"].append(info)
        if pipe.tokenizer is not None:
            from snapopt.lowering.swift_tokenizer import probe_prompts, write_swift_tokenizer

            with stage("write Swift tokenizer resources"):
                tok = write_swift_tokenizer(pipe.tokenizer, res, probe_prompts(pipe))
            result["resources"] = ["vocab.json", "merges.txt"]
        else:
            tok = None
        settings = apple.app_settings(pipe, tok, shapes.batch)
        unet_files = [e["package"] for e in result["coreml"] if e["component"] == "unet"]
        lines = apple.app_lines(settings, tok, unet_files)
        meta = {"format": "snapopt-apple/1", "source": pipe.source, "app": settings, "tokenizer": tok,
                "text_vocab_size": int(pipe.text_encoder.config.vocab_size) if pipe.text_encoder is not None else None,
                "compression": comp, "unet_chunking": result.get("unet_chunking"),
                "packages": {e["package"]: {k: e[k] for k in ("component", "inputs", "outputs", "bytes")} for e in result["coreml"]}}
        apple.write_metadata(res, meta)
        apple.write_readme(res, settings, lines)
        result["resources"] += [apple.METADATA_FILE, apple.README_FILE]
        result["apple"] = {k: v for k, v in meta.items() if k not in ("packages", "tokenizer")}
        if tok is not None:
            result["apple"]["tokenizer"] = {k: v for k, v in tok.items() if k != "expected"}
        total = sum(e["bytes"] for e in result["coreml"])
        result["sections"].append({"title": "Apple Swift pipeline", "lines": [
            f"Core ML resources folder `{res.relative_to(folder.parent)}` ({total / 1e6:.1f} MB, "
            f"weights {describe_compression(comp)}). "
            "What an app using Apple's ml-stable-diffusion must set:", "", *lines, *chunk_lines(result.get("unet_chunking"))]})
        from snapopt.lowering.schemes import compression_section

        with stage("measure the compression scheme"):
            result["compression_report"], lines = compression_section(pipe, shapes, comp, result["coreml"], targets,
                                                                      graph=graphs.get("unet") if shapes.batch == 2 else None)
        apple_section = result["sections"][-1]
        result["sections"].append({"title": "Compression per target", "lines": lines})
        if spec.memory_fit and targets and {"unet", "vae_decoder", "text_encoder"} <= set(pipe.components()):
            from snapopt.devices.memory import memory_report

            with stage("predict memory fit per target"):
                result["memory_fit"], mlines = memory_report(pipe, shapes, targets, component_bits(pipe, comp))
            result["sections"].append({"title": "Memory fit per target", "lines": mlines})
        if spec.apple_check:
            from snapopt.lowering.apple_check import check_apple

            with stage("check the export against Apple's Swift pipeline"):
                problems, notes = check_apple(res, components=wanted)
            result["apple_check"] = {"passed": not problems, "problems": problems, "notes": notes}
            apple_section["lines"] += ["", f"`snapopt check apple`: {'passed' if not problems else 'FAILED'} "
                                                f"({len(notes)} checks)" + "".join(f"\n- {p}" for p in problems)]
            if problems:
                from snapopt.errors import LoweringError

                raise LoweringError(f"the Core ML export does not conform to Apple's Swift pipeline: {problems[0]}")
    if spec.coreai and wanted:
        from snapopt.lowering import coreai

        if cplan is not None:
            if cplan["scheme"] == "mixed" and "unet" in wanted:
                if "recipe" in result.get("compression", {}):
                    cplan = result["compression"]
                else:
                    from snapopt.lowering.schemes import prepare_scheme

                    with stage("analyse UNet for mixed compression"):
                        cplan = prepare_scheme(pipe, shapes, cplan, folder)
            result["coreai_compression"] = {k: v for k, v in cplan.items() if k not in ("recipe", "act_scales")}
        for c in wanted:
            with stage(f"lower {c} to Core AI" + (f" ({cplan['scheme']} through coreai-opt)" if cplan else "")):
                info = coreai.lower_component(pipe, c, shapes, folder / "coreai", check=spec.coreai_check, compression=cplan)
                info["file"] = str(Path(info.pop("path")).relative_to(folder.parent))
                result["coreai"].append(info)
        result["sections"].append({"title": "Core AI", "lines": coreai_lines(result["coreai"], cplan)})

