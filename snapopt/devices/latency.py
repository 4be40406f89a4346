"""Per-block latency lookup tables: the cost model summed per block of the block IR, once.

Block pruning asks "how fast is the UNet without blocks X, Y?" thousands of times; a table answers from
per-block sums without re-capturing or re-pricing ops. The component is priced once in execution order and
each op's time is attributed to its block, so the table sums to the whole-component price; a subset's latency
is the sum of its blocks plus the per-call cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from snapopt.devices.cost_model import UNITS, CostModel, OpArrays, canonical_ops
from snapopt.devices.target import Target
from snapopt.errors import UsageError
from snapopt.ir.block_graph import BlockGraph
from snapopt.ir.ops import OpRecord


@dataclass
class BlockLatency:
    name: str
    kind: str
    resolution: int | None
    us: float
    compute_us: float
    memory_us: float
    transfer_us: float
    dram_mb: float
    by_unit_us: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()} | {
            "by_unit_us": {u: round(t, 3) for u, t in self.by_unit_us.items()}}


@dataclass
class LatencyTable:
    """Latency of one component on one target, per block, in microseconds."""

    target_id: str
    profile: str
    component: str
    fixed_us: float
    blocks: dict[str, BlockLatency] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def latency_us(self, blocks: Iterable[str] | None = None) -> float:
        """Latency of running only ``blocks`` (all blocks when None), per-call cost included."""
        if blocks is None:
            return self.fixed_us + sum(b.us for b in self.blocks.values())
        total = self.fixed_us
        for name in blocks:
            try:
                total += self.blocks[name].us
            except KeyError:
                raise UsageError(f"latency table {self.component}@{self.target_id}: unknown block '{name}'") from None
        return total

    def without_us(self, removed: Iterable[str]) -> float:
        """Latency after removing ``removed`` blocks (what block pruning's ΔLatency needs)."""
        removed = set(removed)
        unknown = removed - self.blocks.keys()
        if unknown:
            raise UsageError(f"latency table {self.component}@{self.target_id}: unknown block '{sorted(unknown)[0]}'")
        return self.latency_us(n for n in self.blocks if n not in removed)

    @property
    def total_ms(self) -> float:
        return self.latency_us() / 1e3

    def by_stage_us(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, b in self.blocks.items():
            stage = ".".join(name.split(".")[:2]) if name.startswith(("down_blocks", "up_blocks")) else name.split(".")[0]
            out[stage] = out.get(stage, 0.0) + b.us
        return out

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target_id, "profile": self.profile, "component": self.component,
                "total_ms": round(self.total_ms, 3), "fixed_us": round(self.fixed_us, 3), **self.meta,
                "blocks": [b.to_json() for b in self.blocks.values()]}


def graph_arrays(graph: BlockGraph) -> tuple[list[str], OpArrays, list[OpRecord]]:
    """Block names, the canonical ops' numeric features, and all raw ops of ``graph`` (cached on the graph:
    pricing the same graph on many targets, or thousands of times in a fit, canonicalises once)."""
    cached = getattr(graph, "_snapopt_price_cache", None)
    if cached is None:
        names = list(graph.blocks())
        raw = [list(graph.ops(n)) for n in names]
        cached = (names, OpArrays.build([canonical_ops(ops) for ops in raw]), [op for ops in raw for op in ops])
        try:
            graph._snapopt_price_cache = cached
        except AttributeError:  # a graph type that refuses attributes: recompute next time
            pass
    return cached


def build_table(graph: BlockGraph, target: Target, overrides: dict[str, float] | None = None) -> LatencyTable:
    """Price every op of ``graph`` on ``target`` and sum per block (the one price every report and pass uses)."""
    model = CostModel(target, overrides)
    names, arrays, _ = graph_arrays(graph)
    weight_total = float(arrays.weight_params.sum()) * model.weight_bytes_per_param
    stream = model.weights_stream(weight_total)
    table = LatencyTable(target.id, target.profile.name, graph.component, model.fixed_us(weight_total),
                         meta={"weights_mb": round(weight_total / 1e6, 1), "weights_streamed": stream,
                               "attention": target.profile.attention, "weight_bits": target.profile.weight_bits,
                               "compute_units": target.profile.compute_units,
                               "inputs": {k: list(v) for k, v in graph.input_shapes.items()}})
    p = model.price(arrays, stream)
    nb = len(names)
    per = lambda v: np.bincount(arrays.block, weights=v, minlength=nb)  # noqa: E731
    us, comp, mem, tr, dram = per(p.us), per(p.compute_us), per(p.memory_us), per(p.transfer_us), per(p.dram_bytes)
    by_unit = [per(np.where(p.unit == u, p.us, 0.0)) for u in range(len(UNITS))]
    for i, name in enumerate(names):
        node = graph.node(name)
        table.blocks[name] = BlockLatency(
            name=name, kind=node["kind"], resolution=node.get("resolution"), us=float(us[i]),
            compute_us=float(comp[i]), memory_us=float(mem[i]), transfer_us=float(tr[i]), dram_mb=float(dram[i]) / 1e6,
            by_unit_us={UNITS[u]: float(by_unit[u][i]) for u in range(len(UNITS)) if by_unit[u][i] > 0})
    return table


def total_us(graph: BlockGraph, target: Target, overrides: dict[str, float] | None = None) -> float:
    """``build_table(graph, target).latency_us()`` without building the table (the fit calls it thousands of times)."""
    model = CostModel(target, overrides)
    _, arrays, _ = graph_arrays(graph)
    weight_total = float(arrays.weight_params.sum()) * model.weight_bytes_per_param
    return model.fixed_us(weight_total) + float(model.price(arrays, model.weights_stream(weight_total)).us.sum())


def whole_model_us(graph: BlockGraph, target: Target, overrides: dict[str, float] | None = None) -> float:
    """The component priced as one op sequence (no block boundaries): what the lookup table's sum must match."""
    model = CostModel(target, overrides)
    names = list(graph.blocks())
    arrays = OpArrays.build([[op for n in names for op in canonical_ops(graph.ops(n))]])  # one block: no boundaries
    weight_total = float(arrays.weight_params.sum()) * model.weight_bytes_per_param
    return model.fixed_us(weight_total) + float(model.price(arrays, model.weights_stream(weight_total)).us.sum())


def model_tables(model: str, targets: list[Target], component: str = "unet", resolution: int | None = None,
                 batch: int | None = None) -> tuple[list[LatencyTable], dict[str, Any]]:
    """Capture ``component`` of ``model`` once and price it on every target (arch: presets on the meta device).

    ``batch`` defaults to 2 for the UNet (classifier-free guidance runs both halves) and 1 otherwise."""
    from snapopt.capture import block_graph
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models.loading import load_model

    owner = "vae" if component.startswith("vae") else component
    pipe = load_model(model, components=(owner,), structure_only=model.startswith("arch:"), resolution=resolution)
    if batch is None:
        batch = 2 if component == "unet" else 1
    shapes = Shapes(resolution=pipe.resolution, batch=batch)
    graph = block_graph(pipe, component, shapes)
    info = {"model": pipe.source, "component": component, "resolution": pipe.resolution, "batch": batch,
            "macs": graph.totals()["macs"], "params": graph.totals()["params"]}
    return [build_table(graph, t) for t in targets], info


def pipeline_graphs(model: str, resolution: int | None = None) -> tuple[dict[str, BlockGraph], dict[str, Any]]:
    """Capture the UNet (batch 2, classifier-free guidance), text encoder and VAE decoder of ``model`` once."""
    from snapopt.capture import block_graph
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models.loading import load_model

    pipe = load_model(model, components=("unet", "vae", "text_encoder"), structure_only=model.startswith("arch:"),
                      resolution=resolution)
    graphs = {"unet": block_graph(pipe, "unet", Shapes(resolution=pipe.resolution, batch=2)),
              "text_encoder": block_graph(pipe, "text_encoder", Shapes(resolution=pipe.resolution, batch=1)),
              "vae_decoder": block_graph(pipe, "vae_decoder", Shapes(resolution=pipe.resolution, batch=1))}
    return graphs, {"model": pipe.source, "resolution": pipe.resolution}
