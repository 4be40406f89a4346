"""The ``snapopt`` command line.

Exit codes: 0 success · 1 internal error · 2 bad input (recipe, argument, file, model reference, plugin,
and every command-line usage error) · 3 a pass failed (named) · 4 lowering failed · 130 interrupted.
Errors print one line, never a traceback (set SNAPOPT_DEBUG=1 to see it). ``--help`` imports no torch:
commands import what they drive when they run.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from snapopt.errors import UsageError, raise_on_sigterm, run_cli

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's fitted layout; a pipe or file gets tables at their natural width (rich would
    otherwise assume 80 columns and cut ids to ``iphone…``)."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=100_000, soft_wrap=True)


console = _console()
err_console = _console(stderr=True)


def _print_json(data) -> None:
    print(json.dumps(data, indent=1, default=str))


def _version_callback(value: bool) -> None:
    if value:
        from snapopt import __version__

        print(f"snapopt {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="print the version and exit", is_eager=True,
                                       callback=_version_callback)):
    """Compiler-style optimisation of Stable Diffusion pipelines for iPhones."""


def _components(value: str) -> list[str]:
    from snapopt.models.pipeline import COMPONENTS

    comps = [c.strip() for c in value.split(",") if c.strip()]
    bad = [c for c in comps if c not in COMPONENTS]
    if bad:
        raise UsageError(f"--component: unknown component '{bad[0]}'; expected {', '.join(COMPONENTS)}")
    return comps


@app.command()
def apply(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (default runs/<name>-<time>)"),
    model: Optional[str] = typer.Option(None, "--model", help="override the recipe's model reference"),
    overwrite: bool = typer.Option(False, help="replace an existing run folder (and discard a killed run's work folder)"),
    resume: bool = typer.Option(False, "--resume", help="continue the killed run of the same recipe and model that left "
                                "OUT's work folder (.OUT.work): finished passes are reused, a training pass continues "
                                "from its last checkpoint; the result is bit-identical to an uninterrupted run. Starts "
                                "afresh if there is none, and keeps the work folder if this run fails or is interrupted. "
                                "Needs --out"),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON (progress stays on stderr)"),
    sets: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help="override a recipe field (repeatable, "
                                             "applied in order; VALUE is YAML, null removes the key so its default applies): "
                                             "seed=1, export.onnx=false, PASS.OPTION for the options of the pass named PASS "
                                             "(recover.loss.timestep_scaling=true), passes[N].options.OPTION when a pass occurs "
                                             "twice. The report records the overrides and the effective recipe"),
):
    """Validate RECIPE, run its passes and lowering, and write a run folder.

    The run works in a hidden folder beside OUT (.OUT.work) and renames it to OUT when it completes. After
    every pass the components it changed are saved there with a journal, and training passes checkpoint
    there, so a killed or preempted run continues with the same command plus --resume (repeat it until it
    exits 0; a recipe or model that differs from the killed run's is refused, exit 2). Without --resume, a
    leftover work folder is refused (exit 2) unless --overwrite discards it; a failing run without --resume
    removes its work folder."""
    from snapopt.checks.output import check_output_dir, cleanup_stale_runs, run_lock
    from snapopt.recipe import load_recipe

    # everything that can be wrong with the input is found here, before the first stage prints
    if resume and out is None:
        raise UsageError("--resume needs --out: the default run folder's name has the time in it")
    resolved = load_recipe(recipe, {"model": model}, sets=sets)
    out = out or Path("runs") / f"{resolved.recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    check_output_dir(out, overwrite=overwrite, expected_bytes=_expected_output_bytes(resolved))
    with run_lock(out) as alone:
        cleanup_stale_runs(out, alone=alone)
        result = _run_with_progress(resolved, out, overwrite, resume)
    rep = result.report
    summary = {
        "run_folder": str(result.out_dir), "report": str(result.out_dir / "report.md"), "recipe": resolved.recipe.name,
        "model": rep.get("model", {}).get("source"), "seconds": rep.get("seconds"),
        "components": {comp: {"params_before": c["before"]["params"], "params_after": c["after"]["params"],
                              "macs_before": c["before"]["macs"], "macs_after": c["after"]["macs"]}
                       for comp, c in rep["components"].items()},
        "passes": [{"pass": p["pass"], "modified": p["modified"], "seconds": p["seconds"]} for p in rep.get("passes", [])],
        "exports": rep.get("exports"),
    }
    if as_json:
        _print_json(summary)
        return
    table = Table(title=f"snapopt apply {resolved.recipe.name}")
    for col in ("component", "params before", "params after", "GMACs before", "GMACs after"):
        table.add_column(col, justify="right" if col != "component" else "left")
    for comp, c in summary["components"].items():
        table.add_row(comp, f"{c['params_before']:,}", f"{c['params_after']:,}", f"{c['macs_before'] / 1e9:.2f}",
                      f"{c['macs_after'] / 1e9:.2f}")
    console.print(table)
    console.print(f"run folder: {result.out_dir}  (report: {result.out_dir / 'report.md'})", markup=False, highlight=False)


def _run_with_progress(resolved, out: Path, overwrite: bool, resume: bool = False):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from snapopt.run import apply as run_apply

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  disable=not err_console.is_terminal) as progress:
        task = progress.add_task("starting", total=None)

        def say(msg: str):
            progress.update(task, description=msg)
            if not err_console.is_terminal:
                err_console.print(f"[snapopt] {msg}", markup=False, highlight=False)

        return run_apply(resolved, out, overwrite=overwrite, resume=resume, progress=say, argv=sys.argv)


def _expected_output_bytes(resolved) -> int | None:
    """Upper bound of what the run writes, from the input's weight bytes (files on disk, or a preset's
    parameter count); None when unknown (uncached hub id)."""
    from snapopt.checks.output import estimate_output_bytes

    r = resolved.recipe
    ref = r.model
    nbytes = None
    try:
        if ref.startswith("arch:"):
            from snapopt.models.presets import preset

            nbytes = _preset_bytes(preset(ref[5:]))
        else:
            folder = Path(ref)
            if ref.startswith("zoo:"):
                from snapopt import zoo

                folder = Path(zoo.zoo_path(ref[4:]))
            if folder.is_dir():
                nbytes = 0
                for f in folder.rglob("*.safetensors"):
                    from snapopt.checks.model import read_safetensors_header

                    for meta in read_safetensors_header(f).values():
                        n = 1
                        for d in meta["shape"]:
                            n *= d
                        nbytes += 4 * n  # fp32, whatever the file's dtype
    except (OSError, ValueError):
        return None
    if nbytes is None:
        return None
    return estimate_output_bytes(nbytes, save_model=r.output.save_model, dtype=r.output.dtype, coreml=r.export.coreml,
                                 onnx=r.export.onnx, weight_bits=r.export.weight_bits)


def _preset_bytes(spec) -> int | None:
    """fp32 bytes of a preset, counted on the meta device (no memory, about a second for SD sizes)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from snapopt.models.tokenizer import char_vocab

    vocab = char_vocab()
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    with torch.device("meta"):
        mods = [UNet2DConditionModel(**spec.unet), AutoencoderKL(**spec.vae), CLIPTextModel(CLIPTextConfig(**spec.text_encoder, **ids))]
    return 4 * sum(p.numel() for m in mods for p in m.parameters())


@app.command()
def inspect(
    model: str = typer.Argument(..., help="model reference: folder, hub id, arch:<preset>, zoo:<name>"),
    component: str = typer.Option("unet,vae_decoder,text_encoder", help="comma-separated components"),
    resolution: Optional[int] = typer.Option(None, min=8, max=4096, help="image resolution (default: the model's)"),
    batch: int = typer.Option(1, min=1, max=64, help="UNet batch (2 = classifier-free guidance)"),
    as_json: bool = typer.Option(False, "--json", help="print the block IR as JSON"),
):
    """Show a model's block graph: params, MACs, activation bytes and output shape per block, with totals."""
    from snapopt.capture import block_graph
    from snapopt.checks.model import check_model_reference
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models.loading import load_model

    comps = _components(component)
    if resolution is not None and resolution % 8:
        raise UsageError(f"--resolution: {resolution} is not a multiple of 8")
    check_model_reference(model, finite=False)  # structure is what inspect shows; weights are not run
    owners = sorted({"vae" if c.startswith("vae") else c for c in comps})
    pipe = load_model(model, components=owners, structure_only=model.startswith("arch:"), resolution=resolution)
    shapes = Shapes(resolution=pipe.resolution, batch=batch)
    graphs = {c: block_graph(pipe, c, shapes) for c in comps}
    if as_json:
        print(json.dumps({"model": pipe.source, "resolution": pipe.resolution, "batch": batch,
                          "components": {c: g.to_json() for c, g in graphs.items()}}, indent=1))
        return
    for comp, g in graphs.items():
        t = Table(title=f"{pipe.source} · {comp} · {pipe.resolution}² · batch {batch}")
        for col in ("block", "kind", "params", "GMACs", "attn GMACs", "act MB", "output"):
            t.add_column(col, justify="left" if col in ("block", "kind", "output") else "right")
        for r in g.rows():
            t.add_row(r["name"], r["kind"], f"{r['params']:,}", f"{r['macs'] / 1e9:.3f}", f"{r['attention_macs'] / 1e9:.3f}",
                      f"{r['act_bytes'] / 1e6:.1f}", "×".join(map(str, r["out_shape"])))
        tot = g.totals()
        t.add_section()
        t.add_row("total", f"{tot['blocks']} blocks", f"{tot['params']:,}", f"{tot['macs'] / 1e9:.3f}",
                  f"{tot['attention_macs'] / 1e9:.3f}", f"{tot['act_bytes'] / 1e6:.1f}", "")
        console.print(t)


@app.command("passes")
def list_passes(verbose: bool = typer.Option(False, "--verbose", "-v", help="show each pass's options"),
                as_json: bool = typer.Option(False, "--json", help="print the passes and their options as JSON")):
    """List registered passes (built-ins and plugins) with one-line docs."""
    from snapopt.core.registry import PASSES

    if as_json:
        _print_json({
            "passes": [{"name": name, "exact": cls.exact, "structural": cls.structural, "description": cls.summary(),
                        "source": source, "options": [{"name": o, "type": t, "default": d, "description": desc}
                                                      for o, t, d, desc in cls.option_docs()]}
                       for name, cls, source in PASSES.items()],
            "broken": [{"name": name, "error": why} for name, why in PASSES.broken().items()],
        })
        return
    t = Table(title="snapopt passes")
    for col in ("pass", "exact", "description", "source"):
        t.add_column(col)
    for name, cls, source in PASSES.items():
        t.add_row(name, "yes" if cls.exact else "no", cls.summary(), source)
        if verbose:
            for opt, ann, default, desc in cls.option_docs():
                t.add_row("", "", f"  {opt}: {ann} = {default}  {desc}", "")
    for name, why in PASSES.broken().items():
        t.add_row(name, "–", "[red]broken plugin[/red]", why)
    console.print(t)


@app.command("targets")
def list_targets(as_json: bool = typer.Option(False, "--json", help="print the targets as JSON")):
    """List registered targets (iPhones + deployment profiles) and where each came from."""
    from snapopt.devices.registry import TARGETS

    rows = []
    for tid, tgt, source in TARGETS.items():
        d = tgt.device
        rows.append({"id": tid, "device": d.name, "chip": d.chip.name, "ane_tops": d.chip.ane_tops,
                     "ane_tops_precision": d.chip.ane_tops_precision, "dram_gbs": d.chip.memory_bandwidth_gbs, "ios": d.ios,
                     "profile": {"name": tgt.profile.name, "attention": tgt.profile.attention, "weight_bits": tgt.profile.weight_bits,
                                 "compute_units": tgt.profile.compute_units},
                     "calibrated_profiles": list(tgt.calibrated_profiles), "source": source})
    if as_json:
        _print_json({"targets": rows})
        return
    t = Table(title="snapopt targets")
    for col in ("id", "device", "chip", "ANE TOPS", "DRAM GB/s", "iOS", "profile", "calibrated", "source"):
        t.add_column(col, no_wrap=col == "id")
    for r in rows:
        pr = r["profile"]
        t.add_row(r["id"], r["device"], r["chip"], f"{r['ane_tops']:g} ({r['ane_tops_precision']})", f"{r['dram_gbs']:g}",
                  r["ios"], f"{pr['name']}: {pr['attention']}, {pr['weight_bits']}-bit, {pr['compute_units']}",
                  ", ".join(r["calibrated_profiles"]) or "uncalibrated", r["source"])
    console.print(t)


@app.command()
def export(
    model: str = typer.Argument(..., help="model reference"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write (must not exist)"),
    fmt: str = typer.Option("coreml,onnx", "--format", help="coreml, onnx, coreai (comma-separated)"),
    component: str = typer.Option("unet,vae_decoder,text_encoder", help="comma-separated components"),
    target: str = typer.Option("iphone-14-pro", help="target whose iOS sets the Core ML deployment target"),
    resolution: Optional[int] = typer.Option(None),
    batch: int = typer.Option(2),
    weight_bits: int = typer.Option(16, help="16 for fp16 weights; 1-8 palettizes Core ML weights"),
    compression: str = typer.Option("auto", help="auto, none, palettize, int8, int4 (Core AI only), mixed, w8a8 "
                                                 "(width from --weight-bits; see docs/apple-runtime.md)"),
    as_json: bool = typer.Option(False, "--json", help="print the written files as JSON"),
):
    """Lower a model to Core ML packages (Apple's interface names) and/or checked ONNX, with no passes."""
    from snapopt.checks.output import check_output_dir, cleanup_stale_runs, run_lock
    from snapopt.recipe import validate_recipe

    formats = {f.strip() for f in fmt.split(",") if f.strip()}
    unknown = formats - {"coreml", "onnx", "coreai"}
    if unknown or not formats:
        raise UsageError(f"--format: unknown format '{unknown.pop() if unknown else fmt}'; expected coreml, onnx, coreai (comma-separated)")
    resolved = validate_recipe({
        "name": "export", "model": model, "resolution": resolution, "batch": batch, "targets": [target],
        "export": {"coreml": "coreml" in formats, "onnx": "onnx" in formats, "coreai": "coreai" in formats, "components": _components(component),
                   "weight_bits": weight_bits, "compression": compression},
        "output": {"save_model": False},
    })
    check_output_dir(out, expected_bytes=_expected_output_bytes(resolved))
    from snapopt.run import apply as run_apply

    with run_lock(out) as alone:
        cleanup_stale_runs(out, alone=alone)
        result = run_apply(resolved, out, progress=lambda m: err_console.print(f"[snapopt] {m}", markup=False, highlight=False),
                           argv=sys.argv)
    files = result.report["exports"]["coreml"] + result.report["exports"]["onnx"] + result.report["exports"].get("coreai", [])
    if as_json:
        _print_json({"out": str(result.out_dir), "exports": result.report["exports"]})
        return
    for e in files:
        console.print(f"{e['file']}  {e['bytes'] / 1e6:.1f} MB", markup=False, highlight=False)


# ---- commands that live beside the feature they drive, imported only when run -------------------------------
#: name -> (module, attribute, kind, one-line help). "command": a typer function; "app": a typer sub-app.
#: Listed in --help when the module is present; imported only when the command runs, so --help stays light.
OPTIONAL_COMMANDS = {
    "latency": ("snapopt.devices.cli", "latency_command", "command", "Predict per-block and total latency of a component on iPhones."),
    "target": ("snapopt.devices.cli", "target_app", "app", "Work with targets: calibrate a cost model from measured latencies."),
    "train": ("snapopt.train.cli", "train", "command",
              "Run a training job (recovery, decoder or step distillation) from a spec; resumable, torchrun-ready."),
    "eval": ("snapopt.zoo.cli", "eval_command", "command", "Evaluate a model: FID, CLIP score and attribute accuracy, with a sample grid."),
    "generate": ("snapopt.generate", "generate_command", "command", "Generate images from a prompt with any model reference, run outputs included."),
    "check": ("snapopt.lowering.cli", "check_app", "app", "Check exported Core ML / ONNX files against the model they came from."),
}


def _module_source(module: str) -> Path | None:
    """The file of ``snapopt.x.y`` without importing it (importing a package runs its __init__, which may
    import torch)."""
    root = Path(__file__).resolve().parent
    parts = module.split(".")[1:]
    for cand in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if cand.is_file():
            return cand
    return None


def _available(module: str, attr: str) -> bool:
    src = _module_source(module)
    try:
        return src is not None and attr in src.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _load_optional(name: str):
    """The click command behind optional command ``name`` (imports its module now)."""
    import importlib

    from typer.main import get_command

    module, attr, kind, help_text = OPTIONAL_COMMANDS[name]
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        from snapopt.errors import SnapoptError

        raise SnapoptError(f"command '{name}' is unavailable: cannot import {module}.{attr} ({exc.__class__.__name__}: {exc})") from None
    if kind == "app":
        cmd = get_command(obj)
    else:
        sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        sub.command(name, help=help_text if not obj.__doc__ else None)(obj)
        cmd = get_command(sub)
    cmd.name = name
    if kind == "app" and not cmd.help:
        cmd.help = help_text
    return cmd


def _lazy_command(name: str, help_text: str):
    import importlib

    import typer.core

    click = getattr(typer.core, "_click", None) or importlib.import_module("click")

    class LazyCommand(click.Command):
        """Stands in for the real command in the listing; the real one parses and runs."""

        def __init__(self):
            super().__init__(name, help=help_text, short_help=help_text, add_help_option=False)
            self._real = None

        def real(self):
            if self._real is None:
                self._real = _load_optional(self.name)
            return self._real

        def make_context(self, info_name, args, parent=None, **extra):
            return self.real().make_context(info_name, args, parent=parent, **extra)

        def invoke(self, ctx):
            return self.real().invoke(ctx)

        def main(self, *args, **kwargs):
            return self.real().main(*args, **kwargs)

        def format_options(self, ctx, formatter):
            return self.real().format_options(ctx, formatter)

        def _main_shell_completion(self, *args, **kwargs):
            return self.real()._main_shell_completion(*args, **kwargs)

    return LazyCommand()


def build_cli():
    """The click command behind ``snapopt``: the commands above plus the optional ones present."""
    from typer.main import get_command

    cmd = get_command(app)
    for name, (module, attr, _kind, help_text) in OPTIONAL_COMMANDS.items():
        if _available(module, attr):
            cmd.add_command(_lazy_command(name, help_text), name)
    return cmd


def quiet_libraries() -> None:
    """Library chatter (diffusers/transformers advice, optional-backend import failures) is not snapopt's
    output: stderr carries snapopt's progress and its one error line. SNAPOPT_DEBUG=1 keeps it all."""
    import logging

    if os.environ.get("SNAPOPT_DEBUG"):
        return
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("torchao", "diffusers", "transformers", "huggingface_hub", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command, and exit with the status :func:`snapopt.errors.run_cli` decides."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    raise_on_sigterm()
    code = run_cli(lambda: build_cli().main(args=args, prog_name="snapopt", standalone_mode=False))
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
