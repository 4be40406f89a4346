"""``snapopt eval MODEL``: score a text-to-image pipeline on held-out snapshapes prompts."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import UnknownZooModel, zoo_path

app = typer.Typer(help="Zoo teacher models and their evaluators.")


def resolve_model(model: str) -> Path:
    """A diffusers folder from a path or a ``zoo:<name>`` reference."""
    if model.startswith("zoo:"):
        return zoo_path(model)
    path = Path(model)
    if not (path / "model_index.json").exists():
        raise typer.BadParameter(f"{model!r} is neither zoo:<name> nor a diffusers pipeline folder")
    return path


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="zoo:snapshapes or a diffusers pipeline folder"),
    steps: int = typer.Option(50, help="DDIM sampling steps"),
    cfg: float = typer.Option(7.5, help="classifier-free guidance scale"),
    prompts: int = typer.Option(64, help="number of held-out prompts (one image each)"),
    out: Path = typer.Option(Path("snapopt-eval"), help="folder for the sample grid and metrics JSON"),
    seed: int = typer.Option(0, help="sampling seed"),
) -> None:
    """Print FID, CLIP score and attribute accuracy; save a sample grid PNG and metrics.json."""
    from diffusers import StableDiffusionPipeline

    from .evaluate import evaluate, save_grid

    console = Console()
    try:
        path = resolve_model(model)
    except UnknownZooModel as err:
        raise typer.BadParameter(str(err)) from err
    pipe = StableDiffusionPipeline.from_pretrained(path)
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=prompts)
        result = evaluate(pipe, steps=steps, cfg=cfg, n_prompts=prompts, seed=seed, return_images=True,
                          progress=lambda done, total: progress.update(task, completed=done))
    images = result.pop("images")
    result.pop("captions")
    out.mkdir(parents=True, exist_ok=True)
    grid = save_grid(images[:32], out / "samples.png")
    (out / "metrics.json").write_text(json.dumps({"model": model, **result}, indent=2))

    table = Table(title=f"{model}: {prompts} held-out prompts, {steps} steps, CFG {cfg}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("fid", "clip_score", "attribute_accuracy", "shape_accuracy", "colour_accuracy",
                "position_accuracy", "size_accuracy", "background_accuracy", "seconds_per_image"):
        table.add_row(key, f"{result[key]:.3f}")
    console.print(table)
    console.print(f"sample grid: {grid}")


if __name__ == "__main__":
    app()
