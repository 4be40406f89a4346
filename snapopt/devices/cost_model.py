"""Roofline latency cost model over the captured op records (see docs/cost-model.md).

The price of a component on a target is the price of the program that target's profile would lower, not of
how the graph happened to be captured: :func:`canonical_ops` first rewrites a block's op records into one
canonical form (explicit QKᵀ/softmax/AV attention of any layout → one fused attention op; Linear ≡ 1×1
convolution; sibling Q/K/V projections reading the same input → one projection), and the profile then
decides how that attention runs (original / split_einsum / split_einsum_v2 chunking), at which weight bits,
on which compute units. Exact rewrites therefore do not move the price.

Every canonical op is timed on the compute unit the profile puts it on (Neural Engine, GPU or CPU) as
``max(compute, DRAM traffic) + dispatch``. Compute = FLOPs / (unit peak x per-op-class efficiency); DRAM
traffic = weights at stored precision (fp16 or palettized bits) when the model does not fit on chip, plus
the part of an op's fp16 activations that does not fit in the system-level cache. A 64x64 self-attention
materialises score tensors of hundreds of MB (batch 2 x heads x 4096 x 4096) that spill to DRAM, and how
much spills depends on the attention implementation. Ops the ANE does not run fall back to GPU/CPU and pay
a transfer at each unit switch.

Coefficients are shared by all chips; chips differ only through their spec (fp16 ANE peak — Apple quotes
A17 Pro/A18 Pro TOPS at int8, so fp16 is half —, DRAM bandwidth, system cache). The shared values are fitted
on every published latency (:mod:`snapopt.devices.fit`, stored in ``snapopt/devices/data/latency_fit.json``).
Pricing is vectorised (numpy) so the fit can re-price whole UNets thousands of times.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from snapopt.devices.target import Target
from snapopt.errors import TargetError
from snapopt.ir.ops import ACT_BYTES, OpRecord

#: Physics priors; the shared fit (data/latency_fit.json) and a target's calibration override them.
DEFAULT_COEFFICIENTS: dict[str, float] = {
    "scale": 1.0,                       # deployment-level multiplier (runtime era / harness; fitted per era)
    "ane_eff_conv": 0.60,               # fraction of fp16 ANE peak reached by k×k convolutions
    "ane_eff_linear": 0.45,             # … by weight matmuls (Linear ≡ 1×1 convolution on the ANE)
    "ane_eff_attention": 0.30,          # … by activation x activation matmuls (QKᵀ, AV)
    "original_layout_penalty": 2.0,     # original attention's batched reshapes on the ANE (Apple: use split_einsum)
    "gpu_eff": 0.45,                    # fraction of GPU fp16 peak reached by MAC ops
    "cpu_eff": 0.35,                    # fraction of CPU fp16 peak reached by MAC ops
    "vector_ratio": 0.02,               # elementwise/norm/softmax element-ops per second as a fraction of MAC peak
    "dram_eff": 0.90,                   # fraction of peak DRAM bandwidth reached streaming weights/activations
    "score_spill_eff": 0.40,            # … by attention-score tensors spilled from the ANE (tiled, strided reductions)
    "overlap": 1.0,                     # 1: compute and DRAM traffic overlap fully (roofline max); 0: they add
    "cache_eff": 0.50,                  # fraction of the system cache one op's activations can stay in
    "ane_op_us": 2.0,                   # per-op dispatch inside an ANE program
    "gpu_op_us": 8.0,
    "cpu_op_us": 4.0,
    "transfer_us": 60.0,                # synchronisation at each switch between compute units
    "call_overhead_ms": 0.3,            # one Core ML prediction call
    "chunk_switch_ms": 1.0,             # each extra model chunk (weights over the per-model limit)
    "v2_query_chunk": 512.0,            # split_einsum_v2: query tokens per attention chunk
    # pipeline (end-to-end) terms, used by snapopt.devices.pipeline
    "e2e_overhead_ms": 300.0,           # app/scheduler/image conversion per generated image
    "e2e_overhead_frac": 0.0,           # … and proportional to the compute (Apple: up to ~10%)
    "reduce_memory_ms_per_gb": 500.0,   # reduceMemory (4 GB phones): models loaded just in time, per GB of weights
}

#: element-ops per output element of vector ops (exp+sum+div+max for softmax; mean/var/normalise/affine for norms)
VECTOR_OPS_PER_ELEMENT = {"softmax": 5.0, "norm": 6.0, "elementwise": 1.0, "resize": 1.0, "concat": 0.5,
                          "gather": 1.0, "reduce": 1.0}
_HEAVY_ELEMENTWISE = {"gelu": 6.0, "silu": 3.0, "sigmoid": 3.0, "exp": 2.0, "sin": 4.0, "cos": 4.0, "erf": 4.0, "tanh": 4.0}
#: ops the Neural Engine does not run (Core ML falls back to GPU or CPU for them)
ANE_UNSUPPORTED_OPS = {"eq", "ne", "lt", "le", "gt", "ge", "to.device", "_to_copy", "argmax", "sin", "cos", "embedding",
                       "index", "index_select", "cumsum", "bitwise_and", "logical_and", "where"}
ANE_UNSUPPORTED_CLASSES = {"gather", "reduce"}
ANE_MAX_DIM = 16384  # larger tensor dimensions are not mapped to the ANE
UNITS = ("ane", "gpu", "cpu")
_FIT_FILE = Path(__file__).resolve().parent / "data" / "latency_fit.json"


@lru_cache(maxsize=1)
def shared_fit() -> dict:
    """The shared fit shipped with snapopt (coefficients, era factors, cross-validated residuals); {} if absent."""
    if not _FIT_FILE.is_file():
        return {}
    return json.loads(_FIT_FILE.read_text())


def shared_coefficients(era: str | None = None) -> dict[str, float]:
    """Physics priors overridden by the shared fit; ``scale`` is the era's factor (the latest era when None,
    the typical runtime's factor — the fit's ``unseen_era`` — for an era the fit never saw)."""
    fit = shared_fit()
    coeffs = dict(DEFAULT_COEFFICIENTS) | {k: float(v) for k, v in fit.get("coefficients", {}).items() if k in DEFAULT_COEFFICIENTS}
    eras = fit.get("eras", {})
    if eras:
        coeffs["scale"] = float(eras.get(era or fit.get("latest_era", ""), fit.get("unseen_era", 1.0)))
    return coeffs


@dataclass(frozen=True)
class ChipRates:
    """A chip's peaks in SI units, derived from its spec only."""

    ane_flops: float
    gpu_flops: float
    cpu_flops: float
    dram_bytes_s: float
    cache_bytes: float

    @classmethod
    def of(cls, target: Target) -> "ChipRates":
        chip = target.device.chip
        ane_fp16_tops = chip.ane_tops / 2 if chip.ane_tops_precision == "int8" else chip.ane_tops
        return cls(ane_flops=ane_fp16_tops * 1e12, gpu_flops=chip.gpu_tflops_fp16 * 1e12, cpu_flops=chip.cpu_gflops_fp16 * 1e9,
                   dram_bytes_s=chip.memory_bandwidth_gbs * 1e9, cache_bytes=chip.system_cache_mb * 1e6)

    def peak(self, unit: str) -> float:
        return {"ane": self.ane_flops, "gpu": self.gpu_flops, "cpu": self.cpu_flops}[unit]


@dataclass(frozen=True)
class OpCost:
    """One op's predicted time (µs) and why: compute vs memory, and the unit it ran on."""

    name: str
    unit: str
    us: float
    compute_us: float
    memory_us: float
    dram_bytes: float
    transfer_us: float = 0.0


def coefficients_for(target: Target, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Shared fit (era of the target's profile), then the target's calibration, then ``overrides``; unknown names are an error."""
    coeffs = shared_coefficients(getattr(target.profile, "era", None))
    for source, values in (("target '" + target.id + "' calibration", target.calibration.coefficients), ("overrides", overrides or {})):
        for k, v in values.items():
            if k not in DEFAULT_COEFFICIENTS:
                raise TargetError(f"{source}: unknown cost-model coefficient '{k}'; known: {', '.join(DEFAULT_COEFFICIENTS)}")
            coeffs[k] = float(v)
    return coeffs


# ---- canonical form ------------------------------------------------------------------------------------
def _is_act_matmul(op: OpRecord) -> bool:
    return op.op_class == "matmul" and bool((op.extra or {}).get("activation_matmul", False))


def _is_pointwise(op: OpRecord) -> bool:
    """A Linear, a weight matmul, or a 1×1 convolution (what the ANE runs a Linear as)."""
    if op.op_class == "linear" or (op.op_class == "matmul" and not _is_act_matmul(op)):
        return True
    if op.op_class != "conv" or op.weight_params <= 0 or len(op.out_shape) != 4 or op.out_bytes <= 0 or op.in_bytes <= 0:
        return False
    n, _, h, w = op.out_shape
    per_out = op.macs / (op.out_bytes / ACT_BYTES)  # Cin/groups × kh × kw
    cin = op.in_bytes / ACT_BYTES / max(1, n * h * w)  # input channels, if the input has the output's spatial size
    return abs(cin - per_out) < 0.5  # 1×1, stride 1, dense


def _attention_group(ops: Sequence[OpRecord], i: int, batch: int) -> tuple[OpRecord, int] | None:
    """Fuse explicit attention starting at ``ops[i]`` (QKᵀ matmul(s), scaling, softmax, AV matmul(s), head
    concat) into one attention record with the shape facts a fused capture records; None if not a pattern."""
    j, n = i, len(ops)
    macs = out = score = 0
    softmaxes: list[OpRecord] = []
    score_sizes: set[int] = set()
    after_softmax = False
    while j < n:
        op = ops[j]
        if _is_act_matmul(op):
            macs += op.macs
            if after_softmax:
                out += op.out_bytes
                after_softmax = False
            else:
                score_sizes.add(op.out_bytes)
        elif op.op_class == "softmax":
            softmaxes.append(op)
            score += op.out_bytes
            after_softmax = True
        elif op.op.startswith("empty") or (op.op_class == "elementwise" and op.out_bytes in score_sizes):
            pass
        elif op.op_class == "concat" and softmaxes and not after_softmax and op.out_bytes == out:
            j += 1
            break
        else:
            break
        j += 1
    if not softmaxes or out == 0 or macs == 0:
        return None
    shape = softmaxes[0].out_shape
    if len(shape) == 4 and shape[2] == 1:  # split_einsum: (B, kv, 1, q) per head
        heads, q, kv, b = len(softmaxes), shape[-1], shape[1], shape[0]
    elif len(shape) == 4:  # (B, H, q, kv)
        heads, q, kv, b = shape[1] * len(softmaxes), shape[2], shape[3], shape[0]
    elif len(shape) == 3:  # (B*H, q, kv)
        b = max(1, batch)
        heads, q, kv = max(1, shape[0] * len(softmaxes) // b), shape[1], shape[2]
    else:
        return None
    head_dim = max(1, out // ACT_BYTES // max(1, b * heads * q))
    rec = OpRecord(ops[i].name, "scaled_dot_product_attention", "attention", macs=macs,
                   in_bytes=int(out * (1 + 2 * kv / q)), out_bytes=out, weight_params=0, out_shape=(b, heads, q, head_dim),
                   extra={"heads": heads, "q_len": q, "kv_len": kv, "head_dim": head_dim, "score_bytes": score})
    return rec, j


def _as_pointwise(op: OpRecord) -> OpRecord:
    return op if op.op_class == "linear" else OpRecord(op.name, op.op, "linear", op.macs, op.in_bytes, op.out_bytes,
                                                       op.weight_params, op.out_shape, op.extra)


def canonical_ops(ops: Iterable[OpRecord]) -> list[OpRecord]:
    """The block as the lowered program computes it, whatever form it was captured in (see the module doc)."""
    ops = list(ops)
    out: list[OpRecord] = []
    batch = 1
    i = 0
    while i < len(ops):
        op = ops[i]
        if _is_act_matmul(op):
            fused = _attention_group(ops, i, batch)
            if fused is not None:
                rec, i = fused
                _merge_projections(out)
                out.append(rec)
                continue
        if op.op.startswith("empty"):  # an allocation (baddbmm's buffer) computes nothing once lowered
            pass
        elif op.op_class == "attention":
            _merge_projections(out)
            out.append(op)
        elif _is_pointwise(op):
            out.append(_as_pointwise(op))
        else:
            out.append(op)
        if op.op_class in ("conv", "linear", "norm") and op.out_shape:
            batch = op.out_shape[0]
        i += 1
    return out


def _merge_projections(out: list[OpRecord]) -> None:
    """Projections right before an attention that read the same input are one matmul (fuse_qkv's form)."""
    k = len(out)
    while k > 0 and out[k - 1].op_class == "linear" and out[k - 1].in_bytes == out[-1].in_bytes:
        k -= 1
    run = out[k:]
    if len(run) < 2:
        return
    first = run[0]
    merged = OpRecord(first.name, first.op, "linear", sum(o.macs for o in run), first.in_bytes, sum(o.out_bytes for o in run),
                      sum(o.weight_params for o in run), first.out_shape, first.extra)
    del out[k:]
    out.append(merged)


# ---- vectorised op features -----------------------------------------------------------------------------
_KIND = {"conv": 0, "linear": 1, "attention": 2}  # anything else: 3 (vector)


@dataclass
class OpArrays:
    """Numeric features of canonical ops, one row each, plus the block each belongs to."""

    names: list[str]
    block: np.ndarray
    kind: np.ndarray
    ane_ok: np.ndarray
    fused_on_ane: np.ndarray
    macs: np.ndarray
    in_bytes: np.ndarray
    out_bytes: np.ndarray
    weight_params: np.ndarray
    vector_ops: np.ndarray
    score_bytes: np.ndarray
    heads: np.ndarray
    q_len: np.ndarray
    n_blocks: int

    @classmethod
    def build(cls, blocks: Sequence[Sequence[OpRecord]]) -> "OpArrays":
        rows = [(b, op) for b, ops in enumerate(blocks) for op in ops]
        f = lambda fn, dt=float: np.array([fn(op) for _, op in rows], dtype=dt)  # noqa: E731

        def wparams(op):
            if op.op_class == "gather":  # an embedding lookup reads only the rows it gathers
                return min(op.weight_params, op.out_bytes // ACT_BYTES)
            return op.weight_params

        def vec(op):
            return op.out_bytes / ACT_BYTES * _HEAVY_ELEMENTWISE.get(op.op, VECTOR_OPS_PER_ELEMENT.get(op.op_class, 1.0))

        return cls(
            names=[op.name for _, op in rows], block=np.array([b for b, _ in rows], dtype=np.int64),
            kind=f(lambda o: _KIND.get(o.op_class, 3), np.int64),
            ane_ok=f(lambda o: not (o.op_class in ANE_UNSUPPORTED_CLASSES or o.op in ANE_UNSUPPORTED_OPS
                                    or any(d > ANE_MAX_DIM for d in o.out_shape)), bool),
            fused_on_ane=f(lambda o: o.op_class == "elementwise", bool),
            macs=f(lambda o: o.macs), in_bytes=f(lambda o: o.in_bytes), out_bytes=f(lambda o: o.out_bytes),
            weight_params=f(wparams), vector_ops=f(vec),
            score_bytes=f(lambda o: (o.extra or {}).get("score_bytes", 0) if o.op_class == "attention" else 0),
            heads=f(lambda o: (o.extra or {}).get("heads", 1) if o.op_class == "attention" else 1),
            q_len=f(lambda o: (o.extra or {}).get("q_len", 1) if o.op_class == "attention" else 1),
            n_blocks=len(blocks))


@dataclass
class PricedOps:
    """Per-op results of :meth:`CostModel.price` (µs; units as indices into UNITS)."""

    us: np.ndarray
    compute_us: np.ndarray
    memory_us: np.ndarray
    transfer_us: np.ndarray
    dram_bytes: np.ndarray
    unit: np.ndarray


class CostModel:
    """Prices op records for one target (chip spec + deployment profile + coefficients)."""

    def __init__(self, target: Target, overrides: Mapping[str, float] | None = None):
        self.target = target
        self.c = coefficients_for(target, overrides)
        self.rates = ChipRates.of(target)
        prof = target.profile
        self.attention = prof.attention
        self.weight_bytes_per_param = (16 if prof.weight_bits >= 16 else prof.weight_bits) / 8
        # W8A8: int8 convolutions/matmuls at the chip's int8 rate (2x fp16) with int8 activations in and out; on a chip
        # whose Neural Engine has no int8 path the runtime dequantizes and computes fp16, so nothing changes
        self.int8_compute = prof.activation_bits == 8 and target.device.chip.ane_tops_precision == "int8"
        self.primary, self.fallback = {"CPU_AND_NE": ("ane", "cpu"), "ALL": ("ane", "gpu"),
                                       "CPU_AND_GPU": ("gpu", "cpu"), "CPU_ONLY": ("cpu", "cpu")}[prof.compute_units]

    # ---- placement / memory (scalar helpers) --------------------------------------------------------
    def unit_of(self, op: OpRecord) -> str:
        if self.primary != "ane":
            return self.primary
        if op.op_class in ANE_UNSUPPORTED_CLASSES or op.op in ANE_UNSUPPORTED_OPS or any(d > ANE_MAX_DIM for d in op.out_shape):
            return self.fallback
        return "ane"

    def weights_stream(self, weight_bytes_total: float) -> bool:
        """Weights are read from DRAM on every call when the model does not fit in the on-chip cache."""
        return weight_bytes_total > self.c["cache_eff"] * self.rates.cache_bytes

    def weight_bytes(self, op: OpRecord) -> float:
        if op.op_class == "gather":  # an embedding lookup reads only the rows it gathers
            return min(op.weight_params, op.out_bytes // ACT_BYTES) * self.weight_bytes_per_param
        return op.weight_params * self.weight_bytes_per_param

    def spill(self, nbytes):
        """Bytes of an op's activation working set that do not fit in the cache and go to DRAM."""
        return np.maximum(0.0, nbytes - self.c["cache_eff"] * self.rates.cache_bytes)

    def total_weight_bytes(self, ops: Iterable[OpRecord]) -> float:
        return sum(self.weight_bytes(o) for o in ops)

    def fixed_us(self, weight_bytes_total: float) -> float:
        """Per-call cost outside any block: the prediction call and switching between model chunks."""
        limit = self.target.device.max_weights_per_model_mb * 1e6
        chunks = max(1, math.ceil(weight_bytes_total / limit))
        return (self.c["call_overhead_ms"] + (chunks - 1) * self.c["chunk_switch_ms"]) * 1e3 * self.c["scale"]

    # ---- vectorised pricing -------------------------------------------------------------------------
    def price(self, a: OpArrays, stream_weights: bool) -> PricedOps:
        """Price canonical ops in execution order (numpy over all ops at once). A block's cost includes the unit
        switches at its ops; blocks run on the primary unit end to end in practice, so removing one leaves its
        neighbours' prices unchanged and the lookup table stays additive."""
        c, r = self.c, self.rates
        prim = UNITS.index(self.primary)
        if self.primary == "ane":
            unit = np.where(a.ane_ok, 0, UNITS.index(self.fallback))
        else:
            unit = np.full(len(a.kind), prim)
        peak = np.array([r.ane_flops, r.gpu_flops, r.cpu_flops])[unit]
        on_ane = unit == 0
        mac_eff = np.array([1.0, c["gpu_eff"], c["cpu_eff"]])[unit]
        kind = a.kind
        eff = np.where(on_ane, np.where(kind == 0, c["ane_eff_conv"], c["ane_eff_linear"]), mac_eff)
        int8 = on_ane & (kind <= 1) if self.int8_compute else np.zeros(len(kind), dtype=bool)
        compute = np.where(kind <= 1, 2.0 * a.macs / (peak * eff * np.where(int8, 2.0, 1.0)), 0.0)
        vec_rate = np.where(on_ane, peak * c["vector_ratio"], peak * mac_eff)
        compute = np.where(kind == 3, a.vector_ops / vec_rate, compute)
        dram = a.weight_params * self.weight_bytes_per_param if stream_weights else np.zeros(len(kind))
        act = (a.in_bytes + a.out_bytes) * np.where(int8, 0.5, 1.0)
        dram = dram + np.where((kind == 3) & on_ane & a.fused_on_ane, 0.0, self.spill(act))
        # attention, as the profile's implementation runs it
        att = kind == 2
        score_dram = np.zeros(len(kind))
        if att.any():
            impl = self.attention
            if impl in ("original", "sdpa"):
                chunks_ane = np.ones(len(kind))
            elif impl == "split_einsum":
                chunks_ane = a.heads
            else:
                chunks_ane = a.heads * np.maximum(1, np.ceil(a.q_len / max(1.0, c["v2_query_chunk"])))
            chunks = np.where(on_ane, chunks_ane, 1.0)  # GPU/CPU kernels materialise per batched op
            score_dram = np.where(att, 4.0 * chunks * self.spill(a.score_bytes / chunks), 0.0)
            score_elems = a.score_bytes / ACT_BYTES
            ane_eff = c["ane_eff_attention"] / (c["original_layout_penalty"] if impl == "original" else 1.0)
            ane_t = 2.0 * a.macs / (r.ane_flops * ane_eff) + score_elems * VECTOR_OPS_PER_ELEMENT["softmax"] / (r.ane_flops * c["vector_ratio"])
            other_t = (2.0 * a.macs + score_elems * VECTOR_OPS_PER_ELEMENT["softmax"]) / (peak * mac_eff)
            compute = np.where(att, np.where(on_ane, ane_t, other_t), compute)
        memory = dram / (r.dram_bytes_s * c["dram_eff"]) + score_dram / (r.dram_bytes_s * c["score_spill_eff"])
        overhead = np.array([c["ane_op_us"], c["gpu_op_us"], c["cpu_op_us"]])[unit] * 1e-6
        scale = c["scale"]
        us = (np.maximum(compute, memory) + (1.0 - c["overlap"]) * np.minimum(compute, memory) + overhead) * scale * 1e6
        # unit switches in execution order: the component's input arrives on, and its output returns to, the
        # primary unit; a switch is charged to the op (so the block) where it happens
        n = len(kind)
        transfer = np.zeros(n)
        if n:
            prev = np.roll(unit, 1)
            prev[0] = prim
            bw = r.dram_bytes_s * c["dram_eff"]
            transfer += np.where(unit != prev, c["transfer_us"] + a.in_bytes / bw * 1e6, 0.0)
            if unit[-1] != prim:
                transfer[-1] += c["transfer_us"] + a.out_bytes[-1] / bw * 1e6
            transfer *= scale
        return PricedOps(us=us + transfer, compute_us=compute * 1e6 * scale, memory_us=memory * 1e6 * scale,
                         transfer_us=transfer, dram_bytes=dram + score_dram, unit=unit)

    # ---- op-list API (one block) ----------------------------------------------------------------------
    def ops_cost(self, ops: Iterable[OpRecord], stream_weights: bool) -> list[OpCost]:
        """Price one block's ops (canonicalised first) and return one cost per canonical op."""
        canon = canonical_ops(ops)
        p = self.price(OpArrays.build([canon]), stream_weights)
        return [OpCost(op.name, UNITS[int(p.unit[i])], float(p.us[i]), float(p.compute_us[i]), float(p.memory_us[i]),
                       float(p.dram_bytes[i]), float(p.transfer_us[i])) for i, op in enumerate(canon)]
