"""The hidden work folder of a run (``.NAME.work``): where ``snapopt apply`` writes, and what makes it resumable.

After every pass the components it changed are saved under ``.resume/`` (:mod:`snapopt.serialization`, fp32) and
the run goes on with their reload; a journal records the finished passes (records, report rows, RNG state). A
resumed run reloads the input model as the teacher and the saved components as the pipeline, and continues with
the next pass. Continuing from the reload in every run, killed or not, is what makes a resumed run's weights
bit-identical to an uninterrupted one's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from snapopt.checks.output import work_folder
from snapopt.core import PassContext
from snapopt.core.pass_manager import PassRecord
from snapopt.errors import PostconditionError, UsageError
from snapopt.recipe import ResolvedRecipe


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plugin_files(resolved: ResolvedRecipe) -> list[Path]:
    """The plugin files a recipe loads (``path.py`` or ``path.py:Class``), relative to the recipe's folder."""
    files = []
    for spec in resolved.recipe.plugins:
        p = Path(spec.split(":")[0])
        p = p if p.is_absolute() or resolved.path is None else resolved.path.parent / p
        if p.is_file():
            files.append(p)
    return files


JOURNAL_FORMAT = 1
#: what a finished run leaves of its work folder: everything but this (journal, saved components, lock)
RESUME_DIR = ".resume"
#: what the stages after the passes write; a resumed run clears them before writing them again
OUTPUTS = ("model", "exports", "quality", "blocks", "recipe.resolved.yaml", "manifest.json", "report.json", "report.md")


def recipe_fingerprint(resolved: ResolvedRecipe) -> dict[str, str]:
    """What a resumed run must share with the run that left the work folder: the resolved recipe (model
    reference included), the plugin files it loads, and the snapopt version."""
    import snapopt

    h = hashlib.sha256(json.dumps(resolved.to_dict(), sort_keys=True, default=str).encode())
    for p in plugin_files(resolved):
        h.update(file_sha256(p).encode())
    return {"recipe_sha256": h.hexdigest(), "model": resolved.recipe.model, "snapopt": snapopt.__version__}


class WorkFolder:
    """``.NAME.work`` beside the run folder: everything the run writes, plus (under ``.resume/``) a journal of
    finished passes and the components they changed, saved with :func:`snapopt.serialization.save`.

    The journal is the commit point: a pass is finished once the journal says so, and it names the saved
    component folders that hold the pipeline after it. It is replaced atomically; saved folders it does not
    name are leftovers of a pass that did not finish. An exclusive lock keeps two runs out of one folder."""

    def __init__(self, path: Path, fingerprint: dict[str, str], journal: dict[str, Any] | None, lock_fd: int):
        self.path, self.fingerprint, self.lock_fd = path, fingerprint, lock_fd
        self.journal = journal or {"format": JOURNAL_FORMAT, **fingerprint, "passes": [], "components": {}}
        self.pending: dict[str, str] = {}
        self.ctx: PassContext | None = None

    @property
    def resume_dir(self) -> Path:
        return self.path / RESUME_DIR

    @property
    def finished_passes(self) -> int:
        return len(self.journal["passes"])

    # -- opening ----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, out_dir: Path, resolved: ResolvedRecipe, *, resume: bool, overwrite: bool) -> "WorkFolder":
        """Create or (``resume``) reopen ``out_dir``'s work folder. Every refusal is a one-line UsageError
        raised before anything is removed."""
        path = work_folder(out_dir)
        fingerprint = recipe_fingerprint(resolved)
        journal = None
        try:
            path.mkdir()
            created = True
        except FileExistsError:
            created = False
        if not created:
            if not path.is_dir() or path.is_symlink():
                raise UsageError(f"'{path}' (the work folder of '{out_dir}') is not a folder; remove it")
            lock_fd = cls._lock(path)
            if not resume and not overwrite:
                os.close(lock_fd)
                raise UsageError(f"a killed run of '{out_dir}' left its work folder '{path}'; pass --resume to continue it, "
                                 "or remove it (--overwrite discards it)")
            if resume:
                journal = cls._read_journal(path, lock_fd)
                mine = {k: journal.get(k) for k in fingerprint} if journal is not None else None
                if journal is not None and mine != fingerprint:
                    os.close(lock_fd)
                    what = next(k for k in ("model", "recipe_sha256", "snapopt") if mine[k] != fingerprint[k])
                    short = (lambda v: str(v)[:12]) if what == "recipe_sha256" else str
                    raise UsageError(f"--resume: '{path}' was left by a run with a different {what.replace('_sha256', '')} "
                                     f"({short(mine[what])} there, {short(fingerprint[what])} now); remove it or choose another --out")
            else:
                os.close(lock_fd)
                shutil.rmtree(path)
                path.mkdir()
                lock_fd = cls._lock(path)
        else:
            lock_fd = cls._lock(path)
        work = cls(path, fingerprint, journal, lock_fd)
        (work.resume_dir / "state").mkdir(parents=True, exist_ok=True)
        if journal is None:
            work._write_journal()
        return work

    @staticmethod
    def _lock(path: Path) -> int:
        import fcntl

        (path / RESUME_DIR).mkdir(exist_ok=True)
        fd = os.open(path / RESUME_DIR / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"work folder '{path}' is in use by another snapopt run") from None
        return fd

    @staticmethod
    def _read_journal(path: Path, lock_fd: int) -> dict[str, Any] | None:
        f = path / RESUME_DIR / "journal.json"
        if not f.is_file():
            return None
        try:
            journal = json.loads(f.read_text())
            if journal.get("format") != JOURNAL_FORMAT:
                raise ValueError(f"format {journal.get('format')!r}")
            return journal
        except (ValueError, OSError) as exc:
            os.close(lock_fd)
            raise UsageError(f"--resume: '{f}' cannot be read ({exc}); remove '{path}' to start again") from None

    def _write_journal(self) -> None:
        f = self.resume_dir / "journal.json"
        tmp = f.with_name(".journal.json.tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(self.journal, indent=1, default=str))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, f)

    # -- during the passes ------------------------------------------------------------------------------
    def bind(self, ctx: PassContext) -> None:
        self.ctx = ctx

    def persist(self, index: int, p, program, owners: list[str]):
        """Save the components pass ``index`` changed and go on with their reload (see the module docstring)."""
        from snapopt.models.pipeline import Pipeline
        from snapopt.serialization import load, save

        if program.structure_only:  # nothing to save: a resumed structure-only run starts over (it is quick)
            return program
        for attr in owners:
            module = getattr(program, attr)
            folder = self.resume_dir / "state" / f"{attr}-{index:03d}"
            shutil.rmtree(folder, ignore_errors=True)
            shell = Pipeline(source=program.source, resolution=program.resolution, prediction_type=program.prediction_type,
                             **{attr: module})
            save(shell, folder)
            again = getattr(load(folder), attr)
            problem = _weights_differ(module, again)
            if problem:
                raise PostconditionError(p.name, f"its '{attr}' does not reload from the work folder: {problem}", tuple(self.ctx.history))
            program = replace(program, **{attr: again})
            self.pending[attr] = folder.name
        return program

    def commit(self, index: int, p, program, records: list[PassRecord]) -> None:
        """Pass ``index`` is finished: journal its record, the report rows so far, the pipeline's other fields
        and the RNG state. The run goes on with the journal's JSON of records and report, as a resumed run does."""
        ctx = self.ctx
        if program.structure_only:
            return
        rows = json.loads(json.dumps([r.to_json() for r in records], default=str))
        records[:] = [PassRecord.from_json(r) for r in rows]
        report = json.loads(json.dumps(ctx.report, default=str))
        ctx.report.clear()
        ctx.report.update(report)
        self.journal["passes"] = rows
        self.journal["report"] = report
        self.journal["components"].update(self.pending)
        self.pending = {}
        self.journal["history"] = list(ctx.history)
        self.journal["fields"] = _pipeline_fields(program)
        self.journal["rng"] = _rng_state()
        self._write_journal()
        keep = set(self.journal["components"].values())
        for folder in (self.resume_dir / "state").iterdir():
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    # -- resuming ---------------------------------------------------------------------------------------
    def restore(self, teacher, ctx: PassContext):
        """The pipeline after the journal's last finished pass: the teacher (the input model as loaded) with the
        saved components in place, and the pass records; ``ctx`` gets the history and report rows back."""
        from snapopt.serialization import load

        j = self.journal
        try:
            modules = {attr: getattr(load(self.resume_dir / "state" / name), attr) for attr, name in j["components"].items()}
        except (OSError, ValueError, KeyError) as exc:  # a missing or damaged folder (ModelRefError is passed on as is)
            raise UsageError(f"--resume: the components saved in '{self.resume_dir}' cannot be reloaded ({exc.__class__.__name__}: "
                             f"{exc}); remove '{self.path}' to start again") from None
        fields = j["fields"]
        extra = dict(teacher.extra)
        scheduler = _scheduler_from(fields["scheduler"], teacher.scheduler)
        if "shipped_scheduler" in fields:
            extra["scheduler"] = _scheduler_from(fields["shipped_scheduler"], teacher.extra.get("scheduler"))
        pipe = replace(teacher, source=fields["source"], resolution=fields["resolution"], prediction_type=fields["prediction_type"],
                       scheduler=scheduler, extra=extra, **modules)
        ctx.history[:] = list(j["history"])
        ctx.report.clear()
        ctx.report.update(j["report"])
        return pipe, [PassRecord.from_json(r) for r in j["passes"]]

    def restore_rng(self) -> None:
        _set_rng_state(self.journal["rng"])

    # -- the end ----------------------------------------------------------------------------------------
    def clear_outputs(self) -> None:
        for name in OUTPUTS:
            f = self.path / name
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)
            elif f.exists() or f.is_symlink():
                f.unlink()

    def finish(self) -> None:
        """The run is complete: drop what only a resume needs and release the lock."""
        shutil.rmtree(self.resume_dir, ignore_errors=True)
        self._unlock()

    def close(self, *, keep: bool) -> None:
        """The run failed or was interrupted: keep the folder for ``--resume`` or remove it."""
        if not keep:
            shutil.rmtree(self.path, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _weights_differ(a, b) -> str | None:
    """Why two modules' state dicts are not the same names, dtypes and bit-identical values, or None."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return f"parameters {sorted(set(sa) ^ set(sb))[:3]} differ"
    for k, t in sa.items():
        u = sb[k]
        if t.shape != u.shape or t.dtype != u.dtype or not torch.equal(t.detach().cpu(), u):
            return f"'{k}' differs ({tuple(t.shape)} {t.dtype} vs {tuple(u.shape)} {u.dtype})"
    return None


def _scheduler_spec(s) -> dict[str, Any] | None:
    if s is None:
        return None
    return json.loads(json.dumps({"class": type(s).__name__, "config": dict(s.config)}, default=str))


def _scheduler_from(spec, like):
    """The scheduler ``spec`` describes: ``like`` itself when it is that one (passes share the input's)."""
    if spec is None:
        return None
    if _scheduler_spec(like) == spec:
        return like
    import diffusers

    return getattr(diffusers, spec["class"]).from_config(spec["config"])


def _pipeline_fields(pipe) -> dict[str, Any]:
    """What a pipeline holds besides its modules, as JSON (passes may change the prediction type or scheduler)."""
    fields = {"source": pipe.source, "resolution": pipe.resolution, "prediction_type": pipe.prediction_type,
              "scheduler": _scheduler_spec(pipe.scheduler)}
    if "scheduler" in pipe.extra:
        fields["shipped_scheduler"] = _scheduler_spec(pipe.extra["scheduler"])
    return fields


def _b64(t) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _rng_state() -> dict[str, Any]:
    """Every random generator a pass may draw from: torch (CPU and CUDA), Python, NumPy."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {"torch": _b64(torch.get_rng_state()), "python": json.loads(json.dumps(random.getstate())),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    def tensor(s: str):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()

    torch.set_rng_state(tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])
