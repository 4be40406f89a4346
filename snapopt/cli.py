"""The ``snapopt`` command line.

Exit codes: 0 success · 1 internal error · 2 bad input (recipe, argument, file, model reference, plugin) ·
3 a pass failed (named) · 4 lowering failed. Errors print one line, never a traceback
(set SNAPOPT_DEBUG=1 to see it).
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

from snapopt.errors import SnapoptError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)


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
    overwrite: bool = typer.Option(False, help="replace an existing run folder"),
):
    """Validate RECIPE, run its passes and lowering, and write a run folder."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from snapopt.recipe import load_recipe
    from snapopt.run import apply as run_apply

    resolved = load_recipe(recipe, {"model": model})
    out = out or Path("runs") / f"{resolved.recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  disable=not err_console.is_terminal) as progress:
        task = progress.add_task("starting", total=None)

        def say(msg: str):
            progress.update(task, description=msg)
            if not err_console.is_terminal:
                err_console.print(f"[snapopt] {msg}", markup=False, highlight=False)

        result = run_apply(resolved, out, overwrite=overwrite, progress=say, argv=sys.argv)
    rep = result.report
    table = Table(title=f"snapopt apply {resolved.recipe.name}")
    for col in ("component", "params before", "params after", "GMACs before", "GMACs after"):
        table.add_column(col, justify="right" if col != "component" else "left")
    for comp, c in rep["components"].items():
        table.add_row(comp, f"{c['before']['params']:,}", f"{c['after']['params']:,}", f"{c['before']['macs'] / 1e9:.2f}",
                      f"{c['after']['macs'] / 1e9:.2f}")
    console.print(table)
    console.print(f"run folder: {result.out_dir}  (report: {result.out_dir / 'report.md'})")


@app.command()
def inspect(
    model: str = typer.Argument(..., help="model reference: folder, hub id, arch:<preset>, zoo:<name>"),
    component: str = typer.Option("unet,vae_decoder,text_encoder", help="comma-separated components"),
    resolution: Optional[int] = typer.Option(None, help="image resolution (default: the model's)"),
    batch: int = typer.Option(1, help="UNet batch (2 = classifier-free guidance)"),
    as_json: bool = typer.Option(False, "--json", help="print the block IR as JSON"),
):
    """Show a model's block graph: params, MACs, activation bytes and output shape per block, with totals."""
    from snapopt.capture import block_graph
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models.loading import load_model

    comps = _components(component)
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
def list_passes(verbose: bool = typer.Option(False, "--verbose", "-v", help="show each pass's options")):
    """List registered passes (built-ins and plugins) with one-line docs."""
    from snapopt.core.registry import PASSES

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
def list_targets():
    """List registered targets (iPhones + deployment profiles) and where each came from."""
    from snapopt.devices.registry import TARGETS

    t = Table(title="snapopt targets")
    for col in ("id", "device", "chip", "ANE TOPS", "DRAM GB/s", "iOS", "profile", "source"):
        t.add_column(col)
    for tid, tgt, source in TARGETS.items():
        d = tgt.device
        t.add_row(tid, d.name, d.chip.name, f"{d.chip.ane_tops:g} ({d.chip.ane_tops_precision})", f"{d.chip.memory_bandwidth_gbs:g}",
                  d.ios, f"{tgt.profile.attention}, {tgt.profile.weight_bits}-bit, {tgt.profile.compute_units}", source)
    console.print(t)


@app.command()
def export(
    model: str = typer.Argument(..., help="model reference"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write (must not exist)"),
    fmt: str = typer.Option("coreml,onnx", "--format", help="coreml, onnx or both"),
    component: str = typer.Option("unet,vae_decoder,text_encoder", help="comma-separated components"),
    target: str = typer.Option("iphone-14-pro", help="target whose iOS sets the Core ML deployment target"),
    resolution: Optional[int] = typer.Option(None),
    batch: int = typer.Option(2),
    weight_bits: int = typer.Option(16, help="palettize Core ML weights to this many bits (<16)"),
):
    """Lower a model to Core ML packages (Apple's interface names) and/or checked ONNX, with no passes."""
    from snapopt.recipe import validate_recipe
    from snapopt.run import apply as run_apply

    formats = {f.strip() for f in fmt.split(",")}
    unknown = formats - {"coreml", "onnx"}
    if unknown:
        raise typer.BadParameter(f"unknown format '{unknown.pop()}'", param_hint="--format")
    resolved = validate_recipe({
        "name": "export", "model": model, "resolution": resolution, "batch": batch, "targets": [target],
        "export": {"coreml": "coreml" in formats, "onnx": "onnx" in formats, "components": _components(component),
                   "weight_bits": weight_bits},
        "output": {"save_model": False},
    })
    result = run_apply(resolved, out, progress=lambda m: err_console.print(f"[snapopt] {m}", markup=False, highlight=False), argv=sys.argv)
    for e in result.report["exports"]["coreml"] + result.report["exports"]["onnx"]:
        console.print(f"{e['file']}  {e['bytes'] / 1e6:.1f} MB")


def _register_optional_commands() -> None:
    """Commands that live beside the feature they drive (latency with the cost models, eval with the zoo)."""
    try:
        from snapopt.devices.cli import latency_command, target_app
    except ImportError:
        pass
    else:
        app.command("latency")(latency_command)
        app.add_typer(target_app, name="target", help="Work with targets: calibrate a cost model from measured latencies.")
    try:
        from snapopt.train.cli import train as train_command
    except ImportError:
        pass
    else:
        app.command("train", help="Run a training job (recovery, decoder or step distillation) from a spec; resumable, torchrun-ready.")(train_command)
    try:
        from snapopt.zoo.cli import eval_command
    except ImportError:
        pass
    else:
        app.command("eval", help="Evaluate a model: FID, CLIP score and attribute accuracy, with a sample grid.")(eval_command)


_register_optional_commands()


def main() -> None:
    try:
        app(standalone_mode=False)
    except SnapoptError as exc:
        if os.environ.get("SNAPOPT_DEBUG"):
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and the unexpected
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if os.environ.get("SNAPOPT_DEBUG"):
            raise
        err_console.print(f"internal error: {exc.__class__.__name__}: {exc} (set SNAPOPT_DEBUG=1 for the traceback)",
                          markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
