"""``snapopt latency`` and ``snapopt target calibrate`` (registered by snapopt.cli when importable)."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from snapopt.errors import UsageError

console = Console()
err_console = Console(stderr=True)
target_app = typer.Typer(no_args_is_help=True, add_completion=False)

_COMPONENTS = ("unet", "vae_decoder", "vae_encoder", "text_encoder")


def latency_command(
    model: str = typer.Argument(..., help="model reference: arch:<preset>, zoo:<name>, folder or hub id"),
    target: List[str] = typer.Option(["iphone-14-pro"], "--target", "-t", help="target id, <id>@<profile> or target .yaml (repeat)"),
    component: str = typer.Option("unet", help="unet, vae_decoder, vae_encoder or text_encoder"),
    resolution: Optional[int] = typer.Option(None, help="image resolution (default: the model's)"),
    batch: Optional[int] = typer.Option(None, help="batch (default 2 for the UNet: classifier-free guidance)"),
    as_json: bool = typer.Option(False, "--json", help="print the per-block tables as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG bar chart of the per-block breakdown"),
    pipeline: bool = typer.Option(False, "--pipeline", help="end to end: text encoder + --steps UNet steps + VAE decoder per target"),
    steps: int = typer.Option(50, "--steps", help="denoising steps for --pipeline"),
    memory: bool = typer.Option(False, "--memory", help="load-time and peak memory per component and whether the pipeline "
                                "fits each target's per-app limit (all models resident / loaded just in time)"),
):
    """Predict per-block and total latency of one component (or the whole pipeline) on one or more iPhones."""
    from snapopt.devices.latency import model_tables
    from snapopt.devices.registry import TARGETS

    if component not in _COMPONENTS:
        raise UsageError(f"--component: unknown component '{component}'; expected {', '.join(_COMPONENTS)}")
    if steps < 1:
        raise UsageError(f"--steps: must be at least 1 (got {steps})")
    targets = [TARGETS.resolve(t) for t in target]
    if memory:
        return _memory(model, targets, resolution, as_json)
    if pipeline:
        return _pipeline(model, targets, steps, resolution, as_json)
    tables, info = model_tables(model, targets, component, resolution, batch)
    by_id = {(x.id, x.profile.name): x for x in targets}
    if plot is not None:
        from snapopt.devices.plot import plot_tables

        plot_tables(tables, plot, title=f"{info['model']} {component} {info['resolution']}² batch {info['batch']}")
    if as_json:
        print(json.dumps({**info, "tables": [t.to_json() | {"calibrated": by_id[(t.target_id, t.profile)].calibrated}
                                             for t in tables]}, indent=1))
        return
    t = Table(title=f"{info['model']} · {component} · {info['resolution']}² · batch {info['batch']} · predicted ms per call")
    t.add_column("block", overflow="fold")
    t.add_column("kind")
    t.add_column("res", justify="right")
    for tab in tables:
        flag = "" if by_id[(tab.target_id, tab.profile)].calibrated else "\n(uncalibrated)"
        t.add_column(f"{tab.target_id}\n{tab.profile}{flag}", justify="right")
    first = tables[0]
    for name, b in first.blocks.items():
        t.add_row(name, b.kind, str(b.resolution or ""), *(f"{tab.blocks[name].us / 1e3:.2f}" for tab in tables))
    t.add_section()
    t.add_row("per-call overhead", "", "", *(f"{tab.fixed_us / 1e3:.2f}" for tab in tables))
    t.add_row("total", f"{len(first.blocks)} blocks", "", *(f"{tab.total_ms:.1f}" for tab in tables))
    console.print(t)
    for tab in tables:
        top = max(tab.blocks.values(), key=lambda b: b.us)
        console.print(f"{tab.target_id}: {tab.total_ms:.1f} ms; largest block {top.name} ({top.us / 1e3:.1f} ms, "
                      f"{100 * top.us / tab.latency_us():.0f}%); weights {tab.meta['weights_mb']:.0f} MB "
                      f"{'streamed from DRAM' if tab.meta['weights_streamed'] else 'on chip'}", highlight=False)
    if plot is not None:
        console.print(f"plot: {plot}")


def _pipeline(model: str, targets, steps: int, resolution, as_json: bool) -> None:
    """``snapopt latency MODEL --pipeline --steps N``: one image end to end per target, with its interval."""
    from snapopt.devices.latency import pipeline_graphs
    from snapopt.devices.report import interval_factor, pipeline_latency

    graphs, info = pipeline_graphs(model, resolution)
    rows = [(t, pipeline_latency(graphs["unet"], graphs["text_encoder"], graphs["vae_decoder"], t, steps)) for t in targets]
    if as_json:
        print(json.dumps({**info, "steps": steps, "pipelines": [
            {"target": t.id, "profile": t.profile.name, **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in p.items()}}
            for t, p in rows]}, indent=1))
        return
    tab = Table(title=f"{info['model']} · {info['resolution']}² · {steps} steps · predicted end to end")
    for col in ("target", "profile", "text encoder ×2 ms", "UNet step ms", f"×{steps} steps s", "decoder ms", "overhead ms",
                "total s", "interval s"):
        tab.add_column(col, justify="left" if col in ("target", "profile") else "right")
    for t, p in rows:
        tab.add_row(t.id + ("" if t.calibrated else " (uncalibrated)"), t.profile.name, f"{2 * p['text_encoder_ms']:.1f}",
                    f"{p['unet_step_ms']:.1f}", f"{steps * p['unet_step_ms'] / 1e3:.2f}", f"{p['decoder_ms']:.1f}",
                    f"{p['overhead_ms']:.0f}", f"{p['total_ms'] / 1e3:.2f}", f"{p['low_ms'] / 1e3:.2f}–{p['high_ms'] / 1e3:.2f}")
    console.print(tab)
    lo, hi = interval_factor()
    console.print(f"interval: 10th–90th percentile of cross-validated error on published numbers (×{lo:.2f}–×{hi:.2f}); "
                  "uncalibrated: no published row on this chip and profile, priced from spec and shared coefficients",
                  highlight=False)


def _memory(model: str, targets, resolution, as_json: bool) -> None:
    """``snapopt latency MODEL --memory``: snapopt.devices.memory per target, weights at each profile's bits."""
    from snapopt.devices.memory import memory_report
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models.loading import load_model

    pipe = load_model(model, components=("unet", "vae", "text_encoder"), structure_only=model.startswith("arch:"),
                      resolution=resolution)
    out, lines = memory_report(pipe, Shapes(resolution=pipe.resolution, batch=2), targets)
    if as_json:
        print(json.dumps({"model": pipe.source, "resolution": pipe.resolution, **out}, indent=1))
        return
    tab = Table(title=f"{pipe.source} · {pipe.resolution}² · predicted memory (MB), weights at each profile's bits")
    rows = out["targets"]
    comps = list(rows[0]["components"])
    for col in ("target", "profile", "RAM GB", "app limit (entitled)", *(f"{c} load/peak" for c in comps), "all resident",
                "just in time", "verdict"):
        tab.add_column(col, justify="left" if col in ("target", "profile", "verdict") else "right", overflow="fold")
    for r in rows:
        tab.add_row(r["target"], r["profile"], f"{r['ram_gb']:g}", f"{r['app_limit_mb']} ({r['entitled_limit_mb']})",
                    *(f"{r['components'][c]['weights_mb']:.0f}/{r['components'][c]['peak_mb']:.0f}" for c in comps),
                    f"{r['resident_mb']:.0f}", f"{r['just_in_time_mb']:.0f}", r["verdict"])
    console.print(tab)
    console.print(lines[-1], highlight=False)


@target_app.callback()
def _target_group() -> None:
    """Work with targets: calibrate a cost model from measured latencies (a group, so `snapopt target calibrate` keeps its name)."""


@target_app.command("calibrate")
def calibrate_command(
    csv_path: Path = typer.Option(..., "--csv", help="measured latencies (columns of shared/data/published_latency_calibration.csv)"),
    target: str = typer.Option(..., "--target", "-t", help="target whose chip spec prices rows not measured on a registered phone"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the calibrated target YAML here"),
    apply_to: List[Path] = typer.Option([], "--apply-to", help="also write the fitted coefficients into these target YAML files"),
    as_json: bool = typer.Option(False, "--json", help="print the fit as JSON"),
):
    """Fit cost-model coefficients per deployment profile and report the fit error of every row."""
    from snapopt.devices.calibrate import calibrate, calibrated_target, fit_table, read_rows, write_target
    from snapopt.devices.registry import TARGETS
    from snapopt.devices.target import load_target_file

    rows = read_rows(csv_path)
    base = TARGETS.resolve(target)
    fits, skipped = calibrate(rows, base, TARGETS, progress=lambda m: err_console.print(f"[snapopt] {m}", markup=False, highlight=False))
    table = fit_table(fits)
    header = f"calibrated by `snapopt target calibrate --csv {csv_path.name} --target {target}` on {date.today().isoformat()}"
    written = []
    if out is not None:
        written.append(str(write_target(calibrated_target(base, fits), out, header=header)))
    for path in apply_to:
        existing = load_target_file(path)
        notes = [ln[2:] for ln in path.read_text().splitlines() if ln.startswith("# ") and not ln.startswith("# calibrated by")]
        written.append(str(write_target(calibrated_target(existing, fits), path, header="\n".join([*notes, header]))))
    if as_json:
        print(json.dumps({"rows": table, "skipped": [r.label for r in skipped], "written": written,
                          "coefficients": {f.profile.name: f.coefficients for f in fits}}, indent=1))
        return
    t = Table(title=f"calibration fit ({csv_path.name})")
    for col in ("profile", "row", "measured ms", "before ms", "fitted ms", "error"):
        t.add_column(col, justify="right" if "ms" in col or col == "error" else "left", overflow="fold")
    for r in table:
        t.add_row(r["profile"], r["row"], f"{r['measured_ms']:g}", f"{r['before_ms']:.1f}", f"{r['predicted_ms']:.1f}", f"{r['error_pct']:+.1f}%")
    console.print(t)
    for f in fits:
        console.print(f"{f.profile.name}: fitted {', '.join(f'{k}={f.coefficients[k]:.4g}' for k in f.free)}", highlight=False)
    for r in skipped:
        console.print(f"skipped {r.label}: chip {r.chip} is neither a registered phone's nor {base.device.chip.name}", highlight=False)
    for w in written:
        console.print(f"wrote {w}")
