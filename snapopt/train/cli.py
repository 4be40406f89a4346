"""``python -m snapopt.train SPEC --out DIR [--resume]``: one training job, on CPU, one GPU, or under
``torchrun --nproc_per_node=K`` (same command). Rank 0 writes checkpoints, logs, the model and result.json.

Also usable as typer commands: ``snapopt.train.cli.train`` can be registered on the main CLI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__)


def run_spec(spec_path: Path, out: Path, *, resume: bool = False, steps: int | None = None, device: str | None = None) -> dict:
    """Build teacher and student from the spec, train, and (rank 0) save. Returns the job's stats."""
    from snapopt.core import PASSES, PassContext, PassManager
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models.loading import load_model
    from snapopt.train import dist, jobs
    from snapopt.train.spec import load_spec

    overrides = {k: v for k, v in (("steps", steps), ("device", device)) if v is not None}
    spec = load_spec(spec_path, overrides)
    options = spec.job_options()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        from snapopt.errors import UsageError

        raise UsageError(f"output folder '{out}' is not empty; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_model(spec.model, seed=options.train.seed, resolution=spec.resolution)
    program = teacher
    if spec.passes:
        passes = [PASSES.resolve(p.pass_)(p.options) for p in spec.passes]
        ctx = PassContext(shapes=Shapes(resolution=teacher.resolution, batch=2), seed=options.train.seed, teacher=teacher)
        program, _ = PassManager(passes, ctx, verify=False).run(teacher)
    touched = "vae" if spec.job == "decoder_distill" else "unet"
    if program is teacher or getattr(program, touched) is getattr(teacher, touched):
        program = program.clone([options.component])  # never train the teacher's own modules
    run = {"recover": jobs.run_recover, "decoder_distill": jobs.run_decoder, "step_distill": jobs.run_step_distill}[spec.job]
    stats, result = run(teacher, program, options, out, resume=resume)
    info, _ = dist.init(options.train.device)
    if info.main:
        if spec.save_model:
            from snapopt.serialization import save

            save(program, out / "model")
        (out / "result.json").write_text(json.dumps({"spec": spec.model_dump(mode="json", by_alias=True), "stats": stats}, indent=1, default=str))
    dist.barrier(info)
    return stats


@app.command()
def train(spec: Path = typer.Argument(..., help="job spec (YAML or JSON)"),
          out: Path = typer.Option(..., "--out", "-o", help="folder for checkpoints, logs, model and result.json"),
          resume: bool = typer.Option(False, help="continue from the latest checkpoint in --out"),
          steps: Optional[int] = typer.Option(None, help="override train.steps"),
          device: Optional[str] = typer.Option(None, help="override train.device")):
    """Run one training job."""
    from snapopt.errors import SnapoptError

    try:
        stats = run_spec(spec, out, resume=resume, steps=steps, device=device)
    except SnapoptError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code)
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_rank() == 0:
        typer.echo(json.dumps(stats, indent=1, default=str))
    if tdist.is_initialized():
        tdist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:], standalone_mode=True)
