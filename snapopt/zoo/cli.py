"""``snapopt eval MODEL``: score a text-to-image pipeline on held-out snapshapes prompts."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


app = typer.Typer(help="Zoo teacher models and their evaluators.")


def resolve_model(model: str):
    """Any model reference (zoo:<name>, arch:<preset>, a diffusers folder, a run's model folder) as a snapopt
    Pipeline; bad references raise snapopt's ModelRefError (one line, exit code 2)."""
    from snapopt.models.loading import load_model

    return load_model(model)


def teacher_of(pipe) -> str:
    """The reference the model descends from (a run output's input model), which the scores are judged
    against: the snapshapes evaluator scores prompts the zoo teacher was trained on."""
    return str(pipe.extra.get("origin") or pipe.source)


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="any model reference: zoo:snapshapes, arch:<preset>, a diffusers folder, a run's model folder"),
    steps: int = typer.Option(50, help="DDIM sampling steps"),
    cfg: float = typer.Option(7.5, help="classifier-free guidance scale"),
    prompts: int = typer.Option(64, help="number of held-out prompts (one image each)"),
    out: Path = typer.Option(Path("snapopt-eval"), help="folder for the sample grid and metrics JSON"),
    seed: int = typer.Option(0, help="sampling seed"),
) -> None:
    """Print FID, CLIP score and attribute accuracy; save a sample grid PNG and metrics.json."""
    from .evaluate import evaluate, save_grid

    console = Console()
    model_pipe = resolve_model(model)
    teacher = teacher_of(model_pipe)
    pipe = model_pipe.to_diffusers()
    console.print(f"{model}: descends from {teacher}; scored on zoo:snapshapes's held-out prompts "
                  f"(compare with `snapopt eval {teacher} --steps 50`)")
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=prompts)
        result = evaluate(pipe, steps=steps, cfg=cfg, n_prompts=prompts, seed=seed, return_images=True,
                          progress=lambda done, total: progress.update(task, completed=done))
    images = result.pop("images")
    result.pop("captions")
    out.mkdir(parents=True, exist_ok=True)
    grid = save_grid(images[:32], out / "samples.png")
    (out / "metrics.json").write_text(json.dumps({"model": model, "teacher": teacher, **result}, indent=2))

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
