"""``snapopt apply``: the pipeline as one readable function of named stages.

load → capture (baseline IR) → passes (verified) → save → lower (Core ML, ONNX) → report.
Everything is written into a hidden work folder beside the destination (``.NAME.work``) and renamed into place
at the end, so a failed run leaves no half-written output and never touches its inputs.

The work folder is also what makes a run resumable (``resume=True``, ``snapopt apply --resume``): see
:mod:`snapopt.work_folder`.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from snapopt.capture import block_graph
from snapopt.core import PassContext, PassManager
from snapopt.checks.model import check_pipeline_outputs, check_pipeline_weights
from snapopt.checks.output import check_output_dir
from snapopt.errors import UsageError, raise_pending_signal
from snapopt.devices.report import latency_report, pipeline_report
from snapopt.lowering.export import lower_exports
from snapopt.lowering.interfaces import Shapes
from snapopt.models.loading import load_model
from snapopt.recipe import ResolvedRecipe
from snapopt.work_folder import WorkFolder, file_sha256, plugin_files

Stage = Callable[[str], Any]


@dataclass
class RunResult:
    out_dir: Path
    report: dict[str, Any]
    pipeline: Any = None
    timings: dict[str, float] = field(default_factory=dict)


def apply(resolved: ResolvedRecipe, out_dir: Path, *, overwrite: bool = False, resume: bool = False,
          progress: Callable[[str], None] | None = None, argv: list[str] | None = None) -> RunResult:
    """Run a validated recipe and write the run folder ``out_dir`` atomically.

    ``resume``: continue the work folder a killed run of the same recipe and model left (or start one), and
    keep it if this run fails or is interrupted. Without it a leftover work folder is an error (``overwrite``
    discards it), and a failed run removes its work folder. ``deterministic: true`` holds for the whole run, from
    before the model loads (cuBLAS fixes its workspace at its first matmul), and is undone afterwards."""
    from snapopt.train.accel import deterministic_kernels

    with deterministic_kernels(resolved.recipe.deterministic):
        return _apply(resolved, out_dir, overwrite=overwrite, resume=resume, progress=progress, argv=argv)


def _apply(resolved: ResolvedRecipe, out_dir: Path, *, overwrite: bool, resume: bool,
           progress: Callable[[str], None] | None, argv: list[str] | None) -> RunResult:
    recipe = resolved.recipe
    report_progress = progress or (lambda msg: None)

    def say(msg: str) -> None:
        raise_pending_signal()  # a Ctrl-C that landed in a library's __del__ was swallowed: stop here instead
        report_progress(msg)

    out_dir = Path(out_dir)
    check_export_dependencies(recipe)
    check_output_dir(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = WorkFolder.open(out_dir, resolved, resume=resume, overwrite=overwrite)  # checks only: removes nothing of a resumable run
    tmp = work.path
    timings: dict[str, float] = {}
    started = time.perf_counter()

    @contextmanager
    def stage(name: str):
        say(name)
        t0 = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - t0, 3)

    try:
        with stage("load model"):
            pipe = load_model(recipe.model, seed=recipe.seed, resolution=recipe.resolution)
            check_pipeline_weights(pipe)  # every component, not only those a pass touches
        shapes = Shapes(resolution=pipe.resolution, batch=recipe.batch)
        with stage("check model outputs"):
            check_pipeline_outputs(pipe, shapes, recipe.seed)
        components = [c for c in ("unet", "vae_decoder", "text_encoder") if c in pipe.components()]

        with stage("capture baseline"):
            before = {c: block_graph(pipe, c, shapes) for c in components}

        # The manager hands passes copies of what they touch, so the loaded pipeline stays the teacher.
        ctx = PassContext(shapes=shapes, seed=recipe.seed, work_dir=tmp, targets=resolved.targets, teacher=pipe)
        graphs, done = dict(before), []
        if work.finished_passes:
            with stage("resume"):
                pipe, done = work.restore(pipe, ctx)
                for comp in sorted({c for r in done for c in r.changes}):
                    graphs[comp] = block_graph(pipe, comp, shapes)  # what the manager held after those passes
                work.restore_rng()
            say(f"resumed after pass {len(done)}/{len(resolved.passes)}: {done[-1].name}")
        work.bind(ctx)
        manager = PassManager(resolved.passes, ctx, tolerance=recipe.verify.tolerance, verify=recipe.verify.enabled,
                              on_pass=lambda i, p: say(f"pass {i + 1}/{len(resolved.passes)}: {p.name}"), graphs=graphs,
                              persist=work.persist, on_done=work.commit)
        with stage("passes"):
            pipe, records = manager.run(pipe, done=done)
        work.clear_outputs()  # a run killed after its passes may have left some of what follows
        after = {c: manager.graphs[c] for c in components}  # re-captured by the manager after each pass

        quality = None
        settings = quality_settings(recipe, records)
        if settings["enabled"] and changes_weights(records) and not pipe.structure_only:
            from snapopt.quality import quality_retained, snapshapes_model

            if snapshapes_model(ctx.teacher):
                with stage("quality retained"):
                    (tmp / "quality").mkdir(exist_ok=True)
                    quality = quality_retained(ctx.teacher, pipe, steps=settings["steps"], teacher_steps=settings["input_steps"],
                                               prompts=settings["prompts"], cfg=settings["cfg"], seed=recipe.seed,
                                               grid=tmp / "quality" / "samples.png", say=say)
                    quality["grid"] = "quality/samples.png"

        if recipe.output.save_model:
            import torch

            from snapopt.serialization import save

            with stage("save model"):
                save(pipe, tmp / "model", dtype=getattr(torch, recipe.output.dtype))

        exports = lower_exports(pipe, resolved, shapes, tmp / "exports", stage, graphs=after)  # the manager's captures, not new ones

        for comp, g in after.items():
            (tmp / "blocks").mkdir(exist_ok=True)
            (tmp / "blocks" / f"{comp}.json").write_text(json.dumps(g.to_json(), indent=1))

        report = build_report(resolved, pipe, shapes, before, after, records, exports, time.perf_counter() - started, ctx,
                              steps=settings["steps"])
        report["quality"] = quality
        report["scheduler"] = scheduler_note(ctx.teacher, pipe)
        report["timings"] = dict(timings)
        if exports.get("parallel"):  # the ONNX stages ran beside the Core ML ones: their times overlap
            report["timings_note"] = exports["parallel"]["note"]
        if done:
            report["resumed"] = {"passes_reused": len(done)}
        with stage("report"):
            write_run_files(tmp, resolved, report, argv)
        raise_pending_signal()  # a signal swallowed while the report was written: nothing is published
        work.finish()  # the journal and saved components go; the lock is released
        if out_dir.exists():
            trash = out_dir.with_name(f".{out_dir.name}.old-{int(time.time())}")
            out_dir.rename(trash)
            tmp.rename(out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        work.close(keep=resume)
        raise
    return RunResult(out_dir=out_dir, report=report, pipeline=pipe, timings=timings)


#: what each export needs importable, by recipe field: (module, pip requirement)
EXPORT_DEPENDENCIES = {
    "coreml": [("coremltools", "coremltools")],
    "onnx": [("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime"), ("onnxsim", "onnxsim")],
    "coreai": [("coreai_torch", "coreai-torch"), ("coreai.runtime", "coreai-core")],
}


def check_export_dependencies(recipe) -> None:
    """Refuse, before anything is loaded or trained, a recipe whose exports cannot import their converter:
    otherwise the run finds out after its passes (a GPU chain: after 12 minutes of training)."""
    import importlib.util

    for field_name, needs in EXPORT_DEPENDENCIES.items():
        if not getattr(recipe.export, field_name, False):
            continue
        for module, requirement in needs:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # a dotted name whose parent package is missing
                found = False
            if not found:
                raise UsageError(f"export.{field_name}: needs the '{module}' module, which is not installed "
                                 f"(pip install {requirement}, or set export.{field_name}: false); nothing was run")


#: what "quality retained" measures when the recipe says nothing: the output at ``steps`` (or the step-distilled
#: student's step count) against the input at ``input_steps``, on ``prompts`` held-out snapshapes prompts
QUALITY_DEFAULTS = {"enabled": True, "steps": 25, "input_steps": 50, "prompts": 16, "cfg": 7.5}


def quality_settings(recipe, records) -> dict[str, Any]:
    """The quality-retained settings: the recipe's ``quality`` section where it has one, else the defaults,
    with ``steps`` taken from a step-distillation pass (its student's step count) when the recipe names none."""
    settings = dict(QUALITY_DEFAULTS)
    spec = getattr(recipe, "quality", None)
    given = spec.model_dump(exclude_unset=True) if hasattr(spec, "model_dump") else dict(spec or {})
    distilled = [r.stats.get("student_steps") for r in records if r.name == "step_distill" and r.stats.get("student_steps")]
    if distilled and "steps" not in given:
        settings["steps"] = int(distilled[-1])
    settings.update(given)
    return settings


def changes_weights(records) -> bool:
    """Whether any pass changed what the model computes (not an exact rewrite)."""
    return any(r.modified and not r.exact for r in records)


def scheduler_note(teacher, pipe) -> dict[str, str]:
    """Which scheduler the saved model ships, and whether it is the input's."""
    from snapopt.serialization import output_scheduler

    given, shipped = output_scheduler(teacher), output_scheduler(pipe)
    return {"input": type(given).__name__ if given is not None else "none",
            "output": type(shipped).__name__ if shipped is not None else "none",
            "same": given is not None and shipped is not None and type(given) is type(shipped)
            and dict(given.config) == dict(shipped.config)}


def build_report(resolved, pipe, shapes, before, after, records, exports, seconds, ctx, *, steps: int = 50) -> dict[str, Any]:
    """Everything the run measured, as one JSON document. ``steps``: the sampling steps the output is meant
    to run at (the quality section's), priced against the input at 50 in the headline."""
    comps = {}
    for c in after:
        b, a = before[c].totals(), after[c].totals()
        comps[c] = {"before": b, "after": a, "blocks": after[c].rows()}
        for row in comps[c]["blocks"]:
            row["out_shape"] = list(row["out_shape"])
    latency, latency_lines = latency_report(resolved.targets, before, after)
    headline, headline_lines = pipeline_report(resolved.targets, before, after, steps=steps)
    sections = []
    if headline_lines:
        sections.append({"title": "Predicted image time per target", "lines": headline_lines})
    sections += list(ctx.report.get("sections", []))
    sections += list(exports.get("sections", []))
    if latency_lines:
        sections.append({"title": "Predicted latency per target", "lines": latency_lines})
    return {
        "recipe": resolved.to_dict(),  # the effective recipe: defaults filled in, --model and --set applied
        "overrides": list(resolved.sets),  # the --set KEY=VALUE overrides, in order, as given
        "model": {"source": pipe.source, "resolution": pipe.resolution, "prediction_type": pipe.prediction_type},
        "shapes": {"resolution": shapes.resolution, "batch": shapes.batch, "text_len": shapes.text_len},
        "targets": [{"id": t.id, "name": t.device.name, "chip": t.device.chip.name, "ios": t.device.ios} for t in resolved.targets],
        "components": comps,
        "passes": [r.to_json() for r in records],
        "exports": exports,
        "latency": latency,
        "pipeline": headline,
        "extra_sections": sections,
        "seconds": seconds,
    }


def write_run_files(folder: Path, resolved: ResolvedRecipe, report: dict[str, Any], argv: list[str] | None) -> None:
    from snapopt.report import render_markdown

    (folder / "recipe.resolved.yaml").write_text(yaml.safe_dump(resolved.to_dict(), sort_keys=False))
    (folder / "manifest.json").write_text(json.dumps(manifest(resolved, argv), indent=2))
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (folder / "report.md").write_text(render_markdown(report))


def manifest(resolved: ResolvedRecipe, argv: list[str] | None) -> dict[str, Any]:
    """Versions, seed and hashes of every input: what it takes to reproduce the run."""
    import snapopt

    inputs = {}
    if resolved.path is not None:
        inputs[str(resolved.path)] = file_sha256(resolved.path)
    model = Path(resolved.recipe.model)
    if model.exists():
        for f in sorted(model.rglob("*")) if model.is_dir() else [model]:
            if f.is_file() and f.suffix in (".safetensors", ".json", ".txt", ".bin"):
                inputs[str(f)] = file_sha256(f)
    for p in plugin_files(resolved):
        inputs[str(p)] = file_sha256(p)
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": argv or sys.argv,
        "overrides": list(resolved.sets),  # --set KEY=VALUE, in order: the recipe file plus these
        "seed": resolved.recipe.seed,
        "deterministic": resolved.recipe.deterministic,
        "accelerator": accelerator(),  # kernels, and so a deterministic run's bits, depend on these
        "model": resolved.recipe.model,
        "inputs_sha256": inputs,
        "versions": {"snapopt": snapopt.__version__, "python": platform.python_version(),
                     **{name: installed_version(name) for name in MANIFEST_PACKAGES}},
    }


def accelerator() -> dict[str, Any]:
    """The GPU training stages use by default (``train.device: auto``: the first CUDA device; "cpu" without one) and
    the CUDA and cuDNN versions: a deterministic run gives the same model again only where these are the same."""
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu"}
    return {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "driver": _nvidia_driver()}


def _nvidia_driver() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


#: the packages a run's manifest records the version of (a recipe without exports runs without the converters)
MANIFEST_PACKAGES = ("torch", "diffusers", "transformers", "coremltools", "onnx")


def installed_version(distribution: str) -> str | None:
    """The version of ``distribution``: the imported module's when the run imported it (what actually ran), else the
    installed package's metadata, None when it is not installed. Never imports it: a run with exports off must not
    need coremltools to write its manifest. (The five manifest packages import under their distribution names.)"""
    from importlib.metadata import PackageNotFoundError, version

    module = sys.modules.get(distribution)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
