"""The output folder: creatable and writable before any work starts, enough free space for what the run will
write, and no leftovers of killed runs (``.NAME.tmp-*`` / ``.NAME.old-*`` beside it).

``snapopt.run.apply`` writes into its work folder ``.NAME.work`` beside ``--out`` and renames it into place at
the end; ``--overwrite`` moves the old folder to ``.NAME.old-TIME`` first. A kill -9 leaves the work folder
behind on purpose: ``snapopt apply --resume`` continues from it, so it is never cleaned up here (a run without
``--resume`` refuses to start over it). ``.NAME.tmp-*`` (older versions' temporary folders) and
``.NAME.old-*`` are junk and are removed. Runs hold a shared lock on the parent folder while they work
(:func:`run_lock`); a leftover is removed only while no other run holds that lock, so a run never deletes the
temporary folder of one still working.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from snapopt.errors import UsageError

#: names run.apply gives its temporary and replaced folders
STALE = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-[A-Za-z0-9_]+$")
#: suffix of a run's work folder, ``.NAME.work`` (resumable: never stale)
WORK_SUFFIX = ".work"


def work_folder(out: str | Path) -> Path:
    """The hidden folder a run of ``out`` works in until it completes (see :mod:`snapopt.run`)."""
    out = Path(out)
    return out.with_name(f".{out.name}{WORK_SUFFIX}")
#: margin on the estimated output size (reports, ONNX external data, rounding)
MARGIN = 1.15


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(out: str | Path, *, overwrite: bool = False, expected_bytes: int | None = None,
                     what: str = "--out") -> None:
    """Raise a one-line UsageError if ``out`` cannot be created and written, already exists (without
    ``overwrite``), or its file system has less free space than ``expected_bytes`` (× a margin).
    Writes nothing that stays: the probe folder it creates is removed at once."""
    out = Path(out)
    if len(str(out)) > 4000 or any(len(part.encode()) > 200 for part in out.parts):
        raise UsageError(f"{what}: path is too long ({len(str(out))} characters; a name is at most 200 bytes here)")
    if "\x00" in str(out):
        raise UsageError(f"{what}: path contains a NUL character")
    try:
        exists = out.exists()
        if exists and not out.is_dir():
            raise UsageError(f"{what} '{out}' is a file, not a folder")
        if exists and not overwrite:
            raise UsageError(f"output folder '{out}' already exists; pass --overwrite or choose another {what}")
        base = _nearest_existing(out.parent.absolute() if not exists else out.parent.absolute())
    except OSError as exc:
        raise UsageError(f"{what} '{out}': {exc.strerror or exc.__class__.__name__}") from None
    if not base.is_dir():
        raise UsageError(f"{what} '{out}' cannot be created: '{base}' is a file, not a folder")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".snapopt-probe-", dir=base))
        probe.rmdir()
    except OSError as exc:
        reason = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted",
                  errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, exc.strerror)
        raise UsageError(f"{what} '{out}' cannot be written: {reason} in '{base}'") from None
    if expected_bytes:
        need = int(expected_bytes * MARGIN)
        free = shutil.disk_usage(base).free
        if need > free:
            raise UsageError(f"{what} '{out}': the run writes about {_gb(need)} but '{base}' has {_gb(free)} free")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@contextmanager
def run_lock(out: str | Path) -> Iterator[bool]:
    """Hold a shared lock on ``out``'s parent folder for the duration of a run; yields whether this run was
    alone there at the start (then it may clean leftovers: see :func:`cleanup_stale_runs`)."""
    import fcntl

    parent = _nearest_existing(Path(out).absolute().parent)
    try:
        fd = os.open(parent, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except OSError:
            alone = False
        if alone:
            # downgrade at once: other runs may start beside us; they just will not clean anything up
            fcntl.flock(fd, fcntl.LOCK_SH)
        else:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield alone
    finally:
        os.close(fd)


def cleanup_stale_runs(out: str | Path, *, alone: bool = True) -> list[Path]:
    """Remove ``.NAME.tmp-*`` and ``.NAME.old-*`` folders left beside ``out``'s parent by killed runs (every
    NAME, not only ``out``'s). Only when ``alone`` (no other run holds :func:`run_lock` on the parent).
    Work folders (``.NAME.work``) are kept: a killed run's is what ``--resume`` continues. Returns what was removed."""
    if not alone:
        return []
    parent = Path(out).absolute().parent
    removed = []
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:
        return []
    for entry in entries:
        if STALE.match(entry.name) and not entry.name.endswith(WORK_SUFFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    return removed


def estimate_output_bytes(model_bytes_fp32: int, *, save_model: bool, dtype: str = "float32", coreml: bool = False,
                          onnx: bool = False, weight_bits: int = 16) -> int:
    """What a run writes, from the input's fp32 weight bytes: the saved model in its dtype, Core ML weights
    at ``weight_bits`` (fp16 when 16) and ONNX at fp32. Passes only shrink models, so this is an upper bound."""
    total = 0
    if save_model:
        total += model_bytes_fp32 // (2 if dtype == "float16" else 1)
    if coreml:
        total += model_bytes_fp32 * (16 if weight_bits >= 16 else weight_bits) // 32
    if onnx:
        total += model_bytes_fp32
    return total
