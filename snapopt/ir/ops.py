"""Per-op cost facts read off an FX node: op class, MACs, bytes in/out and weight bytes.

These records are what the block IR sums and what latency cost models consume; computing them once at
capture lets later queries run without re-capturing.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import asdict, dataclass

import torch

ACT_BYTES = 2  # activations are fp16 on device

#: aten op name -> op class. Anything absent is "elementwise" if it produces a tensor, else ignored.
_CLASS = {
    "conv2d": "conv", "convolution": "conv", "_convolution": "conv", "conv1d": "conv",
    "linear": "linear", "addmm": "linear", "mm": "matmul", "bmm": "matmul", "baddbmm": "matmul",
    "matmul": "matmul", "einsum": "matmul",
    "scaled_dot_product_attention": "attention", "_scaled_dot_product_flash_attention_for_cpu": "attention",
    "_scaled_dot_product_efficient_attention": "attention", "_scaled_dot_product_flash_attention": "attention",
    "_scaled_dot_product_attention_math": "attention",
    "softmax": "softmax", "_softmax": "softmax", "_safe_softmax": "softmax",
    "group_norm": "norm", "native_group_norm": "norm", "layer_norm": "norm", "native_layer_norm": "norm",
    "upsample_nearest2d": "resize", "upsample_bilinear2d": "resize", "interpolate": "resize",
    "cat": "concat", "embedding": "gather", "index_select": "gather", "index": "gather", "argmax": "reduce",
    "mean": "reduce", "sum": "reduce",
}
#: ops that only re-describe memory (free on device after layout planning)
_VIEW = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand", "flatten",
    "contiguous", "alias", "clone", "to", "_to_copy", "detach", "slice", "select", "chunk", "split", "split_with_sizes",
    "unbind", "dropout", "_assert_tensor_metadata", "arange", "full", "zeros", "ones", "lift_fresh_copy", "sym_size",
    "type_as", "getitem", "scalar_tensor", "empty", "new_zeros", "_assert_scalar",
}


@dataclass
class OpRecord:
    name: str
    op: str
    op_class: str
    macs: int
    in_bytes: int
    out_bytes: int
    weight_params: int
    out_shape: tuple[int, ...]
    extra: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def aten_name(node: torch.fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", str(target))
    # "conv2d.default" -> "conv2d"
    return re.sub(r"\.(default|Tensor|int|dim|vec|Scalar|start|dtype|self|input|using_ints|[a-z_]+_out)$", "", name.split("::")[-1])


def _val(node) -> torch.Tensor | None:
    if isinstance(node, torch.fx.Node):
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            return v
    return None


def _numel(shape) -> int:
    return int(math.prod(int(s) for s in shape))


def _bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else _numel(t.shape) * ACT_BYTES


def _einsum_macs(equation: str, operands: list[torch.Tensor]) -> int:
    lhs = equation.replace(" ", "").split("->")[0]
    sizes: dict[str, int] = {}
    for spec, t in zip(lhs.split(","), operands):
        for letter, dim in zip(spec, t.shape):
            sizes[letter] = int(dim)
    return int(math.prod(sizes.values()))


def op_record(node: torch.fx.Node, param_nodes: dict[str, int]) -> OpRecord | None:
    """Cost facts of one ``call_function`` node; ``None`` for ops that move no data (views, metadata).

    ``param_nodes`` maps placeholder names that are parameters/buffers to their element counts, so
    weight traffic is counted where a weight is consumed."""
    if node.op != "call_function":
        return None
    name = aten_name(node)
    if name in _VIEW:
        return None
    out = _val(node)
    outs = node.meta.get("val")
    if out is None and isinstance(outs, (tuple, list)) and outs and isinstance(outs[0], torch.Tensor):
        out = outs[0]
    if out is None:
        return None
    op_class = _CLASS.get(name, "elementwise")
    args = [a for a in node.args]
    tensor_inputs = [a for a in node.all_input_nodes if _val(a) is not None]
    weight_params = sum(param_nodes.get(a.name, 0) for a in tensor_inputs)
    act_inputs = [a for a in tensor_inputs if a.name not in param_nodes]
    in_bytes = sum(_bytes(_val(a)) for a in act_inputs)
    macs = 0
    extra = None
    if op_class == "conv":
        w = _val(args[1])
        macs = _numel(out.shape) * _numel(w.shape[1:])
    elif op_class == "linear":
        if name == "addmm":
            a, b = _val(args[1]), _val(args[2])
            macs = int(a.shape[0]) * int(a.shape[1]) * int(b.shape[1])
        else:
            w = _val(args[1])
            macs = _numel(out.shape) * int(w.shape[-1])
    elif op_class == "matmul":
        if name == "einsum":
            operands = [_val(t) for t in args[1]]
            macs = _einsum_macs(args[0], operands)
        else:
            a = _val(args[-2]) if name == "baddbmm" else _val(args[0])
            macs = _numel(out.shape) * int(a.shape[-1])
        extra = {"activation_matmul": weight_params == 0}
    elif op_class == "attention":
        q, k, v = (_val(a) for a in args[:3])
        lead = _numel(q.shape[:-2])
        length, source, e, ev = int(q.shape[-2]), int(k.shape[-2]), int(q.shape[-1]), int(v.shape[-1])
        macs = lead * length * source * (e + ev)
        extra = {"heads": int(q.shape[1]) if q.dim() == 4 else 1, "q_len": length, "kv_len": source,
                 "head_dim": e, "score_bytes": lead * length * source * ACT_BYTES}
    elif op_class == "norm":
        macs = 0
    return OpRecord(
        name=node.name, op=name, op_class=op_class, macs=int(macs), in_bytes=int(in_bytes), out_bytes=_bytes(out),
        weight_params=int(weight_params), out_shape=tuple(int(s) for s in out.shape), extra=extra,
    )
