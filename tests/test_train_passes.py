"""Training passes inside the pass manager (teacher from the context, report sections) and the job CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import BK_SMALL



def test_recover_after_remove_blocks_in_manager(tiny_pipe, tiny_shapes, tmp_path):
    from snapopt.core import PassContext, PassManager
    from snapopt.passes.recover import Recover
    from snapopt.passes.remove_blocks import RemoveBlocks

    ctx = PassContext(shapes=tiny_shapes, work_dir=tmp_path, teacher=tiny_pipe)
    passes = [RemoveBlocks({"component": "unet", "blocks": BK_SMALL}),
              Recover({"train": {"steps": 3, "batch": 2, "progress": False, "optim": {"lr": 1e-3}}, "robust": {"attention": 0.2}})]
    program, records = PassManager(passes, ctx).run(tiny_pipe)
    stats = records[1].stats
    assert stats["teacher_distance_after"] < stats["teacher_distance_before"]
    assert set(stats["feature_stages"]) == {f"{k}_blocks.{i}" for k in ("down", "up") for i in range(4)}
    section = ctx.report["sections"][-1]
    assert section["title"].startswith("Recovery") and "recover-1/losses.png" in section["lines"][0]
    assert (tmp_path / "recover-1" / "losses.png").is_file() and (tmp_path / "recover-1" / "losses.csv").is_file()
    assert program.unet is not tiny_pipe.unet  # the teacher was not trained


def test_training_pass_without_teacher_names_the_pass(tiny_pipe, tiny_shapes):
    from snapopt.core import PassContext, PassManager
    from snapopt.errors import PreconditionError
    from snapopt.passes.recover import StepDistill

    with pytest.raises(PreconditionError, match="pass 'step_distill'.*no teacher"):
        PassManager([StepDistill({"train": {"steps": 1}})], PassContext(shapes=tiny_shapes)).run(tiny_pipe)


def test_cli_spec_runs_and_resumes(tmp_path):
    from snapopt.errors import UsageError
    from snapopt.train.cli import run_spec

    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"model": "arch:tiny", "job": "decoder_distill", "save_model": False,
                                "options": {"train": {"steps": 2, "batch": 2, "progress": False, "checkpoint_every": 1},
                                            "loss": {"val_latents": 2}}}))
    out = tmp_path / "run"
    first = run_spec(spec, out)
    assert first["steps"] == 2 and (out / "result.json").is_file()
    with pytest.raises(UsageError, match="not empty; pass --resume"):
        run_spec(spec, out)
    again = run_spec(spec, out, resume=True, steps=3)
    assert again["resumed_from"] == 2 and again["steps"] == 3 and again["steps_this_run"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "arch:tiny", "job": "recover", "options": {"train": {"batch": 0}}}))
    with pytest.raises(UsageError, match=r"bad.json: options.train.batch: Input should be greater than or equal to 1"):
        run_spec(bad, tmp_path / "x")


def test_steps_override_shortens_warmup_too():
    from pathlib import Path

    from snapopt.train.spec import load_spec

    spec = Path(__file__).resolve().parents[1] / "snapopt" / "train" / "specs" / "recover-bk-sdm-small-snapshapes.yaml"
    assert load_spec(spec).job_options().train.optim.warmup_steps == 100
    short = load_spec(spec, {"steps": 3}).job_options().train
    assert short.steps == 3 and short.optim.warmup_steps == 3
    assert load_spec(spec, {"steps": 500}).job_options().train.optim.warmup_steps == 100


def test_step_distill_pass_reports_cfg_and_plain_errors_apart(tiny_pipe, tiny_shapes, tmp_path):
    """The logged total alternates between CFG-aware and plain steps (~30x apart); the report gives each its own row."""
    from snapopt.core import PassContext, PassManager
    from snapopt.passes.recover import StepDistill

    ctx = PassContext(shapes=tiny_shapes, work_dir=tmp_path, teacher=tiny_pipe)
    opts = {"train": {"steps": 4, "batch": 2, "progress": False, "optim": {"lr": 1e-5}}, "eval_prompts": 1,
            "loss": {"teacher_steps": 4, "cfg_probability": 0.5}}
    _, records = PassManager([StepDistill(opts)], ctx).run(tiny_pipe)
    stats = records[0].stats
    assert stats["student_steps"] == 2 and {"distill_cfg_first", "distill_plain_last"} <= set(stats)
    lines = "\n".join(ctx.report["sections"][-1]["lines"])
    kinds = [k for k in ("cfg", "plain") if stats[f"distill_{k}_first"] is not None]
    assert kinds and all(f"distillation error, {k} steps, first → last 10%" in lines for k in kinds)
