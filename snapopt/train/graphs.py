"""Whole-step CUDA graphs for fixed-architecture training (``TrainOptions.cuda_graphs``, issue 15).

A zoo-size training step is ~4,800 kernel launches, so the host, not the GPU, sets its pace. Capturing the
whole step (teacher forward, student forward + feature hooks + loss, backward, gradient clipping, AdamW,
EMA) as one CUDA graph and replaying it costs one launch and no compilation. torch.compile's
reduce-overhead mode replays graphs too, but pays ~2 minutes of Inductor per model and batch shape.

A graph replays fixed device addresses with fixed shapes, so a step is split in two:

* ``inputs(step)``, eager: the objective's own seeded draws (the same generators as the ordinary loop, so
  the same samples and an exact resume) and anything that needs the host (the decoder's cache of teacher
  images). The results are copied into static buffers.
* ``compute(static)``, captured: the rest, device-only, with no host synchronisation. The objectives'
  schedules index a CPU table, so ``compute`` runs with a :class:`DeviceSchedule` in their place.

Whatever changes per step is a device tensor that the host refills before a replay: the LR (AdamW
``capturable``) and the EMA weight. Step distillation draws guidance per step, which changes the batch
shape, so it gets one graph for guided steps and one for plain steps. Robust training's random block
skipping is a gate vector: every candidate block runs and a select hands on its input where it is skipped,
and the optimizer step is undone for the skipped blocks (snapopt.train.robust.SkipGates). Each kind of step runs
:data:`WARMUP_STEPS` real steps eagerly on a side stream before capture, for cuDNN autotuning, the cuBLAS
workspaces and the optimizer state.

On CPU the same static-buffer step runs without capture: same training, no speed-up. The CPU tests compare
that path with the ordinary loop.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch import nn

from snapopt.errors import UsageError
from snapopt.train.accel import to_device
from snapopt.train.data import Batch
from snapopt.train.diffusion import Schedule
from snapopt.train.dist import DistInfo, shard, step_generator

#: eager steps per kind of step before it is captured (cuDNN autotuning, cuBLAS handles, optimizer state)
WARMUP_STEPS = 3
SUPPORTED = "recover (robust training included), decoder_distill, step_distill and reparametrise"


def refuse_incompatible(obj, o, info: DistInfo) -> None:
    """One clear line for what a captured step cannot hold; called before anything is trained."""
    name = getattr(obj, "name", type(obj).__name__)
    if getattr(obj, "skips_blocks", False) and not hasattr(_adapter_class(obj) or object, "optimizer_step"):
        raise UsageError(f"{name}: cuda_graphs cannot capture random block skipping in this objective (it changes the "
                         "graph every step); turn off cuda_graphs or robust")
    if info.enabled:
        raise UsageError(f"{name}: cuda_graphs is single-process only (not under torchrun with parallel: {o.parallel}); "
                         "turn off cuda_graphs")
    if o.gradient_checkpointing:
        raise UsageError(f"{name}: cuda_graphs and gradient_checkpointing cannot be combined; turn one of them off")
    if o.compile is not None:
        raise UsageError(f"{name}: cuda_graphs and compile cannot be combined (compile's reduce-overhead mode makes "
                         "its own graphs); choose one")
    if _adapter_class(obj) is None:
        raise UsageError(f"{name}: cuda_graphs supports the {SUPPORTED} objectives only")


class DeviceSchedule(Schedule):
    """The objective's :class:`Schedule`, with alpha_bar looked up on the device: the original indexes a
    CPU table, a host round trip that a graph cannot hold. Same float64 table, so the same values."""

    def __init__(self, sched: Schedule, device: torch.device):
        self.__dict__.update(sched.__dict__)
        self.table = sched.alphas_cumprod.to(device)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        t = t.long().to(self.table.device)
        ab = self.table[t.clamp(min=0)]
        return torch.where(t < 0, torch.full_like(ab, self.final), ab)


@contextmanager
def _swapped(obj, **attrs):
    """Set attributes of the objective for one call (its own methods then read static buffers)."""
    old = {k: getattr(obj, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(obj, k, v)
        yield obj
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


@dataclass
class StepInputs:
    key: Hashable                         # which graph: steps of one key share shapes
    tensors: dict[str, torch.Tensor]      # copied into that key's static buffers
    host: dict[str, float] = field(default_factory=dict)  # logged Python numbers (compute leaves them as None)


def _batch_tensors(b: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {"x0": b.x0, "noise": b.noise, "cond": b.cond, "uncond": b.uncond, "t": to_device(b.t, device)}


class RecoverStep:
    """RecoverObjective: its ``draw()`` (the batch, robust training's gates) stays eager; its ``loss_from()``
    runs in the graph, with a device schedule.

    Robust training (random block skipping) is data here as in the ordinary loop: the step's draw, made
    eagerly from the same generator, fills a static gate vector; the captured forward gates every candidate
    block and the captured optimizer step undoes itself for the skipped ones (snapopt.train.robust.SkipGates)."""

    def __init__(self, obj, o, device: torch.device):
        self.obj, self.o, self.device = obj, o, device
        self.sched = DeviceSchedule(obj.sched, device)
        self.gates = obj.gates

    def inputs(self, step: int, info: DistInfo) -> StepInputs:
        tensors, host = self.obj.draw(step, info)
        return StepInputs(None, {k: to_device(v, self.device) for k, v in tensors.items()}, host)

    def compute(self, key, s: dict[str, torch.Tensor], info: DistInfo):
        with _swapped(self.obj, sched=self.sched):
            return self.obj.loss_from(s)

    def optimizer_step(self, opt: torch.optim.Optimizer, s: dict[str, torch.Tensor]):
        """The optimizer step, undone for the parameters of blocks this step skipped."""
        return self.gates.frozen(opt, s["skip"]) if self.gates is not None else nullcontext()


class StepDistillStep:
    """StepDistillObjective: its ``draw()`` (seeded choices, the data batch or trajectory states) stays eager;
    its ``loss_from()`` (the teacher's two DDIM steps, the target, the student's loss) is captured, one graph
    per kind of step (guided or plain, noised data or trajectory states)."""

    def __init__(self, obj, o, device: torch.device):
        self.obj, self.o, self.device = obj, o, device
        self.scheds = {"sched": DeviceSchedule(obj.sched, device), "ssched": DeviceSchedule(obj.ssched, device)}

    def inputs(self, step: int, info: DistInfo) -> StepInputs:
        key, tensors, host = self.obj.draw(step, info)
        return StepInputs(key, {k: to_device(v, self.device) for k, v in tensors.items()}, host)

    def compute(self, key, s: dict[str, torch.Tensor], info: DistInfo):
        with _swapped(self.obj, **self.scheds):
            return self.obj.loss_from(key, s)


class ReparamStep:
    """ReparamObjective (epsilon -> v warm-up of step distillation): timesteps drawn eagerly as its ``loss()``
    draws them; the frozen reference's converted output and the student's loss are captured."""

    def __init__(self, obj, o, device: torch.device):
        self.obj, self.o, self.device = obj, o, device
        self.scheds = {"src": DeviceSchedule(obj.src, device), "dst": DeviceSchedule(obj.dst, device)}

    def inputs(self, step: int, info: DistInfo) -> StepInputs:
        obj, n = self.obj, self.o.batch
        b = obj.data.batch(step, n, info)
        gen = step_generator(self.o.seed, step, stream=3)
        t = shard(torch.randint(0, obj.src.num_train, (n,), generator=gen), info)
        tensors = _batch_tensors(b, self.device)
        tensors["t"] = to_device(t, self.device)
        return StepInputs(None, tensors)

    def compute(self, key, s: dict[str, torch.Tensor], info: DistInfo):
        from snapopt.train.step_distill import snr_trunc_error

        obj, t = self.obj, s["t"]
        with _swapped(obj, **self.scheds):
            x_t = obj.src.add_noise(s["x0"], s["noise"], t).float()
            target = obj.target(x_t, t, s["cond"])
            pred = obj.forward_model(x_t, t, s["cond"], return_dict=False)[0].float()
            err = snr_trunc_error(obj.dst, pred, target, x_t, t)
        return err.mean(), {"reparam": err.mean().detach()}


class DecoderStep:
    """DecoderObjective: the latents and the teacher's images (its cache, by the batch's pool rows) stay
    eager; the student decoder's forward and the losses are captured."""

    def __init__(self, obj, o, device: torch.device):
        self.obj, self.o, self.device = obj, o, device

    def inputs(self, step: int, info: DistInfo) -> StepInputs:
        b = self.obj.data.batch(step, self.o.batch, info)
        z = b.x0 / self.obj.scale
        return StepInputs(None, {"z": z, "ref": self.obj.targets(b.x0, z, b.pool_index)})

    def compute(self, key, s: dict[str, torch.Tensor], info: DistInfo):
        from snapopt.train.decoder import reconstruction_loss

        return reconstruction_loss(self.obj.lo, self.obj.forward_model(s["z"]).float(), s["ref"])


def _adapter_class(obj):
    from snapopt.train import decoder, recover, step_distill

    for cls, adapter in ((recover.RecoverObjective, RecoverStep), (step_distill.StepDistillObjective, StepDistillStep),
                         (getattr(step_distill, "ReparamObjective", None), ReparamStep), (decoder.DecoderObjective, DecoderStep)):
        if cls is not None and isinstance(obj, cls):
            return adapter
    return None


class GraphedStep:
    """One training step from static buffers: eager (CPU, and the warm-up steps), else a replayed graph.

    ``step(step, lr)`` trains one step and returns (loss, parts) as device tensors. A replay overwrites the
    previous step's tensors of the same kind, so callers copy what they keep (the trainer's log stacks them
    at once)."""

    def __init__(self, obj, o, *, module: nn.Module, params: list[nn.Parameter], opt: torch.optim.Optimizer, ema,
                 device: torch.device, info: DistInfo, autocast: Callable[[bool], Any]):
        refuse_incompatible(obj, o, info)
        self.adapter = _adapter_class(obj)(obj, o, device)
        self.module, self.params, self.opt, self.ema = module, params, opt, ema
        self.device, self.info, self.autocast = device, info, autocast
        self.clip = o.optim.grad_clip
        self.capture = device.type == "cuda"
        if self.capture and not all(g.get("capturable") and torch.is_tensor(g["lr"]) for g in opt.param_groups):
            raise ValueError("cuda_graphs needs a capturable optimizer with a tensor LR (accel.adamw(capturable=True))")
        self.ema_weight = torch.zeros((), device=device) if ema is not None else None
        self.static: dict[Hashable, dict[str, torch.Tensor]] = {}
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[Hashable, tuple] = {}
        self.eager_steps: Counter = Counter()
        self.side = torch.cuda.Stream(device) if self.capture else None

    @property
    def captured(self) -> list:
        return list(self.graphs)

    def step(self, step: int, lr: float) -> tuple[torch.Tensor, dict[str, Any]]:
        with torch.no_grad():
            for g in self.opt.param_groups:
                if torch.is_tensor(g["lr"]):
                    g["lr"].fill_(lr)
                else:
                    g["lr"] = lr
            if self.ema is not None:
                self.ema_weight.fill_(1 - self.ema.decay_at(step))
        with self.autocast(True):
            inp = self.adapter.inputs(step, self.info)
        key, static = inp.key, self._load(inp)
        if key in self.graphs:
            self.graphs[key].replay()
            loss, parts = self.outputs[key]
        elif not self.capture:
            loss, parts = self._train(key, static)
        elif self.eager_steps[key] < WARMUP_STEPS:
            self.eager_steps[key] += 1
            here = torch.cuda.current_stream(self.device)
            self.side.wait_stream(here)
            with torch.cuda.stream(self.side):
                loss, parts = self._train(key, static)
            here.wait_stream(self.side)
        else:
            loss, parts = self._capture(key, static)
        return loss, {k: inp.host[k] if v is None else v for k, v in parts.items()}

    def _load(self, inp: StepInputs) -> dict[str, torch.Tensor]:
        """Copy the step's inputs into the static buffers of its key (allocated on the key's first step)."""
        static = self.static.get(inp.key)
        if static is None:
            static = self.static[inp.key] = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in inp.tensors.items()}
            return static
        if static.keys() != inp.tensors.keys():
            raise RuntimeError(f"cuda_graphs: step inputs changed from {sorted(static)} to {sorted(inp.tensors)}")
        for k, v in inp.tensors.items():
            if v.shape != static[k].shape:
                raise UsageError(f"cuda_graphs: input '{k}' changed shape {tuple(static[k].shape)} -> {tuple(v.shape)}; "
                                 "a captured step needs static shapes")
            static[k].copy_(v)
        return static

    def _train(self, key, static) -> tuple[torch.Tensor, dict[str, Any]]:
        """The whole step, as the ordinary loop runs it; what is captured."""
        with self.autocast(False):  # autocast's weight-cast cache would keep capture-time tensors
            loss, parts = self.adapter.compute(key, static, self.info)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        masked = getattr(self.adapter, "optimizer_step", None)
        with masked(self.opt, static) if masked is not None else nullcontext():
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # the gradients are temporaries of the graph's memory pool
        if self.ema is not None:
            self.ema.lerp_(self.module, self.ema_weight)
        return loss.detach(), parts

    def _capture(self, key, static):
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                out = self._train(key, static)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"cuda_graphs: the step could not be captured ({first[:200]}); train without cuda_graphs") from exc
        self.graphs[key], self.outputs[key] = g, out
        g.replay()  # capturing records the step without running it
        return out

    def close(self) -> None:
        """Free the graphs and their memory pools."""
        self.graphs.clear()
        self.outputs.clear()
        self.static.clear()
