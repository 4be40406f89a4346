"""The block graph: the view of a component that passes and cost models reason about.

Nodes are blocks (see :mod:`snapopt.ir.blocks`) carrying parameters, MACs (attention QKᵀ and AV
counted), activation bytes, output shape and their per-op cost records; edges are data flow between blocks,
skip connections included. It is *derived* from a torch.export capture and recomputed whenever a pass
changes the program, never edited behind the capture's back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from snapopt.ir.blocks import find_blocks, stage_of
from snapopt.ir.ops import OpRecord, op_record

OTHER = "other"


@dataclass
class BlockGraph:
    component: str
    graph: nx.DiGraph
    total_params: int
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- queries ------------------------------------------------------------------------------------
    def blocks(self) -> list[str]:
        return sorted(self.graph.nodes, key=lambda n: self.graph.nodes[n]["order"])

    def node(self, name: str) -> dict[str, Any]:
        return self.graph.nodes[name]

    def ops(self, name: str) -> list[OpRecord]:
        return self.graph.nodes[name]["ops"]

    def totals(self) -> dict[str, int]:
        nodes = [self.graph.nodes[n] for n in self.graph.nodes]
        return {
            "params": self.total_params,
            "macs": sum(n["macs"] for n in nodes),
            "attention_macs": sum(n["attention_macs"] for n in nodes),
            "act_bytes": sum(n["act_bytes"] for n in nodes),
            "blocks": sum(1 for n in nodes if n["kind"] != OTHER),
        }

    def skip_edges(self) -> list[tuple[str, str]]:
        return [(a, b) for a, b, d in self.graph.edges(data=True) if d["kind"] == "skip"]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per block, in execution order, without the op records (for tables and JSON)."""
        out = []
        for name in self.blocks():
            n = self.graph.nodes[name]
            out.append({k: v for k, v in n.items() if k != "ops"} | {"name": name})
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "inputs": {k: list(v) for k, v in self.input_shapes.items()},
            "totals": self.totals(),
            "blocks": [dict(r, out_shape=list(r["out_shape"])) for r in self.rows()],
            "edges": [{"src": a, "dst": b, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}}
                      for a, b, d in self.graph.edges(data=True)],
        }


def build_block_graph(component: str, module: torch.nn.Module, ep: torch.export.ExportedProgram,
                      input_names: list[str] | None = None) -> BlockGraph:
    """Attribute every aten op of ``ep`` to a block of ``module`` (the interface wrapper that was exported)
    and assemble the block graph."""
    inner_name, inner = next(iter(module.named_children()))
    info = find_blocks(inner)
    owner, kinds = info["owner"], info["kinds"]

    sig = ep.graph_signature
    state = dict(ep.state_dict)
    state.update(dict(getattr(ep, "constants", {}) or {}))
    param_nodes: dict[str, int] = {}
    for spec in sig.input_specs:
        if spec.target is not None and spec.target in state and isinstance(state[spec.target], torch.Tensor):
            if spec.kind.name in ("PARAMETER",):
                param_nodes[spec.arg.name] = state[spec.target].numel()
    user_inputs = [s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT"]

    prefix = inner_name + "."

    def block_of(node: torch.fx.Node) -> str | None:
        stack = node.meta.get("nn_module_stack") or {}
        best = None
        for path, _cls in stack.values():
            path = _clean_path(path)
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            # walk up the path: the first prefix that is a block's module wins (outermost block)
            parts = rel.split(".")
            for i in range(1, len(parts) + 1):
                cand = ".".join(parts[:i])
                if cand in owner:
                    best = owner[cand]
                    break
            if best:
                break
        return best

    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    assigned: dict[torch.fx.Node, str | None] = {n: block_of(n) for n in nodes}
    # Glue ops (skip concatenation, reshapes at a container's level) belong to the block that consumes
    # them; ops feeding only the output belong to their producer.
    for n in reversed(nodes):
        if assigned[n] is None:
            users = {assigned.get(u) for u in n.users}
            if len(users) == 1 and None not in users:
                assigned[n] = users.pop()
    for n in nodes:
        if assigned[n] is None:
            srcs = {assigned.get(s) for s in n.all_input_nodes} - {None}
            if len(srcs) == 1 and not any(u.op == "call_function" and assigned.get(u) is None for u in n.users):
                assigned[n] = srcs.pop()
        if assigned[n] is None:
            assigned[n] = OTHER

    g = nx.DiGraph()
    params_by_block = _params_by_block(inner, owner)
    order = {}
    for i, n in enumerate(nodes):
        order.setdefault(assigned[n], i)
    for name in sorted(set(assigned.values()) | set(params_by_block), key=lambda b: order.get(b, 1 << 30)):
        g.add_node(name, kind=kinds.get(name, OTHER), stage=stage_of(name), params=params_by_block.get(name, 0),
                   macs=0, attention_macs=0, act_bytes=0, out_shape=(), resolution=None, ops=[],
                   order=order.get(name, 1 << 30))
    last_out: dict[str, torch.fx.Node] = {}
    for n in nodes:
        b = assigned[n]
        rec = op_record(n, param_nodes)
        data = g.nodes[b]
        if rec is not None:
            data["ops"].append(rec)
            data["macs"] += rec.macs
            data["act_bytes"] += rec.out_bytes
            if rec.op_class == "attention" or (rec.extra or {}).get("activation_matmul"):
                data["attention_macs"] += rec.macs
        if any(assigned.get(u) != b for u in n.users) and isinstance(n.meta.get("val"), torch.Tensor):
            last_out[b] = n
        for src in n.all_input_nodes:
            a = assigned.get(src)
            if a is None or a == b:
                continue
            val = src.meta.get("val")
            shape = tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()
            kind = "skip" if _is_skip(a, b) else "flow"
            if g.has_edge(a, b):
                continue
            g.add_edge(a, b, shape=shape, kind=kind)
    for b, n in last_out.items():
        shape = tuple(int(s) for s in n.meta["val"].shape)
        g.nodes[b]["out_shape"] = shape
        g.nodes[b]["resolution"] = shape[-1] if len(shape) == 4 else None
    if OTHER in g and not g.nodes[OTHER]["ops"] and not g.nodes[OTHER]["params"]:
        g.remove_node(OTHER)

    inputs = {}
    for name, node_name in zip(input_names or user_inputs, user_inputs):
        node = next(n for n in ep.graph.nodes if n.name == node_name)
        inputs[name] = tuple(int(s) for s in node.meta["val"].shape)
    total = sum(p.numel() for p in inner.parameters())
    return BlockGraph(component=component, graph=g, total_params=total, input_shapes=inputs)


def _clean_path(path: str) -> str:
    # non-strict export writes plain dotted paths; strict export writes "L['self'].unet.x" or "L__self___unet"
    return path.replace("L['self'].", "").replace("L__self___", "")


def _is_skip(src: str, dst: str) -> bool:
    s, d = stage_of(src), stage_of(dst)
    return ("down_blocks" in s or s.endswith("conv_in")) and "up_blocks" in d


def _params_by_block(inner: torch.nn.Module, owner: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for path, p in inner.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = path.split(".")[:-1]
        block = OTHER
        for i in range(1, len(parts) + 1):
            cand = ".".join(parts[:i])
            if cand in owner:
                block = owner[cand]
                break
        counts[block] = counts.get(block, 0) + p.numel()
    return counts
