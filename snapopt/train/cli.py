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
    from snapopt.errors import UsageError
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models.loading import load_model
    from snapopt.train import dist, jobs
    from snapopt.train.spec import load_spec

    overrides = {k: v for k, v in (("steps", steps), ("device", device)) if v is not None}
    spec = load_spec(spec_path, overrides)
    options = spec.job_options()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise UsageError(f"output folder '{out}' is not empty; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_model(spec.model, seed=options.train.seed, resolution=spec.resolution)
    program = teacher
    if spec.student is not None:
        try:
            program = load_model(spec.student, seed=options.train.seed, resolution=spec.resolution)
        except UsageError as exc:
            raise UsageError(f"{spec_path}: student: {exc}") from None
        check_student_fits(teacher, program, spec.student)
    if spec.passes:
        passes = [PASSES.resolve(p.pass_)(p.options) for p in spec.passes]
        ctx = PassContext(shapes=Shapes(resolution=teacher.resolution, batch=2), seed=options.train.seed, teacher=teacher)
        program, _ = PassManager(passes, ctx, verify=False).run(program)
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
          steps: Optional[int] = typer.Option(None, min=1, max=10_000_000, help="override train.steps"),
          device: Optional[str] = typer.Option(None, help="override train.device")):
    """Run one training job."""
    check_inputs(spec, out, resume=resume)
    stats = run_spec(spec, out, resume=resume, steps=steps, device=device)
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_rank() == 0:
        typer.echo(json.dumps(stats, indent=1, default=str))
    if tdist.is_initialized():
        tdist.destroy_process_group()


def check_student_fits(teacher, student, ref: str) -> None:
    """A student from elsewhere must speak the teacher's latents and text embeddings: same resolution, latent
    channels and cross-attention width (UsageError naming what differs)."""
    from snapopt.errors import UsageError

    pairs = [("resolution", teacher.resolution, student.resolution)]
    if teacher.unet is not None and student.unet is not None:
        for key in ("in_channels", "out_channels", "cross_attention_dim"):
            pairs.append((f"unet {key}", teacher.unet.config.get(key), student.unet.config.get(key)))
    for what, t, s in pairs:
        if t != s:
            raise UsageError(f"student '{ref}': {what} is {s}, the teacher's is {t}")


def check_inputs(spec: Path, out: Path, *, resume: bool = False) -> None:
    """Before anything loads: the spec is readable UTF-8 YAML/JSON (no duplicate keys, bounded), its model
    reference and files are sane, and --out can be written. Errors are UsageError (exit 2), one line."""
    from snapopt.checks.files import load_json_file, load_yaml_file
    from snapopt.checks.model import check_model_reference
    from snapopt.checks.output import check_output_dir
    from snapopt.errors import UsageError

    spec = Path(spec)
    data = load_json_file(spec, "spec") if spec.suffix == ".json" else load_yaml_file(spec, "spec")
    if not isinstance(data, dict):
        raise UsageError(f"spec '{spec}': expected a mapping at the top level, got {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise UsageError(f"spec '{spec}': key {str(bad_keys[0])[:40]!r} is not a string")
    for field in ("model", "student"):
        ref = data.get(field)
        if isinstance(ref, str):
            try:
                check_model_reference(ref)
            except UsageError as exc:
                raise UsageError(f"spec '{spec}': {field}: {exc}") from None
    out = Path(out)
    if out.is_dir() and (resume or not any(out.iterdir())):
        check_output_dir(out, overwrite=True)  # continuing (or filling an empty folder): it must be writable
    elif out.exists() and not out.is_dir():
        raise UsageError(f"--out '{out}' is a file, not a folder")
    elif not out.exists():
        check_output_dir(out)


def main(argv: list[str] | None = None) -> None:
    """``python -m snapopt.train``: the same exit-code discipline as ``snapopt`` (snapopt.errors.run_cli)."""
    from typer.main import get_command

    from snapopt.errors import raise_on_sigterm, run_cli

    args = list(sys.argv[1:] if argv is None else argv)
    raise_on_sigterm()
    code = run_cli(lambda: get_command(app).main(args=args, prog_name="python -m snapopt.train", standalone_mode=False))
    sys.stdout.flush()
    sys.exit(code)
