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
    # where the pass's seconds went: training and the before/after distances, never more than the pass took
    phases = records[1].phases
    assert {"train", "teacher distance", "move modules"} <= set(phases)
    assert 0 < sum(phases.values()) <= records[1].seconds + 1e-3
    assert records[1].to_json()["phases"] == phases and records[0].phases == {}  # remove_blocks names no phase


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


def test_spec_student_starts_from_a_saved_model(tmp_path, tiny_pipe, tiny_shapes):
    """`student:` trains a saved (here pruned) model against the spec's teacher, without replaying its passes."""
    from snapopt.core import PassContext, PassManager
    from snapopt.errors import UsageError
    from snapopt.passes.remove_blocks import RemoveBlocks
    from snapopt.serialization import save
    from snapopt.train.cli import run_spec

    pruned, _ = PassManager([RemoveBlocks({"component": "unet", "blocks": ["mid_block.attentions.0"]})],
                            PassContext(shapes=tiny_shapes)).run(tiny_pipe)
    save(pruned, tmp_path / "pruned")
    n_pruned = sum(p.numel() for p in pruned.unet.parameters())
    assert n_pruned < sum(p.numel() for p in tiny_pipe.unet.parameters())
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"model": "arch:tiny", "student": str(tmp_path / "pruned"), "job": "step_distill",
                                "options": {"train": {"steps": 1, "batch": 2, "progress": False},
                                            "loss": {"teacher_steps": 4}, "eval_prompts": 1}}))
    stats = run_spec(spec, tmp_path / "run")
    assert stats["steps"] == 1
    from snapopt.serialization import load

    out = load(tmp_path / "run" / "model")
    assert sum(p.numel() for p in out.unet.parameters()) == n_pruned
    assert not any(torch.equal(a, b) for a, b in zip(out.unet.parameters(), pruned.unet.parameters()) if a.requires_grad)
    # the spec's passes apply to the student, not to the teacher
    blocks = [n for n in ("down_blocks.0.attentions.0", "up_blocks.1.attentions.0") if n in dict(pruned.unet.named_modules())][:1]
    spec.write_text(json.dumps({"model": "arch:tiny", "student": str(tmp_path / "pruned"), "job": "step_distill",
                                "passes": [{"pass": "remove_blocks", "options": {"component": "unet", "blocks": blocks}}],
                                "options": {"train": {"steps": 1, "batch": 2, "progress": False},
                                            "loss": {"teacher_steps": 4}, "eval_prompts": 1}}))
    assert blocks and run_spec(spec, tmp_path / "run3")["steps"] == 1
    twice = load(tmp_path / "run3" / "model")
    assert sum(p.numel() for p in twice.unet.parameters()) < n_pruned  # both removals: the student's and the spec's
    spec.write_text(json.dumps({"model": "arch:tiny", "student": str(tmp_path / "missing"), "job": "step_distill"}))
    with pytest.raises(UsageError, match="student"):
        run_spec(spec, tmp_path / "run2")
