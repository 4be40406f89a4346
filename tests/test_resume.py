"""``snapopt apply --resume``: a SIGKILLed run continues from its work folder to the weights an uninterrupted run
writes, bit for bit, whether it was killed inside a training pass (from the trainer's last checkpoint) or
between passes (from the components saved after the last finished one)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snapopt.checks.output import cleanup_stale_runs, work_folder
from snapopt.recipe import load_recipe
from snapopt.run import apply

STOP = '''"""Kills its own process (SIGKILL) when SNAPOPT_TEST_KILL=between: a run killed between two passes
(=interrupt: Ctrl-C there)."""
import os
import signal

from snapopt.core import Pass, PassResult


class StopHere(Pass):
    """No-op, or SIGKILL of the run (tests)."""

    name = "stop_here"

    def touches(self):
        return set()

    def run(self, program, ctx):
        if os.environ.get("SNAPOPT_TEST_KILL") == "between":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("SNAPOPT_TEST_KILL") == "interrupt":
            raise KeyboardInterrupt
        return PassResult(program, modified=False)
'''

RECIPE = """name: resume
model: arch:tiny
plugins: ["%(plugin)s"]
passes:
  - pass: remove_blocks
    options: {component: unet, blocks: [down_blocks.0.attentions.1, mid_block]}
  - pass: channel_prune
    options: {component: vae_decoder, ratio: 0.5}
  - pass: stop_here
  - pass: decoder_distill
    options: {train: {steps: %(steps)d, batch: 2, ema: 0.9, checkpoint_every: 2, progress: false}}
export: {coreml: false, onnx: false}
quality: {enabled: false}
"""
STEPS = 10
TRAIN_DIR = "decoder_distill-3"  # <pass>-<index> inside the work folder


#: one file for the whole session: a pass class is registered once per file
PLUGIN = Path(__import__("tempfile").mkdtemp(prefix="snapopt-resume-")) / "stop.py"
PLUGIN.write_text(STOP)


def _recipe(folder: Path, steps: int = STEPS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "r.yaml").write_text(RECIPE % {"steps": steps, "plugin": PLUGIN})
    return folder / "r.yaml"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "model").rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.parent.name}/{k}"] = v
    return out


def _assert_same_run(run: Path, reference: Path) -> None:
    a, b = _weights(run), _weights(reference)
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    ra, rb = (json.loads((r / "report.json").read_text()) for r in (run, reference))
    assert ra["components"] == rb["components"]  # before/after captures
    assert [(p["pass"], p["changes"], p["verification"]) for p in ra["passes"]] == \
        [(p["pass"], p["changes"], p["verification"]) for p in rb["passes"]]
    assert [s["title"] for s in ra["extra_sections"]] == [s["title"] for s in rb["extra_sections"]]


def _kill_run(recipe: Path, out: Path, *, between: bool) -> subprocess.CompletedProcess | None:
    """Start ``snapopt apply`` and SIGKILL it: by its own hand between passes, or once the training pass has
    written a checkpoint (and before it finished)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SNAPOPT_TEST_KILL": "between" if between else ""}  # the tests' thread count
    proc = subprocess.Popen([sys.executable, "-m", "snapopt.cli", "apply", str(recipe), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=recipe.parent)
    if not between:
        checkpoints = work_folder(out) / TRAIN_DIR / "checkpoints"
        deadline = time.time() + 120
        while not (checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "run"
    apply(load_recipe(_recipe(folder)), out)
    return out


def _journal(out: Path) -> dict:
    return json.loads((work_folder(out) / ".resume" / "journal.json").read_text())


def test_killed_inside_training_resumes_bit_identical(reference, tmp_path):
    recipe, out = _recipe(tmp_path), tmp_path / "runs" / "run"
    _kill_run(recipe, out, between=False)
    work = work_folder(out)
    # the run stays hidden: no RUN folder, only its work folder
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == [work.name]
    assert [p["pass"] for p in _journal(out)["passes"]] == ["remove_blocks", "channel_prune", "stop_here"]
    step = max(int(p.name.split("-")[1]) for p in (work / TRAIN_DIR / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert 2 <= step < STEPS

    result = apply(load_recipe(recipe), out, resume=True)
    assert [p.name for p in out.parent.iterdir()] == ["run"] and not (out / ".resume").exists()
    training = result.report["passes"][-1]["stats"]
    assert training["resumed_from"] >= step  # the trainer continued from a checkpoint, not from step 0
    assert result.report["resumed"] == {"passes_reused": 3}
    _assert_same_run(out, reference)


def test_killed_between_passes_resumes_bit_identical(reference, tmp_path):
    recipe, out = _recipe(tmp_path), tmp_path / "runs" / "run"
    _kill_run(recipe, out, between=True)
    journal = _journal(out)
    assert [p["pass"] for p in journal["passes"]] == ["remove_blocks", "channel_prune"]
    assert sorted(journal["components"]) == ["unet", "vae"]  # the components the finished passes changed
    result = apply(load_recipe(recipe), out, resume=True)
    assert result.report["resumed"] == {"passes_reused": 2}
    assert result.report["passes"][-1]["stats"]["resumed_from"] is None  # the training pass ran whole
    _assert_same_run(out, reference)


def test_interrupted_run_keeps_its_work_folder_only_with_resume(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM (a preempted machine) with --resume keeps what the run finished; without, nothing stays."""
    recipe, out = _recipe(tmp_path), tmp_path / "runs" / "run"
    monkeypatch.setenv("SNAPOPT_TEST_KILL", "interrupt")
    with pytest.raises(KeyboardInterrupt):
        apply(load_recipe(recipe), out, resume=True)
    assert [p["pass"] for p in _journal(out)["passes"]] == ["remove_blocks", "channel_prune"] and not out.exists()


def _cli(args, capsys) -> tuple[int, list[str]]:
    from snapopt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["apply", *map(str, args)])
    return exc.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_leftover_work_folder_needs_resume_and_the_same_recipe(tmp_path, capsys, monkeypatch):
    recipe, out = _recipe(tmp_path), tmp_path / "runs" / "run"
    work = work_folder(out)
    (work / ".resume").mkdir(parents=True)
    from snapopt.work_folder import recipe_fingerprint

    journal = {"format": 1, **recipe_fingerprint(load_recipe(recipe)), "passes": [], "components": {}}
    (work / ".resume" / "journal.json").write_text(json.dumps(journal))
    (work / TRAIN_DIR).mkdir()

    code, err = _cli([recipe, "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "--resume" in err[0] and str(work) in err[0]
    code, err = _cli([recipe, "--resume"], capsys)
    assert code == 2 and err == ["error: --resume needs --out: the default run folder's name has the time in it"], err
    other = _recipe(tmp_path / "other", steps=STEPS + 2)
    code, err = _cli([other, "--out", out, "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "different recipe" in err[0], err
    code, err = _cli([other, "--out", out, "--resume", "--model", "arch:sd-v1.5"], capsys)
    assert code == 2 and len(err) == 1 and "different model" in err[0], err
    assert (work / TRAIN_DIR).is_dir() and (work / ".resume" / "journal.json").is_file()  # refused: nothing removed

    # another run working in it holds its lock
    import fcntl

    fd = os.open(work / ".resume" / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, err = _cli([recipe, "--out", out, "--resume"], capsys)
    finally:
        os.close(fd)
    assert code == 2 and len(err) == 1 and "in use" in err[0], err

    # --overwrite discards the leftover; a run interrupted without --resume leaves nothing
    import snapopt.run

    def interrupted(*a, **k):
        assert not (work / TRAIN_DIR).exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(snapopt.run, "load_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        apply(load_recipe(recipe), out, overwrite=True)
    assert list(out.parent.iterdir()) == []


def test_stale_cleanup_keeps_work_folders(tmp_path):
    parent = tmp_path / "runs"
    junk = [parent / ".run.tmp-k1ll3d", parent / ".run.old-1700000000"]
    keep = [parent / ".run.work", parent / ".x.tmp-1.work"]
    for d in junk + keep:
        (d / "sub").mkdir(parents=True)
    removed = cleanup_stale_runs(parent / "next")
    assert sorted(removed) == sorted(junk) and all(d.is_dir() for d in keep)


def test_missing_exporter_is_refused_before_any_pass(tmp_path, capsys, monkeypatch):
    """export.coreml without coremltools importable: one line, exit 2, before the model loads or a pass trains
    (found on a GPU machine after a 12-minute chain had trained and then died in its Core ML export)."""
    import importlib.util

    recipe, out = _recipe(tmp_path), tmp_path / "runs" / "run"
    recipe.write_text(recipe.read_text().replace("export: {coreml: false, onnx: false}", "export: {coreml: true, onnx: false}"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "coremltools" else real(name, *a))
    code, err = _cli([recipe, "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "export.coreml" in err[0] and "coremltools" in err[0], err
    assert not out.exists() and not work_folder(out).exists()
