"""The CLI keeps its promises: every usage error exits 2 with one line, failures keep their exit codes
(pass 3, lowering 4, internal 1, Ctrl-C 130), ``--help`` imports no torch, ``--version``, ``--json`` on data
commands, tables readable when piped, and ``snapopt train`` under the same discipline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

CLI = [sys.executable, "-m", "snapopt.cli"]
ENV = {**os.environ, "COLUMNS": "60"}  # a narrow terminal setting must not cut piped tables


def _run(args, cwd, timeout=120):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout)


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.mark.parametrize("args, fragment", [
    (["nosuch"], "No such command 'nosuch'"),
    (["apply"], "Missing argument 'recipe'"),
    (["apply", "r.yaml", "--bogus"], "No such option: --bogus"),
    (["inspect", "arch:tiny", "--batch", "two"], "'--batch'"),
    (["export", "arch:tiny"], "Missing option '--out'"),
    (["passes", "extra-arg"], "Got unexpected extra argument"),
    (["train"], "Missing argument 'spec'"),
    (["train", "spec.yaml", "--out", "o", "--bogus"], "No such option: --bogus"),
    (["train", "spec.yaml", "--out", "o", "--steps", "0"], "'--steps'"),
    (["--nope"], "No such option: --nope"),
    (["export", "arch:tiny", "--out", "x", "--format", "coreml", "--compression", "int4"], "int4 (per-block int4 weights) is a Core AI scheme"),
    (["export", "arch:tiny", "--out", "x", "--compression", "int5"], "export.compression"),
])
def test_usage_errors_exit_2_with_one_line(args, fragment, tmp_path):
    proc = _run(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = _lines(proc.stderr)
    # case-insensitive: click 8.1 writes "Missing argument 'RECIPE'", 8.2+ "'recipe'"
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment.lower() in lines[0].lower(), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_bare_snapopt_prints_help_and_exits_like_click(tmp_path):
    from snapopt.errors import _click_classes

    proc = _run([], tmp_path)
    # click's convention for a group called without a command: 2 since click 8.2 (and typer's vendored click), 0 before
    assert proc.returncode == (2 if _click_classes("NoArgsIsHelpError") else 0)
    assert "apply" in proc.stdout + proc.stderr and "internal error" not in proc.stderr


def test_help_does_not_import_torch(tmp_path):
    code = ("import sys\nfrom snapopt.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    print('EXIT', e.code, 'torch' in sys.modules, 'diffusers' in sys.modules, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert "EXIT 0 False False" in proc.stderr
    for name in ("apply", "passes", "targets", "train", "eval", "latency"):
        assert name in proc.stdout


def test_version(tmp_path):
    import snapopt

    proc = _run(["--version"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"snapopt {snapopt.__version__}"


def test_piped_tables_keep_full_ids_and_json_is_data(tmp_path):
    from snapopt.devices.registry import TARGETS

    ids = [tid for tid, _, _ in TARGETS.items()]
    proc = _run(["targets"], tmp_path)
    assert proc.returncode == 0
    for tid in ids:
        assert tid in proc.stdout
    assert "iphone…" not in proc.stdout
    data = json.loads(_run(["targets", "--json"], tmp_path).stdout)
    assert [t["id"] for t in data["targets"]] == ids
    passes = json.loads(_run(["passes", "--json"], tmp_path).stdout)
    names = {p["name"]: p for p in passes["passes"]}
    assert {"remove_blocks", "channel_prune"} <= set(names)
    assert any(o["name"] == "round_to" for o in names["channel_prune"]["options"])


def _recipe(tmp_path: Path, **extra) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump({"name": "cli", "model": "arch:tiny", "passes": [{"pass": "attention_sdpa"}],
                                 "export": {"coreml": False, "onnx": False}, **extra}))
    return p


@pytest.mark.parametrize("raised, code, line", [
    ("PassError('remove_blocks', 'boom')", 3, "error: pass 'remove_blocks': boom"),
    ("LoweringError('coremltools failed')", 4, "error: coremltools failed"),
    ("RuntimeError('bug')", 1, "internal error: RuntimeError: bug (set SNAPOPT_DEBUG=1 for the traceback)"),
    ("KeyboardInterrupt()", 130, "interrupted (Ctrl-C)"),
    ("ModelRefError('model x: nope')", 2, "error: model x: nope"),
])
def test_every_failure_keeps_its_exit_code(raised, code, line, tmp_path, monkeypatch, capsys):
    import snapopt.run
    from snapopt import errors
    from snapopt.cli import main

    def fake(*a, **k):
        raise eval(raised, {**vars(errors)})  # noqa: S307 - test-local constant expressions

    monkeypatch.setattr(snapopt.run, "apply", fake)
    with pytest.raises(SystemExit) as exc:
        main(["apply", str(_recipe(tmp_path)), "--out", str(tmp_path / "run")])
    assert exc.value.code == code
    assert _lines(capsys.readouterr().err) == [line]


@pytest.mark.parametrize("sig, code, last", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_signals_during_apply_exit_cleanly_and_leave_nothing(sig, code, last, tmp_path):
    """SIGINT / SIGTERM to a real run while it works: one line, 130 / 143, no run folder, no temporary folder."""
    recipe = _recipe(tmp_path, passes=[{"pass": "channel_prune", "options": {"component": "unet", "ratio": 0.5}}])
    out = tmp_path / "runs" / "run"
    # a test run started in the background by a non-interactive shell inherits SIGINT ignored, and Python keeps an
    # inherited SIG_IGN (a shell's background job is not meant to see Ctrl-C): give the child the default action
    proc = subprocess.Popen([*CLI, "apply", str(recipe), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=ENV, preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    seen = []
    deadline = time.time() + 240
    for line in proc.stderr:  # progress lines "[snapopt] <stage>" when stderr is not a terminal
        seen.append(line)
        if "[snapopt] load model" in line or "[snapopt] capture" in line or "[snapopt] pass" in line:
            break
        assert time.time() < deadline, seen
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, seen + [err]
    assert _lines(err)[-1] == last
    assert "Traceback" not in err
    assert not out.exists() and list((tmp_path / "runs").iterdir()) == []


# ---- snapopt train: the same discipline ------------------------------------------------------------------------
def _train(args, capsys) -> tuple[int, list[str]]:
    from snapopt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", *map(str, args)])
    return exc.value.code, _lines(capsys.readouterr().err)


def test_train_errors_exit_2(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    good = {"model": "arch:tiny", "job": "recover"}
    specs = {
        "missing.yaml": None,
        "unknown-key.yaml": yaml.safe_dump({**good, "colour": "red"}),
        "no-job.yaml": yaml.safe_dump({"model": "arch:tiny"}),
        "bad-job.yaml": yaml.safe_dump({**good, "job": "dance"}),
        "dup.yaml": "model: arch:tiny\njob: recover\njob: recover\n",
        "latin1.yaml": b"model: caf\xe9\n",
        "bad-model.yaml": yaml.safe_dump({**good, "model": "arch:nope"}),
        "bad-json.json": "{model",
        "bad-option.yaml": yaml.safe_dump({**good, "options": {"train": {"steps": "many"}}}),
    }
    fragments = {"missing.yaml": "not found", "unknown-key.yaml": "colour", "no-job.yaml": "job", "bad-job.yaml": "job",
                 "dup.yaml": "duplicate key 'job'", "latin1.yaml": "not UTF-8", "bad-model.yaml": "model",
                 "bad-json.json": "not valid JSON", "bad-option.yaml": "steps"}
    failures = []
    for name, text in specs.items():
        spec = tmp_path / name
        if isinstance(text, bytes):
            spec.write_bytes(text)
        elif text is not None:
            spec.write_text(text)
        out = tmp_path / f"out-{name}"
        code, err = _train([spec, "--out", out], capsys)
        if not (code == 2 and len(err) == 1 and fragments[name] in err[0] and not out.exists()):
            failures.append(f"{name}: exit {code}: {err}")
    spec = tmp_path / "good.yaml"
    spec.write_text(yaml.safe_dump(good))
    code, err = _train([spec, "--out", tmp_path / "a-file" / "out"], capsys)
    if not (code == 2 and len(err) == 1 and "is a file" in err[0]):
        failures.append(f"--out under a file: exit {code}: {err}")
    assert not failures, "\n".join(failures)


def test_python_m_snapopt_train_exit_codes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "snapopt.train", "missing.yaml", "--out", "o"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and _lines(proc.stderr) == ["error: spec 'missing.yaml' not found"]
    proc = subprocess.run([sys.executable, "-m", "snapopt.train", "--bogus"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and len(_lines(proc.stderr)) == 1


def test_fuzz_train_spec_files(tmp_path, capsys):
    """The recipe fuzz's broken files, as ``snapopt train`` specs: exit 2, one line, nothing written."""
    from test_fuzz_recipes import file_cases

    failures = []
    all_cases = file_cases()
    for i, (case_id, data, fragment) in enumerate(all_cases):
        spec = tmp_path / f"spec{i}.yaml"
        spec.write_bytes(data)
        out = tmp_path / f"out{i}"
        code, err = _train([spec, "--out", out], capsys)
        want = fragment.replace("{file}", str(spec))
        if not (code == 2 and len(err) == 1 and err[0].startswith("error: ") and want in err[0] and not out.exists()):
            failures.append(f"{case_id}: exit {code}, want {want!r}, got {err[:2]}")
    print(f"\nfuzz train specs: {len(all_cases)} cases, {len(all_cases) - len(failures)} clean")
    assert not failures, "\n".join(failures)


def test_a_swallowed_ctrl_c_is_raised_again_at_the_next_stage(capsys):
    """A signal's exception raised inside ``__del__`` is dropped by Python; the run must still stop, and the
    user sees no "Exception ignored ... Traceback" report of it (the CLI's one line is all)."""
    import os
    import sys

    from snapopt import errors

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    saved_hook = sys.unraisablehook
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        errors._PENDING.clear()
        reported = []
        sys.unraisablehook = reported.append  # the hook before snapopt's (Python's own prints the report)
        errors.raise_on_sigterm()

        class KilledWhileCollected:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # let the handler run here, inside __del__
                    pass

        KilledWhileCollected()  # KeyboardInterrupt raised in __del__: swallowed by Python
        assert reported == [] and "Exception ignored" not in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            errors.raise_pending_signal()
        errors.raise_pending_signal()  # raised once, not again

        class BrokenDel:
            def __del__(self):
                raise ValueError("a real bug in a __del__")

        BrokenDel()  # any other unraisable exception is still reported
        assert [str(u.exc_value) for u in reported] == ["a real bug in a __del__"]
    finally:
        sys.unraisablehook = saved_hook
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
        errors._PENDING.clear()
