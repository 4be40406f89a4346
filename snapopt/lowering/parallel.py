"""ONNX exports in a worker process while the Core ML lowering runs in this one.

The two lowerings share nothing but the weights: each traces, converts and checks on its own, and both are mostly
single-threaded Python (torch.export, onnxscript, coremltools' MIL passes), so on a machine with cores to spare
running them side by side saves the shorter of the two. The worker is spawned (no fork of a process holding
torch's thread pools), gets the components' interfaces pickled, and reports each export as it starts and ends:
a thread here turns those reports into the run's progress lines and stage timings, so each ONNX stage's timing
is its own wall time, overlapping the Core ML stages'. A failure is re-raised here with its type and message
(naming the component, as in a serial run); a worker that dies says so; leaving early terminates the worker.
"""

from __future__ import annotations

import os
import pickle
import threading
import traceback
from pathlib import Path
from typing import Any

from snapopt.errors import LoweringError

#: below this many CPUs the exports run one after the other: two processes on two cores would only contend
MIN_CPUS = 4


#: the worker gets its own copy of the weights (pickled): only where they take at most this share of the RAM
MAX_RAM_SHARE = 0.2


def ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def use_worker(cpus: int | None = None, weight_bytes: int = 0, ram: int | None = None) -> bool:
    """Whether to overlap ONNX with Core ML: where the machine has ``MIN_CPUS`` or more cores and the exported
    weights (``weight_bytes``, copied into the worker) fit ``MAX_RAM_SHARE`` of its RAM, unless the environment sets
    ``SNAPOPT_EXPORT_WORKER`` (``0``: always serial, ``1``: always the worker; for CI and benchmarks)."""
    forced = os.environ.get("SNAPOPT_EXPORT_WORKER", "").strip()
    if cpus is None and forced in ("0", "1"):
        return forced == "1"
    ram = ram if ram is not None else ram_bytes()
    if ram is not None and weight_bytes > MAX_RAM_SHARE * ram:
        return False
    return (cpus if cpus is not None else (os.cpu_count() or 1)) >= MIN_CPUS


def _run(jobs, out_dir: str, check: bool, threads: int, queue) -> None:
    """Worker body: export every job, reporting ("start", label), ("done", label, info) or ("error", label, exc)."""
    import torch

    from snapopt.lowering.onnx import export_io

    torch.set_num_threads(threads)
    for label, component, name, io in jobs:
        queue.put(("start", label))
        try:
            info = export_io(io, component, Path(out_dir), check=check, name=name)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent, typed where it pickles
            try:
                pickle.dumps(exc)
                payload = exc
            except Exception:
                payload = RuntimeError(f"{exc.__class__.__name__}: {exc}\n{traceback.format_exc()}")
            queue.put(("error", label, payload))
            return
        queue.put(("done", label, info))
    queue.put(("end",))


class OnnxWorker:
    """Exports ``jobs`` — ``(stage label, component, file name or None, ComponentIO)`` — in a spawned process.

    ``stage`` is the run's stage context manager: entered when the worker starts a job and left when it reports
    the job done, from a thread of this process."""

    def __init__(self, jobs: list[tuple[str, str, str | None, Any]], out_dir: Path, *, check: bool, stage,
                 threads: int | None = None):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._queue = ctx.Queue()
        self._labels = [j[0] for j in jobs]
        threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self._proc = ctx.Process(target=_run, args=(jobs, str(out_dir), check, threads, self._queue), daemon=True,
                                 name="snapopt-onnx-export")
        self._stage = stage
        self.infos: list[dict[str, Any]] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._listen, daemon=True, name="snapopt-onnx-listener")

    def start(self) -> "OnnxWorker":
        self._proc.start()
        self._thread.start()
        return self

    def _listen(self) -> None:
        import queue as queue_mod

        current, label = None, None
        try:
            while True:
                try:
                    msg = self._queue.get(timeout=0.5)
                except queue_mod.Empty:
                    if not self._proc.is_alive():
                        # a last message may have landed between the timeout and the check
                        try:
                            msg = self._queue.get(timeout=1.0)
                        except queue_mod.Empty:
                            what = f" while running '{label}'" if label else ""
                            raise LoweringError(f"the ONNX export worker exited (code {self._proc.exitcode}){what}") from None
                    else:
                        continue
                if msg[0] == "start":
                    label = msg[1]
                    current = self._stage(label)
                    current.__enter__()
                elif msg[0] == "done":
                    self.infos.append(msg[2])
                    current.__exit__(None, None, None)
                    current, label = None, None
                elif msg[0] == "error":
                    raise msg[2]
                else:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that joins
            self._error = exc

    def join(self) -> list[dict[str, Any]]:
        """Wait for every export; re-raise the worker's failure here."""
        self._thread.join()
        self.close()
        if self._error is not None:
            raise self._error
        return self.infos

    def close(self) -> None:
        """Stop the worker if it still runs (this process failed first or finished waiting)."""
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(timeout=10)
        self._queue.close()
