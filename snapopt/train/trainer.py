"""The training loop every job shares: AdamW, LR schedule, EMA, autocast, gradient checkpointing, DDP,
checkpoints with exact resume, CSV/PNG loss logs and a progress bar.

What is learned is up to an :class:`Objective`: it names the module to train and returns the loss of a
step. The loop never draws random numbers itself; objectives draw from the step's seeded generator, so
``N`` straight steps and ``N/2`` + resume + ``N/2`` give bit-identical weights on CPU.

With ``cuda_graphs`` the step runs from static buffers as one replayed CUDA graph (snapopt.train.graphs).
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from snapopt.core.phases import phase
from snapopt.errors import UsageError
from snapopt.train import accel, dist, graphs, logs
from snapopt.train import checkpoint as ckpt
from snapopt.train.ema import EMA
from snapopt.train.options import TrainOptions
from snapopt.train.schedule import lr_at


class Objective(Protocol):
    name: str
    #: set by the trainer: the module to call in forward passes (the DDP wrapper under torchrun)
    forward_model: nn.Module
    #: an objective that skips blocks at random needs DDP's find_unused_parameters
    skips_blocks: bool

    def trainable(self) -> nn.Module: ...

    def loss(self, step: int, info: dist.DistInfo) -> tuple[torch.Tensor, dict[str, float]]: ...

    # optional: ``optimizer_step(opt)``, a context around ``opt.step()`` (robust training undoes the step for
    # the blocks it skipped, see snapopt.train.robust.SkipGates)


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    steps: int
    seconds: float
    images_per_second: float | None
    resumed_from: int | None = None
    plot: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def autocast_for(device: torch.device, mode: str, cache: bool = True):
    """``cache=False`` inside CUDA-graph capture: cached weight casts would outlive the captured step."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "no"
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return nullcontext()


#: options a resumed run may change: how fast or how often, not what is trained
_NOT_THE_JOB = {"progress", "steps", "checkpoint_every", "compile", "fused_optimizer", "cudnn_benchmark", "channels_last", "parallel",
                "cuda_graphs", "attention_backend", "deterministic"}


def _without_new_defaults(mine: Any, theirs: Any, defaults: Any) -> Any:
    """``mine`` without the keys ``theirs`` lacks whose value is the default, recursively (nested option groups)."""
    if not (isinstance(mine, dict) and isinstance(theirs, dict) and isinstance(defaults, dict)):
        return mine
    return {k: _without_new_defaults(v, theirs.get(k), defaults.get(k)) for k, v in mine.items()
            if k in theirs or k not in defaults or v != defaults[k]}


#: logged values stay on the device for at most this many steps (one host sync per flush, not per step)
_FLUSH_EVERY = 50


class _PendingLog:
    """Loss rows waiting on the device. Reading a CUDA scalar stalls the host until the GPU catches up,
    so the loop keeps the step's tensors and reads a whole window at once (and averages it over ranks in
    one all-reduce). Non-finite losses are caught at the flush, before any checkpoint is written."""

    def __init__(self, name: str, info: dist.DistInfo, device: torch.device, history: list, bar):
        self.name, self.info, self.device, self.history, self.bar = name, info, device, history, bar
        self.rows: list[tuple] = []
        self.window_steps = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, step: int, lr: float, loss: torch.Tensor, parts: dict[str, Any]) -> None:
        # device tensors are stacked where they are; Python numbers stay on the host (a scalar copied to the
        # GPU from pageable memory would wait for the queue to drain, which is the stall this class avoids)
        items = {"loss": loss.detach(), **parts}
        on_dev = [k for k, v in items.items() if torch.is_tensor(v)]
        host = {k: float(v) for k, v in items.items() if not torch.is_tensor(v)}
        vals = torch.stack([items[k].to(torch.float32).reshape(()) for k in on_dev])
        self.rows.append((step, lr, list(items), on_dev, host, vals))

    def flush(self, t_window: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if not self.rows:
            return
        flat = torch.cat([r[5] for r in self.rows]).double()
        if self.info.enabled:
            if flat.device != self.device:  # host-side scalars only: the backend needs them on its device
                flat = flat.to(self.device)
            torch.distributed.all_reduce(flat)
            flat /= self.info.world
        values = flat.tolist()
        seconds = (time.perf_counter() - t_window) / max(self.window_steps, 1)
        i = 0
        for step, lr, keys, on_dev, host, _ in self.rows:
            measured = dict(zip(on_dev, values[i:i + len(on_dev)]))
            i += len(on_dev)
            row = {k: measured[k] if k in measured else host[k] for k in keys}
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"{self.name}: loss is {row['loss']} at step {step}")
            self.history.append({"step": step, "lr": lr, **row, "seconds": round(seconds, 4)})
        self.rows.clear()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.history[-1]['loss']:.4g}")


class Trainer:
    def __init__(self, objective: Objective, options: TrainOptions, out_dir: Path | None, *,
                 info: dist.DistInfo | None = None, device: torch.device | None = None, title: str | None = None):
        self.obj, self.o = objective, options
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.info = info or dist.DistInfo()
        self.device = device or torch.device("cpu")
        self.title = title or objective.name
        self.fsdp = False  # set by run(): train.parallel fsdp under torchrun
        self.notes: list[str] = []  # one line each, for the job's report
        if options.batch % self.info.world:
            raise UsageError(f"batch {options.batch} does not split evenly over {self.info.world} processes")

    # ------------------------------------------------------------------------------------------------
    @phase("train")
    def run(self, *, resume: bool = False, until: int | None = None) -> TrainResult:
        """Train to ``options.steps``. ``until`` stops early *without* a final checkpoint (a simulated kill).
        Timed as the pass's ``train`` phase."""
        o, info = self.o, self.info
        self.notes = []
        module = self.obj.trainable()
        module.train()
        graphed = bool(o.cuda_graphs)
        if graphed:  # before anything is built: one line for what a captured step cannot hold
            graphs.refuse_incompatible(self.obj, o, info)
        accel.configure_backends(o, self.device)
        if o.channels_last:
            module.to(memory_format=torch.channels_last)
        if o.gradient_checkpointing:
            if not hasattr(module, "enable_gradient_checkpointing"):
                raise UsageError(f"{self.obj.name}: gradient_checkpointing is not supported by {type(module).__name__}")
            module.enable_gradient_checkpointing()
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise UsageError(f"{self.obj.name}: nothing to train (no parameter requires grad)")
        self.fsdp = info.enabled and o.parallel == "fsdp"
        if self.fsdp and getattr(self.obj, "skips_blocks", False):
            raise UsageError(f"{self.obj.name}: parallel: fsdp does not support random block skipping (robust training); use ddp")

        start, resumed_from, history, state = 0, None, [], None
        ck_root = self.out_dir / "checkpoints" if self.out_dir is not None else None
        if resume:
            found = ckpt.latest(ck_root) if ck_root is not None else None
            if found is not None:
                state = ckpt.read(found)
                self._check_same_job(state["meta"])
                module.load_state_dict(state["model"], strict=True)
                start = resumed_from = state["meta"]["step"]
                history = logs.read_csv(self.out_dir / "losses.csv", before_step=start)

        trained = module  # what the optimizer steps: the module itself, or its FSDP-sharded copy
        if self.fsdp:
            from snapopt.train import fsdp

            trained = fsdp.shard_copy(module, self.device)
            params = [p for p in trained.parameters() if p.requires_grad]
        opt = accel.adamw(params, o, self.device, capturable=graphed and self.device.type == "cuda")
        ema = None
        if o.ema > 0:
            ema = fsdp.ShardedEMA(trained, o.ema) if self.fsdp else EMA(module, o.ema)
        if state is not None:
            if self.fsdp:
                fsdp.load_optimizer_state(trained, opt, state["optimizer"])
            else:
                accel.load_optimizer_state(opt, state["optimizer"])
            if ema is not None and state["ema"] is not None:
                ema.load_state_dict(state["ema"])

        forward = trained
        if info.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # random skipping leaves parameters without gradients, unless it is gated (every block runs, robust.SkipGates)
            skipping = getattr(self.obj, "skips_blocks", False) and getattr(self.obj, "gates", None) is None
            unused = o.find_unused_parameters if o.find_unused_parameters is not None else skipping
            forward = DDP(module, device_ids=[self.device] if self.device.type == "cuda" else None, find_unused_parameters=unused)
        self.compiled = o.compile is not None and o.compile.student and not getattr(self.obj, "skips_blocks", False)
        if self.compiled:  # random block skipping changes the graph every step: it stays eager
            forward = accel.maybe_compile(forward, o.compile, "student")
        self.obj.forward_model = forward
        runner = None
        if graphed:
            runner = graphs.GraphedStep(self.obj, o, module=module, params=params, opt=opt, ema=ema, device=self.device,
                                        info=info, autocast=lambda cache: autocast_for(self.device, o.mixed_precision, cache))
            if self.device.type != "cuda":
                self.notes.append(f"cuda_graphs: no CUDA device ({self.device}), so the step runs from static buffers "
                                  "without capture (same training, no speed-up)")
                if info.main:
                    print(f"note: {self.obj.name}: {self.notes[-1]}", file=sys.stderr, flush=True)

        stop = o.steps if until is None else min(until, o.steps)
        prepare = getattr(self.obj, "prepare", None)
        if prepare is not None and start < stop:
            # data the objective builds once (step distillation's trajectory pools), before the clock starts and under
            # the autocast its steps draw under: the values a lazy build on the first step gave, while the report's
            # seconds and images/s count training only
            with autocast_for(self.device, o.mixed_precision):
                prepare()
        bar = None
        if o.progress and info.main and start < o.steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=o.steps, initial=start, desc=self.title, dynamic_ncols=True, leave=False)
        log = _PendingLog(self.obj.name, info, self.device, history, bar)
        masked_step = getattr(self.obj, "optimizer_step", None)
        timed_steps, timed = 0, 0.0
        t_run = time.perf_counter()
        t_window = time.perf_counter()
        for step in range(start, stop):
            lr = lr_at(step, o.steps, o.optim)
            if runner is not None:  # the same step from static buffers, replayed as a CUDA graph on the GPU
                loss, parts = runner.step(step, lr)
            else:
                for g in opt.param_groups:
                    g["lr"] = lr
                accel.step_begin(o.compile)
                with autocast_for(self.device, o.mixed_precision):
                    loss, parts = self.obj.loss(step, info)
                loss.backward()
                if o.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, o.optim.grad_clip)
                with masked_step(opt) if masked_step is not None else nullcontext():  # robust: skipped blocks stay put
                    opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(trained, step)
            if step % o.log_every == 0 or step == o.steps - 1:
                log.add(step, lr, loss, parts)
            done = step + 1
            save = ck_root is not None and ((o.checkpoint_every and done % o.checkpoint_every == 0 and done < o.steps) or done == o.steps)
            log.window_steps += 1
            if step == start or save or done == stop or len(log) >= _FLUSH_EVERY:
                log.flush(t_window)  # waits for the device: the window's time is real
                now = time.perf_counter()
                if step > start:  # the first step of a run pays for warm-up, it is timed alone
                    timed_steps, timed = timed_steps + log.window_steps, timed + now - t_window
                log.window_steps, t_window = 0, now
            if bar is not None:
                bar.update(1)
            if save:
                self._save(ck_root, done, trained, opt, ema, history)
                t_window = time.perf_counter()  # saving is not training time
        if bar is not None:
            bar.close()
        extra: dict[str, Any] = {}
        if runner is not None:
            extra["cuda_graphs"] = {"captured": [str(k) for k in runner.captured], "warmup_steps": graphs.WARMUP_STEPS}
            runner.close()
        if self.notes:
            extra["notes"] = list(self.notes)

        plot = None
        if self.out_dir is not None and info.main:
            logs.write_csv(self.out_dir / "losses.csv", history)
            plot = logs.plot(self.out_dir / "losses.png", history, self.title)
        if ema is not None and o.use_ema and stop == o.steps:
            ema.copy_to(trained)
        if self.fsdp:  # the trained weights, gathered, back into the plain module
            module.load_state_dict(fsdp.full_model_state(trained))
        if o.channels_last:
            module.to(memory_format=torch.contiguous_format)
        self.obj.forward_model = module  # evaluations after training run the plain module
        ips = (timed_steps * o.batch / timed) if timed > 0 else None
        return TrainResult(history=history, steps=stop - start, seconds=time.perf_counter() - t_run, images_per_second=ips,
                           resumed_from=resumed_from, plot=plot, extra=extra)

    # ------------------------------------------------------------------------------------------------
    def _job_id(self) -> dict[str, Any]:
        return {"objective": self.obj.name, "options": self.o.model_dump(mode="json", exclude=_NOT_THE_JOB)}

    def _check_same_job(self, meta: dict[str, Any]) -> None:
        mine = json.loads(json.dumps(self._job_id()))
        theirs = meta.get("job")
        if isinstance(theirs, dict) and theirs.get("objective") == mine["objective"]:
            # an option added to snapopt after the checkpoint was written, at its default, is the job it trained: a
            # device run resumed across an upgrade goes on (the default is what the older version did)
            defaults = TrainOptions().model_dump(mode="json", exclude=_NOT_THE_JOB)
            mine = {**mine, "options": _without_new_defaults(mine["options"], theirs.get("options"), defaults)}
        if theirs != mine:
            raise UsageError(f"{self.obj.name}: checkpoint in '{self.out_dir}' was written by a different job or options; "
                             "use a new output folder or the same spec")

    def _save(self, root: Path, done: int, module, opt, ema, history) -> None:
        if self.fsdp:  # gathering is a collective: every rank takes part, rank 0 writes
            from snapopt.train import fsdp

            model, optim, ema_sd = fsdp.full_model_state(module), fsdp.full_optimizer_state(module, opt), ema.state_dict() if ema else None
        if self.info.main:
            if not self.fsdp:
                model, optim, ema_sd = module.state_dict(), accel.optimizer_state(opt), ema.state_dict() if ema else None
            # the log first: a checkpoint must never cover steps whose losses are not on disk (a resume keeps
            # the log's rows before the checkpoint's step and appends from there)
            logs.write_csv(self.out_dir / "losses.csv", history)
            ckpt.write(root, done, model=model, optimizer=optim, ema=ema_sd,
                       meta={"job": self._job_id()}, shard_mb=self.o.shard_mb, keep=self.o.keep_checkpoints)
        dist.barrier(self.info)
