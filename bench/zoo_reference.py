"""Reference table for the zoo teacher: FID / CLIP score / attribute accuracy / CPU s per image
at 50, 25, 16, 8 and 4 DDIM steps (CFG 7.5), plus real-image, noise and prompt-blind baselines.

    PYTHONPATH=. python bench/zoo_reference.py                  # quality rows + CPU timing
    PYTHONPATH=. python bench/zoo_reference.py --timing-only    # re-time an existing JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from snapopt.zoo import shapes, zoo_path
from snapopt.zoo.evaluate import evaluate, generate, prompt_blind, real_images, save_grid, score_images

COLUMNS = ("fid", "clip_score", "attribute_accuracy", "shape_accuracy", "colour_accuracy", "position_accuracy",
           "seconds_per_image")


def cpu_seconds_per_image(pipe, captions: list[str], step_counts: list[int], cfg: float, repeats: int) -> dict[int, float]:
    """Best of ``repeats`` timed generations of one batch per step count. Rounds interleave the step
    counts, and the minimum is kept, because the CPU machine is shared and its speed drifts."""
    generate(pipe, captions[:2], steps=2, cfg=cfg, seed=0)  # warm-up
    best = {s: float("inf") for s in step_counts}
    for _ in range(repeats):
        for steps in step_counts:
            t0 = time.perf_counter()
            generate(pipe, captions, steps=steps, cfg=cfg, seed=0)
            best[steps] = min(best[steps], (time.perf_counter() - t0) / len(captions))
    return best


def evaluate_rows(pipe, scenes, a, console) -> dict[str, dict]:
    """Quality rows: real renders, noise, the teacher at each step count, the prompt-blind teacher."""
    rows: dict[str, dict] = {}
    rows["real renders"] = score_images(real_images(scenes, a.seed + 1000, 1), scenes, a.seed)
    rows["uniform noise"] = score_images(torch.rand(a.prompts, 3, 128, 128, generator=torch.Generator().manual_seed(a.seed)) * 2 - 1, scenes, a.seed)
    grids = []
    for steps in a.steps:
        with console.status(f"teacher, {steps} DDIM steps"):
            r = evaluate(pipe, steps=steps, cfg=a.cfg, n_prompts=a.prompts, seed=a.seed, return_images=True)
        grids.append(r.pop("images")[:8])
        r.pop("captions")
        r["seconds_per_image_during_eval"] = r.pop("seconds_per_image")
        rows[f"teacher {steps} steps"] = r
        console.print(f"{steps} steps: " + ", ".join(f"{k} {r[k]:.3f}" for k in COLUMNS if k in r))
    with console.status("prompt-blind teacher (broken), 25 steps"):
        blind = evaluate(prompt_blind(pipe), steps=25, cfg=a.cfg, n_prompts=a.prompts, seed=a.seed)
    blind["seconds_per_image_during_eval"] = blind.pop("seconds_per_image")
    rows["prompt-blind teacher, 25 steps"] = blind
    save_grid(torch.cat(grids), a.grid_dir / "zoo_steps_grid.png", columns=8)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:snapshapes")
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 25, 16, 8, 4])
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing-batch", type=int, default=8, help="prompts in each timed batch")
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--timing-only", action="store_true", help="re-time the teacher rows of an existing --out JSON")
    ap.add_argument("--out", type=Path, default=Path("docs/img/zoo_reference.json"))
    ap.add_argument("--grid-dir", type=Path, default=Path("docs/img"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from diffusers import StableDiffusionPipeline

    path = zoo_path(a.model) if a.model.startswith("zoo:") else Path(a.model)
    pipe = StableDiffusionPipeline.from_pretrained(path)
    console = Console()
    scenes = shapes.heldout_prompts(a.prompts)
    if a.timing_only:
        saved = json.loads(a.out.read_text())
        rows = saved["rows"]
    else:
        rows = evaluate_rows(pipe, scenes, a, console)
    with console.status("timing"):
        timing = cpu_seconds_per_image(pipe, scenes.captions()[: a.timing_batch], a.steps, a.cfg, a.timing_repeats)
    for steps, seconds in timing.items():
        rows[f"teacher {steps} steps"]["seconds_per_image"] = seconds

    table = Table(title=f"{a.model}: {a.prompts} held-out prompts, CFG {a.cfg}")
    table.add_column("row")
    for c in COLUMNS:
        table.add_column(c, justify="right")
    for name, r in rows.items():
        table.add_row(name, *(f"{r[c]:.3f}" if c in r else "-" for c in COLUMNS))
    console.print(table)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": a.model, "prompts": a.prompts, "cfg": a.cfg, "seed": a.seed, "threads": a.threads,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "timing": f"best of {a.timing_repeats} interleaved runs of a {a.timing_batch}-prompt batch, fp32",
            "load_average_at_end": os.getloadavg()}
    a.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    console.print(f"saved {a.out}")


if __name__ == "__main__":
    main()
