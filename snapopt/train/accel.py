"""The fast path of the training loop: what makes a step cost what the GPU needs, not what Python needs.

A small UNet (the zoo's 13.6 M model) is bound by the host: measured on an H200 at batch 512, a student
forward + backward took 101 ms eagerly and 30 ms as a CUDA graph (torch.compile, reduce-overhead); AdamW took
6.5 ms as foreach and 1.9 ms fused (bench/results/train_profile_zoo_snapshapes_b512_h200.json). Each helper
here is one such fix, selected by :class:`~snapopt.train.options.TrainOptions`; none changes what is trained.
"""

from __future__ import annotations

import copy
import os
import weakref
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from snapopt.errors import UsageError
from snapopt.train.options import CompileOptions, TrainOptions


def uses_bf16(o: TrainOptions, device: torch.device) -> bool:
    return o.mixed_precision == "bf16" or (o.mixed_precision == "auto" and device.type == "cuda")


def teacher_dtype(o: TrainOptions, device: torch.device) -> torch.dtype:
    if o.teacher_precision == "bf16" or (o.teacher_precision == "auto" and uses_bf16(o, device)):
        return torch.bfloat16
    return torch.float32


_SDPA_FLAGS = {"flash": "flash", "cudnn": "cudnn", "efficient": "mem_efficient"}


def configure_backends(o: TrainOptions, device: torch.device) -> None:
    """cuDNN autotuning: at the zoo's small channel counts its default algorithms cost 15% of a step. The
    attention kernel (``attention_backend``): process-wide switches, as cudnn.benchmark is. ``deterministic``:
    two GPU runs of one seed chose different blocks in block_prune (eighth day), since robust training's
    kernels are not bit-reproducible and autotuning picks kernels by timing."""
    if o.deterministic:
        enable_deterministic_kernels()
    # after a stage that asked for determinism, a later one does not turn autotuning back on
    elif torch.are_deterministic_algorithms_enabled() and o.cudnn_benchmark:
        raise UsageError("train.cudnn_benchmark: true conflicts with deterministic kernels (the recipe's deterministic: true "
                         "or an earlier stage's train.deterministic): cuDNN's autotuning picks kernels by timing")
    elif device.type == "cuda" and not torch.are_deterministic_algorithms_enabled() and o.cudnn_benchmark is not False:
        torch.backends.cudnn.benchmark = True
    if o.attention_backend != "auto":
        for name, flag in _SDPA_FLAGS.items():
            getattr(torch.backends.cuda, f"enable_{flag}_sdp")(name == o.attention_backend)
        torch.backends.cuda.enable_math_sdp(True)  # the fallback for a shape the chosen kernel refuses


def enable_deterministic_kernels() -> None:
    """Deterministic kernels process-wide (an op without one only warns), cuDNN autotuning off, cuBLAS's workspace
    fixed. Two H100 runs of recipes/snapfusion-train.yaml scored the same to every printed digit this way; without it,
    the same seed chose different blocks (docs/training.md, "Ninth day")."""
    # cuBLAS reads this when it makes its handle: effective only if no matmul ran on the device yet, hence the
    # recipe-level switch (deterministic_kernels, before the model loads) or an export before the process starts
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextmanager
def deterministic_kernels(enabled: bool = True):
    """The process's kernel settings kept for a block (a whole ``snapopt apply`` run) and put back after it:
    deterministic algorithms, cuDNN autotuning, the attention kernels and cuBLAS's workspace, which training stages
    set process-wide (:func:`configure_backends`). ``enabled``: :func:`enable_deterministic_kernels` for the block
    (the recipe's ``deterministic: true``). A Python caller's later work is neither slowed nor changed by the run."""
    sdp = {f: getattr(torch.backends.cuda, f"{f}_sdp_enabled")() for f in (*_SDPA_FLAGS.values(), "math")}
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if enabled:
        enable_deterministic_kernels()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        for f, on in sdp.items():
            getattr(torch.backends.cuda, f"enable_{f}_sdp")(on)
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def reset_attention_backends() -> None:
    """Every SDPA kernel allowed again (torch's default), e.g. between benchmark configurations."""
    for flag in (*_SDPA_FLAGS.values(), "math"):
        getattr(torch.backends.cuda, f"enable_{flag}_sdp")(True)


def adamw(params, o: TrainOptions, device: torch.device, *, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW, fused into one kernel on CUDA (``fused_optimizer``); same update rule as the foreach one.

    ``capturable`` (CUDA graphs): the step count stays on the device and the LR is a device tensor the loop
    refills (``fill_``) each step, since a replayed graph cannot take a new Python number."""
    fused = o.fused_optimizer if o.fused_optimizer is not None else device.type == "cuda"
    kw: dict[str, Any] = {"fused": True} if fused and device.type == "cuda" else {}
    lr: float | torch.Tensor = o.optim.lr
    if capturable:
        if device.type != "cuda":
            raise ValueError("a capturable optimizer needs a CUDA device")
        kw["capturable"] = True
        lr = torch.tensor(o.optim.lr, dtype=torch.float32, device=device)
    return torch.optim.AdamW(params, lr=lr, betas=o.optim.betas, eps=o.optim.eps, weight_decay=o.optim.weight_decay, **kw)


#: optimizer settings that belong to this run's speed options, not to the checkpoint it resumes from
_RUN_KEYS = ("lr", "fused", "foreach", "capturable")


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``opt.load_state_dict(state)``, keeping this run's fused/capturable flags and LR object: a resumed run
    may change speed options, and a checkpoint would otherwise bring its own (a float LR into a captured
    graph's LR tensor, or a step count on the wrong device)."""
    mine = [{k: g[k] for k in _RUN_KEYS if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, keep in zip(opt.param_groups, mine):
        loaded_lr = g["lr"]
        g.update(keep)
        if torch.is_tensor(g["lr"]):
            with torch.no_grad():
                g["lr"].fill_(float(loaded_lr))
        on_device = bool(g.get("capturable") or g.get("fused"))
        for p in g["params"]:
            st = opt.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` with a tensor LR as a float (checkpoints keep param_groups as JSON)."""
    sd = opt.state_dict()
    sd["param_groups"] = [{**g, "lr": float(g["lr"])} if torch.is_tensor(g.get("lr")) else g for g in sd["param_groups"]]
    return sd


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a stall: a copy from pageable memory waits for the GPU to drain first, one from
    pinned memory is queued like a kernel (and the caching host allocator keeps the block until it ran)."""
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def maybe_compile(fn, co: CompileOptions | None, role: str):
    """``torch.compile(fn)`` when the spec asks for it for ``role`` ('student' or 'teacher')."""
    if co is None or not getattr(co, role):
        return fn
    kw: dict[str, Any] = {"dynamic": co.dynamic, "fullgraph": co.fullgraph}
    if co.backend == "inductor":
        kw["mode"] = co.mode
    else:
        kw["backend"] = co.backend
    return torch.compile(fn, **kw)


def step_begin(co: CompileOptions | None) -> None:
    """Tell CUDA-graph trees a new training iteration starts (outputs of the last one may be overwritten)."""
    if co is not None and (co.mode == "reduce-overhead" or co.backend == "cudagraphs"):
        torch.compiler.cudagraph_mark_step_begin()


class TeacherForward(nn.Module):
    """The teacher as the objectives call it: frozen, in ``dtype`` (a copy when that differs from the
    pipeline's own module, which evaluations keep using), under no_grad, optionally channels-last and compiled.

    no_grad rather than inference_mode: the KD losses subtract teacher outputs from student outputs and
    autograd may keep such operands; an inference tensor cannot be saved for backward."""

    def __init__(self, unet: nn.Module, o: TrainOptions, device: torch.device):
        super().__init__()
        dtype = teacher_dtype(o, device)
        self.module = _teacher_copy(unet, dtype, o.channels_last, device)
        self.dtype = dtype
        self.channels_last = o.channels_last
        self._call = maybe_compile(self.module, o.compile, "teacher")
        self._autocast = dtype == torch.bfloat16

    @property
    def config(self):
        return self.module.config

    def forward(self, x, t, cond, **kw):
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self._autocast):
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return self._call(x, t, cond, **kw)


#: teacher copies by (source module, dtype, channels_last): block_prune trains in rounds against one teacher
_COPIES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _teacher_copy(unet: nn.Module, dtype: torch.dtype, channels_last: bool, device: torch.device) -> nn.Module:
    p = next(unet.parameters(), None)
    if p is not None and p.dtype == dtype and not channels_last:
        unet.to(device)
        return unet
    per = _COPIES.setdefault(unet, {})
    key = (dtype, channels_last, str(device))
    if key not in per:
        m = copy.deepcopy(unet).to(device=device, dtype=dtype).eval().requires_grad_(False)
        if channels_last:
            m.to(memory_format=torch.channels_last)
        per[key] = m
    return per[key]
