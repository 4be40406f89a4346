"""Roofline latency cost model over the captured op records (see docs/cost-model.md).

Every op is timed on the compute unit the deployment profile puts it on (Neural Engine, GPU or CPU) as
``max(compute, DRAM traffic) + dispatch``. Compute = FLOPs / (unit peak x per-op-class efficiency); DRAM
traffic = weights at stored precision (fp16 or palettized bits) when the model does not fit on chip, plus
the part of an op's fp16 activations that does not fit in the system-level cache. What makes phones
differ from FLOP counts falls out of that: a 64x64 self-attention materialises score tensors of hundreds of
MB (batch 2 x heads x 4096 x 4096) that spill to DRAM, and how much spills depends on the attention
implementation (original: one score tensor; split_einsum: one per head; split_einsum_v2: per head and
query chunk). Ops the ANE does not run fall back to GPU/CPU and pay a transfer at each unit switch.

Coefficients are shared by all chips; chips differ only through their spec (fp16 ANE peak — Apple quotes
A17 Pro/A18 Pro TOPS at int8, so fp16 is half —, DRAM bandwidth, system cache). Calibration
(:mod:`snapopt.devices.calibrate`) fits a few of them per deployment profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from snapopt.devices.target import Target
from snapopt.errors import TargetError
from snapopt.ir.ops import ACT_BYTES, OpRecord

#: Default coefficients (physics priors; calibration overrides some). Units in the names.
DEFAULT_COEFFICIENTS: dict[str, float] = {
    "scale": 1.0,                       # deployment-level multiplier (runtime version, scheduling)
    "ane_eff_conv": 0.60,               # fraction of fp16 ANE peak reached by convolutions
    "ane_eff_linear": 0.45,             # … by weight matmuls (1x1-conv-like on the ANE)
    "ane_eff_attention": 0.30,          # … by activation x activation matmuls (QKᵀ, AV)
    "original_layout_penalty": 2.0,     # original attention's batched reshapes on the ANE (Apple: use split_einsum)
    "gpu_eff": 0.45,                    # fraction of GPU fp16 peak reached by MAC ops
    "cpu_eff": 0.35,                    # fraction of CPU fp16 peak reached by MAC ops
    "vector_ratio": 0.02,               # elementwise/norm/softmax element-ops per second as a fraction of MAC peak
    "dram_eff": 0.90,                   # fraction of peak DRAM bandwidth reached streaming weights/activations
    "score_spill_eff": 0.40,            # … by attention-score tensors spilled from the ANE (tiled, strided reductions)
    "cache_eff": 0.50,                  # fraction of the system cache one op's activations can stay in
    "ane_op_us": 2.0,                   # per-op dispatch inside an ANE program
    "gpu_op_us": 8.0,
    "cpu_op_us": 4.0,
    "transfer_us": 60.0,                # synchronisation at each switch between compute units
    "call_overhead_ms": 0.3,            # one Core ML prediction call
    "chunk_switch_ms": 1.0,             # each extra model chunk (weights over the per-model limit)
    "v2_query_chunk": 512.0,            # split_einsum_v2: query tokens per attention chunk
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
    """Defaults, then the target's calibration, then ``overrides``; unknown names are an error."""
    coeffs = dict(DEFAULT_COEFFICIENTS)
    for source, values in (("target '" + target.id + "' calibration", target.calibration.coefficients), ("overrides", overrides or {})):
        for k, v in values.items():
            if k not in DEFAULT_COEFFICIENTS:
                raise TargetError(f"{source}: unknown cost-model coefficient '{k}'; known: {', '.join(DEFAULT_COEFFICIENTS)}")
            coeffs[k] = float(v)
    return coeffs


class CostModel:
    """Prices op records for one target (chip spec + deployment profile + coefficients)."""

    def __init__(self, target: Target, overrides: Mapping[str, float] | None = None):
        self.target = target
        self.c = coefficients_for(target, overrides)
        self.rates = ChipRates.of(target)
        prof = target.profile
        self.attention = prof.attention
        self.weight_bytes_per_param = (16 if prof.weight_bits >= 16 else prof.weight_bits) / 8
        self.primary, self.fallback = {"CPU_AND_NE": ("ane", "cpu"), "ALL": ("ane", "gpu"),
                                       "CPU_AND_GPU": ("gpu", "cpu"), "CPU_ONLY": ("cpu", "cpu")}[prof.compute_units]

    # ---- placement ----------------------------------------------------------------------------------
    def unit_of(self, op: OpRecord) -> str:
        if self.primary != "ane":
            return self.primary
        if op.op_class in ANE_UNSUPPORTED_CLASSES or op.op in ANE_UNSUPPORTED_OPS or any(d > ANE_MAX_DIM for d in op.out_shape):
            return self.fallback
        return "ane"

    # ---- memory -------------------------------------------------------------------------------------
    def weights_stream(self, weight_bytes_total: float) -> bool:
        """Weights are read from DRAM on every call when the model does not fit in the on-chip cache."""
        return weight_bytes_total > self.c["cache_eff"] * self.rates.cache_bytes

    def weight_bytes(self, op: OpRecord) -> float:
        if op.op_class == "gather":  # an embedding lookup reads only the rows it gathers
            return min(op.weight_params, op.out_bytes // ACT_BYTES) * self.weight_bytes_per_param
        return op.weight_params * self.weight_bytes_per_param

    def spill(self, nbytes: float) -> float:
        """Bytes of an op's activation working set that do not fit in the cache and go to DRAM."""
        return max(0.0, nbytes - self.c["cache_eff"] * self.rates.cache_bytes)

    # ---- one op -------------------------------------------------------------------------------------
    def op_cost(self, op: OpRecord, unit: str, stream_weights: bool) -> OpCost:
        c, r = self.c, self.rates
        peak = r.peak(unit)
        mac_eff = {"ane": None, "gpu": c["gpu_eff"], "cpu": c["cpu_eff"]}[unit]
        dram = self.weight_bytes(op) if stream_weights else 0.0
        act = op.in_bytes + op.out_bytes
        score_dram = 0.0
        activation_mm = op.op_class == "matmul" and bool((op.extra or {}).get("activation_matmul", False))
        if op.op_class == "attention":
            compute, score_dram = self._attention(op, unit)
            dram += self.spill(act)
        elif activation_mm or op.op_class == "softmax":  # explicit attention (original/split_einsum capture)
            compute = self._explicit_attention_compute(op, unit, activation_mm)
            score_dram = self.spill(act)
        elif op.op_class in ("conv", "linear", "matmul"):
            eff = (c["ane_eff_conv"] if op.op_class == "conv" else c["ane_eff_linear"]) if unit == "ane" else mac_eff
            compute = 2.0 * op.macs / (peak * eff)
            dram += self.spill(act)
        else:
            elements = op.out_bytes / ACT_BYTES
            per = _HEAVY_ELEMENTWISE.get(op.op, VECTOR_OPS_PER_ELEMENT.get(op.op_class, 1.0))
            rate = peak * c["vector_ratio"] if unit == "ane" else peak * mac_eff
            compute = elements * per / rate
            # the ANE compiler fuses activations/adds into the producing conv or norm: no tensor round trip
            if not (unit == "ane" and op.op_class == "elementwise"):
                dram += self.spill(act)
        memory = dram / (r.dram_bytes_s * c["dram_eff"]) + score_dram / (r.dram_bytes_s * c["score_spill_eff"])
        overhead = c[f"{unit}_op_us"] * 1e-6
        seconds = (max(compute, memory) + overhead) * c["scale"]
        return OpCost(op.name, unit, seconds * 1e6, compute * 1e6 * c["scale"], memory * 1e6 * c["scale"], dram + score_dram)

    def _explicit_attention_compute(self, op: OpRecord, unit: str, is_matmul: bool) -> float:
        c = self.c
        if is_matmul:
            eff = c["ane_eff_attention"] if unit == "ane" else (c["gpu_eff"] if unit == "gpu" else c["cpu_eff"])
            if unit == "ane" and self.attention == "original":
                eff /= c["original_layout_penalty"]
            return 2.0 * op.macs / (self.rates.peak(unit) * eff)
        rate = self.rates.peak(unit) * (c["vector_ratio"] if unit == "ane" else (c["gpu_eff"] if unit == "gpu" else c["cpu_eff"]))
        return op.out_bytes / ACT_BYTES * VECTOR_OPS_PER_ELEMENT["softmax"] / rate

    def _attention(self, op: OpRecord, unit: str) -> tuple[float, float]:
        """A fused attention op (sdpa capture), priced as the profile's implementation will run it:
        QKᵀ and AV matmuls, a softmax over the scores, and the score tensor's DRAM round trips (written by
        QKᵀ, read and written by softmax, read by AV) for every chunk that does not fit on chip."""
        c, x = self.c, op.extra or {}
        heads, q, kv = int(x.get("heads", 1)), int(x.get("q_len", 1)), int(x.get("kv_len", 1))
        score_elems = x.get("score_bytes", 0) / ACT_BYTES
        impl = self.attention if unit == "ane" else "original"  # GPU/CPU kernels materialise per batched op
        if impl in ("original", "sdpa"):
            chunks = 1
        elif impl == "split_einsum":
            chunks = heads
        else:  # split_einsum_v2: per head and per query chunk
            chunks = heads * max(1, math.ceil(q / max(1.0, c["v2_query_chunk"])))
        score_dram = 4.0 * chunks * self.spill(score_elems * ACT_BYTES / chunks)
        if unit == "ane":
            eff = c["ane_eff_attention"] / (c["original_layout_penalty"] if impl == "original" else 1.0)
            compute = 2.0 * op.macs / (self.rates.ane_flops * eff)
            compute += score_elems * VECTOR_OPS_PER_ELEMENT["softmax"] / (self.rates.ane_flops * c["vector_ratio"])
        else:
            eff = c["gpu_eff"] if unit == "gpu" else c["cpu_eff"]
            compute = (2.0 * op.macs + score_elems * VECTOR_OPS_PER_ELEMENT["softmax"]) / (self.rates.peak(unit) * eff)
        del kv
        return compute, score_dram

    # ---- a sequence of ops --------------------------------------------------------------------------
    def ops_cost(self, ops: Iterable[OpRecord], stream_weights: bool) -> list[OpCost]:
        """Price ops in execution order. Inputs arrive on, and outputs return to, the primary unit, so a
        block's cost does not depend on its neighbours (what keeps the lookup table additive)."""
        out: list[OpCost] = []
        prev = self.primary
        ops = list(ops)
        for op in ops:
            unit = self.unit_of(op)
            cost = self.op_cost(op, unit, stream_weights)
            if unit != prev:
                cost = self._with_transfer(cost, op.in_bytes)
            out.append(cost)
            prev = unit
        if ops and prev != self.primary:
            out[-1] = self._with_transfer(out[-1], ops[-1].out_bytes)
        return out

    def _with_transfer(self, cost: OpCost, nbytes: float) -> OpCost:
        t = (self.c["transfer_us"] + nbytes / (self.rates.dram_bytes_s * self.c["dram_eff"]) * 1e6) * self.c["scale"]
        return OpCost(cost.name, cost.unit, cost.us + t, cost.compute_us, cost.memory_us, cost.dram_bytes, cost.transfer_us + t)

    def fixed_us(self, weight_bytes_total: float) -> float:
        """Per-call cost outside any block: the prediction call and switching between model chunks."""
        limit = self.target.device.max_weights_per_model_mb * 1e6
        chunks = max(1, math.ceil(weight_bytes_total / limit))
        return (self.c["call_overhead_ms"] + (chunks - 1) * self.c["chunk_switch_ms"]) * 1e3 * self.c["scale"]

    def total_weight_bytes(self, ops: Iterable[OpRecord]) -> float:
        return sum(self.weight_bytes(o) for o in ops)
