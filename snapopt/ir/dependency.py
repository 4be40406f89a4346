"""Channel dependency groups over a torch.export capture (DepGraph's idea, rebuilt on the FX graph).

Every channel of every tracked tensor gets an integer id. Walking the graph in order:

* a conv/linear *creates* ids for its output channels and ties its weight's input dim to the ids arriving;
* residual adds, GroupNorm/LayerNorm, activations and views carry or *unite* ids elementwise;
* ``cat``/``slice``/``chunk`` along the channel dim concatenate or cut id lists, so an up-block ResNet's
  input is two id ranges from two different producers (each pruned by its own group);
* ``scaled_dot_product_attention`` unites q, k and v per (head, dim) position (diffusers reshapes all three
  with one ``head_dim``) and records the head structure;
* anything the walker does not understand, the component's inputs and outputs, *freeze* the ids they touch
  (never pruned): the analysis is conservative by construction.

Ids united into one class must be removed together. Classes touching exactly the same parameter dims are
interchangeable rows of one :class:`ChannelGroup` — the unit a pruner keeps a number of. GroupNorm groups and
attention heads are recorded as *blocks* over a group's rows, so a pruner can keep an equal number per block
(GroupNorm's channels-per-group stays integral; every head keeps the same head_dim).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from snapopt.ir.ops import aten_name

_SAME = {"silu", "gelu", "relu", "sigmoid", "tanh", "dropout", "contiguous", "clone", "to", "_to_copy", "alias",
         "detach", "upsample_nearest2d", "upsample_bilinear2d", "neg", "exp", "sqrt", "rsqrt", "pow", "type_as",
         "lift_fresh_copy", "avg_pool2d", "max_pool2d", "mish", "hardtanh", "leaky_relu", "softplus", "erf", "abs"}
_BROADCAST = {"add", "sub", "mul", "div", "where", "maximum", "minimum", "rsub"}
_RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze", "unflatten"}
_IGNORE = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "arange", "full", "zeros", "ones", "empty",
           "scalar_tensor", "new_zeros"}


@dataclass
class Layout:
    """Which dims of a tensor carry channel ids (sorted), and the ids as an array over those dims."""

    dims: tuple[int, ...]
    ids: np.ndarray


@dataclass
class Block:
    """A GroupNorm's groups or an attention's heads, as a (blocks, per-block) array of channel ids."""

    kind: str  # "groupnorm" | "heads"
    module: str
    ids: np.ndarray


@dataclass
class ChannelGroup:
    """Channel classes (rows) that touch the same parameter dims: prune any subset of rows, together.

    ``members[(param, dim)]`` is an (n, k) array: the indices along ``dim`` of ``param`` that row i owns.
    ``block_of`` assigns each row to a GroupNorm group or head (all -1 when unstructured)."""

    name: str
    members: dict[tuple[str, int], np.ndarray]
    block_of: np.ndarray
    structure: str | None = None
    modules: list[str] = field(default_factory=list)
    multiple: int = 1  # keep a multiple of this (GroupNorms over a concatenation this group feeds)
    producers: list[str] = field(default_factory=list)  # conv/linear modules whose outputs these channels are
    uniform_blocks: bool = False  # every block structure on the group has the chosen one's blocks (whole blocks can go)

    @property
    def size(self) -> int:
        return int(self.block_of.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.block_of.max()) + 1 if self.structure else 1


@dataclass
class DependencyGraph:
    """The prunable channel groups of one captured component, plus what the analysis froze and why."""

    groups: list[ChannelGroup]
    frozen: list[str]
    constraints: list[Block]  # blocks straddling several groups (a GroupNorm over a skip concatenation)
    heads: dict[str, int]  # attention module -> heads seen in the capture
    unhandled: dict[str, int]

    def group(self, name: str) -> ChannelGroup:
        return next(g for g in self.groups if g.name == name)


class _UnionFind:
    """Union-find over channel ids with a *frozen* flag per class (kept apart, so frozen groups keep names)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: list[bool] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.frozen.extend([False] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo
            self.frozen[lo] = self.frozen[lo] or self.frozen[hi]

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
            self.union(x, y)

    def freeze(self, ids: np.ndarray) -> None:
        for x in ids.ravel().tolist():
            self.frozen[self.find(x)] = True

    def is_frozen(self, a: int) -> bool:
        return self.frozen[self.find(a)]


def dim_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Group the dims of a reshape ``a -> b`` into runs with equal products (row-major semantics)."""
    if 0 in a or 0 in b:
        return None
    blocks, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ins, outs, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                ins.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                outs.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        blocks.append((ins, outs))
    blocks += [([k], []) for k in range(i, len(a))] + [([], [k]) for k in range(j, len(b))]
    return blocks


class _Walker:
    """One pass over the FX graph, maintaining a :class:`Layout` per tensor value."""

    def __init__(self, ep: torch.export.ExportedProgram, prefix: str):
        self.uf = _UnionFind()
        self.layouts: dict[torch.fx.Node, Any] = {}
        self.members: list[tuple[np.ndarray, str, int]] = []  # ids, param, dim (index = position)
        self.blocks: list[Block] = []
        self.heads: dict[str, int] = {}
        self.unhandled: Counter[str] = Counter()
        self.produced: set[str] = set()  # weights whose dim 0 creates channels (conv/linear)
        self.param_of: dict[str, str] = {}
        for spec in ep.graph_signature.input_specs:
            if spec.kind.name == "PARAMETER" and spec.target:
                self.param_of[spec.arg.name] = spec.target[len(prefix):] if spec.target.startswith(prefix) else spec.target
        self.prefix = prefix

    # ---- helpers --------------------------------------------------------------------------------------
    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None

    def layout(self, node: Any) -> Layout | None:
        return self.layouts.get(node) if isinstance(node, torch.fx.Node) else None

    def freeze_node(self, node: Any) -> None:
        for x in node if isinstance(node, (list, tuple)) else [node]:
            lay = self.layout(x)
            if isinstance(lay, Layout):
                self.uf.freeze(lay.ids)
            elif isinstance(lay, list):
                for sub in lay:
                    if sub is not None:
                        self.uf.freeze(sub.ids)

    def channel_ids(self, node: Any, dim: int) -> np.ndarray:
        """Ids of ``node``'s channels along ``dim`` (its only tracked dim); fresh frozen ids when untracked."""
        shp = self.shape(node)
        dim = dim % len(shp)
        lay = self.layout(node)
        if isinstance(lay, Layout) and lay.dims == (dim,):
            return lay.ids
        if isinstance(lay, Layout):
            self.uf.freeze(lay.ids)
        ids = self.uf.new(shp[dim])
        self.uf.freeze(ids)
        return ids

    def member(self, ids: np.ndarray, param_node: Any, dim: int) -> None:
        name = self.param_of.get(getattr(param_node, "name", None))
        if name is not None:
            self.members.append((ids, name, dim))

    def module_of(self, node: torch.fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0].replace("L['self'].", "").replace("L__self___", "")
        first, _, rest = path.partition(".")
        return rest if self.prefix.startswith(first + ".") else path

    # ---- the walk -------------------------------------------------------------------------------------
    def run(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function":
                self.visit(node)
            elif node.op == "output":
                self.freeze_node(list(node.args[0]) if isinstance(node.args[0], (list, tuple)) else [node.args[0]])

    def visit(self, n: torch.fx.Node) -> None:
        name = aten_name(n)
        handler = getattr(self, f"op_{name}", None)
        if handler is not None:
            self.layouts[n] = handler(n)
        elif name in _SAME:
            lay = self.layout(n.args[0])
            self.layouts[n] = lay if self.shape(n) == self.shape(n.args[0]) or name.startswith(("upsample", "avg_pool", "max_pool")) else self.unknown(n, name)
        elif name in _BROADCAST:
            self.layouts[n] = self.broadcast(n)
        elif name in _RESHAPE:
            self.layouts[n] = self.reshape(self.layout(n.args[0]), self.shape(n.args[0]), self.shape(n))
        elif name in _IGNORE:
            self.layouts[n] = None
        else:
            self.layouts[n] = self.unknown(n, name)

    def unknown(self, n: torch.fx.Node, name: str) -> None:
        tracked = [a for a in n.all_input_nodes if self.layout(a) is not None]
        if tracked:
            self.unhandled[name] += 1
            self.freeze_node(tracked)
        return None

    def broadcast(self, n: torch.fx.Node) -> Layout | None:
        out = self.shape(n)
        if out is None:
            return self.unknown(n, aten_name(n))
        tensors = [a for a in n.args if isinstance(a, torch.fx.Node) and self.shape(a) is not None]
        tracked, plain = [], []
        for a in tensors:
            lay, shp = self.layout(a), self.shape(a)
            shift = len(out) - len(shp)
            if isinstance(lay, Layout) and lay.ids.size:
                tracked.append(Layout(tuple(d + shift for d in lay.dims), lay.ids))
            else:
                plain.append((shp, shift))
        if not tracked:
            return None
        dims = tracked[0].dims
        if any(t.dims != dims or t.ids.shape != tracked[0].ids.shape for t in tracked):
            for t in tracked:
                self.uf.freeze(t.ids)
            self.unhandled["broadcast-mismatch"] += 1
            return None
        for t in tracked[1:]:
            self.uf.union_arrays(tracked[0].ids, t.ids)
        for shp, shift in plain:  # an untracked tensor varying along a channel dim (a constant, a buffer)
            if any(0 <= d - shift < len(shp) and shp[d - shift] > 1 for d in dims):
                self.uf.freeze(tracked[0].ids)
        return tracked[0]

    def reshape(self, lay: Layout | None, a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> Layout | None:
        if lay is None or a is None or b is None:
            return None
        blocks = dim_blocks(a, b)
        if blocks is None:
            self.uf.freeze(lay.ids)
            return None
        new_dims: list[int] = []
        for ins, outs in blocks:
            ch = [d for d in ins if d in lay.dims]
            if not ch:
                continue
            if any(d not in lay.dims and a[d] != 1 for d in ins):  # channels merged with batch/space: lose them
                self.uf.freeze(lay.ids)
                return None
            new_dims += [d for d in outs if b[d] != 1] or outs[:1]
        if not new_dims:
            return None
        return Layout(tuple(new_dims), lay.ids.reshape([b[d] for d in new_dims]))

    def permute(self, lay: Layout | None, perm: list[int]) -> Layout | None:
        if lay is None:
            return None
        pos = [perm.index(d) for d in lay.dims]
        order = sorted(range(len(pos)), key=lambda i: pos[i])
        return Layout(tuple(pos[i] for i in order), np.transpose(lay.ids, order))

    # ---- ops with their own rules ---------------------------------------------------------------------
    def op_pad(self, n):
        """Padding of spatial dims carries channels; padding a channel dim would invent channels."""
        lay, nd, pad = self.layout(n.args[0]), len(self.shape(n)), list(n.args[1])
        padded = {nd - 1 - i // 2 for i, p in enumerate(pad) if p}
        if lay is not None and padded & set(lay.dims):
            return self.unknown(n, "pad")
        return lay

    op_constant_pad_nd = op_pad

    def op_permute(self, n):
        nd = len(self.shape(n))
        return self.permute(self.layout(n.args[0]), [d % nd for d in n.args[1]])

    def op_transpose(self, n):
        nd = len(self.shape(n))
        perm = list(range(nd))
        d0, d1 = n.args[1] % nd, n.args[2] % nd
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self.permute(self.layout(n.args[0]), perm)

    def op_t(self, n):
        return self.permute(self.layout(n.args[0]), [1, 0])

    def op_expand(self, n):
        lay, shift = self.layout(n.args[0]), len(self.shape(n)) - len(self.shape(n.args[0]))
        return None if lay is None else Layout(tuple(d + shift for d in lay.dims), lay.ids)

    def op_slice(self, n):
        lay, shp = self.layout(n.args[0]), self.shape(n.args[0])
        if lay is None:
            return None
        dim = (n.args[1] if len(n.args) > 1 else 0) % len(shp)
        if dim not in lay.dims:
            return lay
        start = n.args[2] if len(n.args) > 2 and n.args[2] is not None else 0
        end = n.args[3] if len(n.args) > 3 and n.args[3] is not None else shp[dim]
        step = n.args[4] if len(n.args) > 4 else 1
        axis = lay.dims.index(dim)
        idx = list(range(shp[dim]))[slice(start, end, step)]
        return Layout(lay.dims, np.take(lay.ids, idx, axis=axis))

    def op_select(self, n):
        lay, shp = self.layout(n.args[0]), self.shape(n.args[0])
        if lay is None:
            return None
        dim = n.args[1] % len(shp)
        shifted = tuple(d - 1 if d > dim else d for d in lay.dims if d != dim)
        ids = np.take(lay.ids, n.args[2] % shp[dim], axis=lay.dims.index(dim)) if dim in lay.dims else lay.ids
        return Layout(shifted, ids) if shifted else None

    def split_layouts(self, n, dim: int) -> list[Layout | None]:
        lay, shp = self.layout(n.args[0]), self.shape(n.args[0])
        outs = n.meta.get("val") or []
        if lay is None:
            return [None] * len(outs)
        dim %= len(shp)
        if dim not in lay.dims:
            return [lay] * len(outs)
        axis, start, res = lay.dims.index(dim), 0, []
        for o in outs:
            size = int(o.shape[dim])
            res.append(Layout(lay.dims, np.take(lay.ids, range(start, start + size), axis=axis)))
            start += size
        return res

    def op_chunk(self, n):
        return self.split_layouts(n, n.args[2] if len(n.args) > 2 else 0)

    def op_split(self, n):
        return self.split_layouts(n, n.args[2] if len(n.args) > 2 else 0)

    def op_split_with_sizes(self, n):
        return self.split_layouts(n, n.args[2] if len(n.args) > 2 else 0)

    def op_getitem(self, n):
        src = self.layouts.get(n.args[0])
        return src[n.args[1]] if isinstance(src, list) and n.args[1] < len(src) else None

    def op_cat(self, n):
        tensors = list(n.args[0])
        out = self.shape(n)
        dim = (n.args[1] if len(n.args) > 1 else 0) % len(out)
        lays = [self.layout(t) for t in tensors]
        if all(lay is None for lay in lays):
            return None
        dims = next(lay.dims for lay in lays if lay is not None)
        if any(lay is not None and lay.dims != dims for lay in lays):
            self.freeze_node(tensors)
            self.unhandled["cat-mismatch"] += 1
            return None
        if dim in dims:  # concatenating channels: the output's ids are the inputs' ids, in order
            axis, parts = dims.index(dim), []
            for t, lay in zip(tensors, lays):
                if lay is None:
                    fresh = self.uf.new(int(np.prod([self.shape(t)[d] for d in dims])))
                    self.uf.freeze(fresh)
                    lay = Layout(dims, fresh.reshape([self.shape(t)[d] for d in dims]))
                parts.append(lay.ids)
            return Layout(dims, np.concatenate(parts, axis=axis))
        first = next(lay for lay in lays if lay is not None)
        for lay in lays:
            if lay is None:
                self.uf.freeze(first.ids)
            else:
                self.uf.union_arrays(first.ids, lay.ids)
        return first

    def op_conv2d(self, n):
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else None
        groups = n.args[6] if len(n.args) > 6 else 1
        wshape = self.shape(w)
        if groups != 1:
            self.freeze_node([x])
            self.unhandled["grouped-conv"] += 1
            return None
        self.member(self.channel_ids(x, 1), w, 1)
        out = self.uf.new(wshape[0])
        self.member(out, w, 0)
        self.produced.add(self.param_of.get(w.name, ""))
        if isinstance(b, torch.fx.Node):
            self.member(out, b, 0)
        return Layout((1,), out)

    op_convolution = op_conv2d

    def op_linear(self, n):
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else None
        self.member(self.channel_ids(x, -1), w, 1)
        out = self.uf.new(self.shape(w)[0])
        self.member(out, w, 0)
        self.produced.add(self.param_of.get(w.name, ""))
        if isinstance(b, torch.fx.Node):
            self.member(out, b, 0)
        return Layout((len(self.shape(n)) - 1,), out)

    def op_group_norm(self, n):
        x, groups = n.args[0], n.args[1]
        w = n.args[2] if len(n.args) > 2 else None
        b = n.args[3] if len(n.args) > 3 else None
        ids = self.channel_ids(x, 1)
        for p in (w, b):
            if isinstance(p, torch.fx.Node):
                self.member(ids, p, 0)
        module = self.param_of.get(getattr(w, "name", None), self.module_of(n)).rsplit(".", 1)[0]
        self.blocks.append(Block("groupnorm", module, ids.reshape(groups, -1)))
        return Layout((1,), ids)

    def op_layer_norm(self, n):
        x, normalized = n.args[0], n.args[1]
        w = n.args[2] if len(n.args) > 2 else None
        b = n.args[3] if len(n.args) > 3 else None
        if len(normalized) != 1:
            return self.unknown(n, "layer_norm")
        ids = self.channel_ids(x, -1)
        for p in (w, b):
            if isinstance(p, torch.fx.Node):
                self.member(ids, p, 0)
        return Layout((len(self.shape(n)) - 1,), ids)

    def _heads_layout(self, node: Any) -> Layout | None:
        """(B, heads, S, head_dim) layout; a single head's size-1 axis is restored when the reshape dropped it."""
        lay, shp = self.layout(node), self.shape(node)
        if isinstance(lay, Layout) and shp is not None and len(shp) == 4 and lay.dims == (3,) and shp[1] == 1:
            return Layout((1, 3), lay.ids.reshape(1, -1))
        return lay

    def op_scaled_dot_product_attention(self, n):
        q, k, v = (self._heads_layout(a) for a in n.args[:3])
        ok = all(isinstance(t, Layout) and t.dims == (1, 3) for t in (q, k, v)) and q.ids.shape == k.ids.shape == v.ids.shape
        if not ok:
            return self.unknown(n, "scaled_dot_product_attention")
        # QKᵀ pairs q and k per (head, dim); diffusers reshapes q, k and v with one head_dim, so they share indices
        self.uf.union_arrays(q.ids, k.ids)
        self.uf.union_arrays(q.ids, v.ids)
        module = self.module_of(n)
        self.blocks.append(Block("heads", module, q.ids))
        self.heads[module] = int(q.ids.shape[0])
        return Layout((1, 3), v.ids) if self.shape(n)[1] != 1 else Layout((3,), v.ids.reshape(-1))


def analyze(ep: torch.export.ExportedProgram, prefix: str) -> DependencyGraph:
    """Channel dependency groups of a captured component.

    ``prefix`` is the interface attribute the component sits under in the capture (``"unet."``), stripped
    so parameter names are the component module's own paths."""
    w = _Walker(ep, prefix)
    w.run(ep.graph)
    return _collect(w)


def _collect(w: _Walker) -> DependencyGraph:
    uf = w.uf
    order: dict[tuple[str, int], int] = {}
    by_root: dict[int, list[tuple[str, int, int]]] = defaultdict(list)
    for ids, param, dim in w.members:
        order.setdefault((param, dim), len(order))
        for idx, cid in enumerate(ids.tolist()):
            by_root[uf.find(cid)].append((param, dim, idx))
    by_sig: dict[tuple, list[int]] = defaultdict(list)
    for root, mem in by_root.items():
        sig = tuple(sorted(Counter((p, d) for p, d, _ in mem).items()))
        by_sig[sig].append(root)

    groups, frozen = [], []
    for sig, roots in by_sig.items():
        keys = sorted((k for k, _ in sig), key=order.__getitem__)
        anchor = next((k for k in keys if k[1] == 0 and k[0] in w.produced), keys[0])
        name = f"{anchor[0].rsplit('.', 1)[0]}:{'out' if anchor[1] == 0 else 'in'}"
        consumed = any(d >= 1 for _, d in keys)
        if any(uf.frozen[r] for r in roots) or not consumed:
            frozen.append(name)
            continue
        members = {k: [] for k in keys}
        for root in roots:
            per: dict[tuple[str, int], list[int]] = defaultdict(list)
            for p, d, idx in by_root[root]:
                per[(p, d)].append(idx)
            for k in keys:
                members[k].append(sorted(per[k]))
        arrays = {k: np.array(v, dtype=np.int64) for k, v in members.items()}
        rank = np.argsort(arrays[anchor][:, 0], kind="stable")
        arrays = {k: v[rank] for k, v in arrays.items()}
        roots_sorted = [roots[i] for i in rank]
        producers = [p.rsplit(".", 1)[0] for p, d in keys if d == 0 and p in w.produced]
        groups.append((name, arrays, roots_sorted, producers))

    root_to_row = {}
    for gi, (_, _, roots, _) in enumerate(groups):
        for ri, r in enumerate(roots):
            root_to_row[r] = (gi, ri)
    structure: dict[int, list[tuple[Block, np.ndarray]]] = defaultdict(list)
    constraints, seen_names = [], Counter()
    multiples: dict[int, set[int]] = defaultdict(set)
    for blk in w.blocks:
        rows = np.vectorize(lambda c: root_to_row.get(uf.find(int(c)), (-1, -1))[1], otypes=[np.int64])(blk.ids)
        gidx = {root_to_row.get(uf.find(int(c)), (-1, -1))[0] for c in blk.ids.ravel().tolist()}
        if len(gidx) == 1 and -1 not in gidx:
            structure[gidx.pop()].append((blk, rows))
        elif -1 not in gidx:
            constraints.append(blk)
            for g in gidx:  # every source keeping a multiple of the groups keeps the concatenation divisible
                multiples[g].add(int(blk.ids.shape[0]))

    out = []
    for gi, (name, arrays, _, producers) in enumerate(groups):
        seen_names[name] += 1
        if seen_names[name] > 1:
            name = f"{name}#{seen_names[name]}"
        n = len(next(iter(arrays.values())))
        block_of, kind, modules, uniform = _choose_structure(n, structure.get(gi, []))
        out.append(ChannelGroup(name=name, members=arrays, block_of=block_of, structure=kind, modules=modules,
                                multiple=lcm(*multiples.get(gi, ())), producers=producers, uniform_blocks=uniform))
    return DependencyGraph(groups=out, frozen=sorted(frozen), constraints=constraints, heads=dict(w.heads),
                           unhandled=dict(w.unhandled))


def _choose_structure(n: int, blocks: list[tuple[Block, np.ndarray]]) -> tuple[np.ndarray, str | None, list[str], bool]:
    """Assign rows to blocks: heads win over GroupNorm groups, more blocks win among equals; every other
    structure on the group must be a coarsening of the chosen one (else it is reported as unstructured).
    The flag says whether every structure has exactly the chosen blocks, so whole blocks can be removed
    and each structure's block count lowered (num_groups, heads) without splitting any block."""
    none = np.full(n, -1, dtype=np.int64)
    cands, uniform = [], True
    for blk, rows in blocks:
        flat = rows.reshape(rows.shape[0], -1)
        if sorted(flat.ravel().tolist()) != list(range(n)):
            uniform = False
            continue  # a block covering rows twice (or partially) cannot drive selection
        assign = np.empty(n, dtype=np.int64)
        for b, row in enumerate(flat):
            assign[row] = b
        cands.append((blk.kind == "heads", flat.shape[0], assign, blk))
    if not cands:
        return none, None, [], False
    cands.sort(key=lambda c: (c[0], c[1]), reverse=True)
    _, _, assign, best = cands[0]
    for _, _, other, _ in cands[1:]:
        for b in range(int(assign.max()) + 1):
            if len(set(other[assign == b].tolist())) != 1:
                return none, None, [], False
        uniform = uniform and len(set(other.tolist())) == int(assign.max()) + 1
    uniform = uniform and all(c[3].kind == best.kind for c in cands)
    return assign, best.kind, sorted({c[3].module for c in cands}), uniform


def lcm(*xs: int) -> int:
    out = 1
    for x in xs:
        out = out * x // math.gcd(out, x)
    return out
