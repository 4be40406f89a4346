"""Structures diffusers' configs cannot express, as diffusers custom components.

This file is self-contained (torch and diffusers only): snapopt copies it beside the weights of every
component whose structure a plain diffusers config cannot describe (a lone removed attention, channel-pruned
widths), as ``unet/snapopt_unet.py`` or ``vae/snapopt_vae.py``, and names it in ``model_index.json``, so

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

loads the model in a process that never imports snapopt. The component's ``config.json`` holds the diffusers
config the structure starts from plus ``snapopt_structure``: an ordered list of edits, each data —

* ``{"op": "keep", "path": "up_blocks.1.resnets", "indices": [0, 2]}``: a ModuleList keeps these items
* ``{"op": "set", "path": "down_blocks.1.attentions.0", "module": {"type": "SkippedBlock", ...}}``: a module is
  replaced by one built from its description (``{"type": null}`` removes it)
* ``{"op": "attr", "path": "mid_block.attentions.0", "values": {"heads": 1, "scale": 0.125}}``: attributes that
  forward reads (head counts, channel counts) take these values

Paths are module paths after the edits before them. The stand-in modules snapopt's passes insert are
defined here (and re-exported by ``snapopt.models.blocks``), so a saved model never needs snapopt's passes.
"""

from __future__ import annotations

import functools
import inspect

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from torch import nn

STRUCTURE_KEY = "snapopt_structure"
FORMAT = 1


# ---- stand-ins for removed or rewritten modules ---------------------------------------------------------
class SkippedBlock(nn.Module):
    """A removed block: passes its input through, holds no parameters.

    Used where a block cannot leave its container without breaking the container's wiring (an attention
    paired with a surviving ResNet in a diffusers down block). ``kind`` and ``replaced`` record what it was,
    so the IR, reports and the config can say so."""

    def __init__(self, kind: str, replaced: str = ""):
        super().__init__()
        self.kind = kind
        self.replaced = replaced

    def forward(self, hidden_states, *args, **kwargs):
        if self.kind == "attention" and kwargs.get("return_dict", True) is False:
            return (hidden_states,)
        if self.kind == "attention" and "return_dict" in kwargs:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=hidden_states)
        return hidden_states

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, replaced={self.replaced!r}"


class NullAttention(nn.Module):
    """A removed self-attention inside a transformer block: contributes nothing to the residual stream.

    Returning zeros keeps diffusers' ``BasicTransformerBlock`` wiring (``attn_output + hidden_states``)
    intact; the block's ``norm1`` is replaced by ``Identity`` alongside, so nothing is computed for it."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


class LinearAsConv1x1(nn.Module):
    """A Linear layer computed as a 1x1 convolution over the ANE's (B, C, 1, S) layout.

    Apple's Neural Engine runs 1x1 convolutions on channels-first 4-D tensors far better than matmuls on
    (B, S, C); the weights are the Linear's, reshaped to (out, in, 1, 1), so the rewrite is exact."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.conv = nn.Conv2d(in_features, out_features, 1, bias=bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LinearAsConv1x1":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            new.conv.weight.copy_(linear.weight[:, :, None, None])
            if linear.bias is not None:
                new.conv.bias.copy_(linear.bias)
        return new

    def forward(self, x):
        # (B, S, C) -> (B, C, 1, S) -> conv -> (B, C', 1, S) -> (B, S, C')
        return self.conv(x.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2)


class SeparableConv2d(nn.Module):
    """Depthwise k×k followed by pointwise 1×1: SnapGen's cheap replacement for a dense k×k convolution.

    :meth:`from_conv` initialises it from the best per-input-channel rank-1 factorisation of the dense
    kernel (SVD), so recovery training starts close to the original layer."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1, stride: int = 1, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, stride=stride, padding=padding, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "SeparableConv2d":
        k = conv.kernel_size[0]
        new = cls(conv.in_channels, conv.out_channels, k, conv.padding[0], conv.stride[0], conv.bias is not None)
        new = new.to(conv.weight.device, conv.weight.dtype)
        if conv.weight.is_meta:
            return new
        with torch.no_grad():
            w = conv.weight.float()                                   # (out, in, k, k)
            per_input = w.permute(1, 0, 2, 3).reshape(conv.in_channels, conv.out_channels, k * k)
            u, s, vh = torch.linalg.svd(per_input, full_matrices=False)  # batched over input channels
            root = s[:, :1].sqrt()
            new.depthwise.weight.copy_((vh[:, :1, :] * root[:, :, None]).reshape(conv.in_channels, 1, k, k))
            new.pointwise.weight.copy_((u[:, :, :1] * root[:, None, :]).squeeze(-1).t()[:, :, None, None])
            if conv.bias is not None:
                new.pointwise.bias.copy_(conv.bias)
        return new

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


# ---- module descriptions ----------------------------------------------------------------------------------
def describe_module(m: nn.Module | None) -> dict | None:
    """A leaf module as data (what ``build_module`` rebuilds), or None when it is not a known leaf."""
    if m is None:
        return {"type": None}
    t = type(m)
    if t is nn.Conv2d:
        return {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
                "stride": list(m.stride), "padding": list(m.padding) if not isinstance(m.padding, str) else m.padding,
                "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None, "padding_mode": m.padding_mode}
    if t is nn.Linear:
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
    if t is nn.GroupNorm:
        return {"type": "GroupNorm", "num_groups": m.num_groups, "num_channels": m.num_channels, "eps": m.eps, "affine": m.affine}
    if t is nn.LayerNorm:
        return {"type": "LayerNorm", "normalized_shape": list(m.normalized_shape), "eps": m.eps,
                "elementwise_affine": m.elementwise_affine, "bias": getattr(m, "bias", None) is not None}
    if t is nn.Identity:
        return {"type": "Identity"}
    if t is SkippedBlock:
        return {"type": "SkippedBlock", "kind": m.kind, "replaced": m.replaced}
    if t is NullAttention:
        return {"type": "NullAttention"}
    if t is LinearAsConv1x1:
        return {"type": "LinearAsConv1x1", "in_features": m.in_features, "out_features": m.out_features, "bias": m.conv.bias is not None}
    if t is SeparableConv2d:
        return {"type": "SeparableConv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": m.depthwise.kernel_size[0], "padding": m.depthwise.padding[0], "stride": m.depthwise.stride[0],
                "bias": m.pointwise.bias is not None}
    return None


def build_module(spec: dict) -> nn.Module | None:
    """The module a :func:`describe_module` description stands for (fresh weights; loading fills them)."""
    kw = {k: v for k, v in spec.items() if k != "type"}
    t = spec["type"]
    if t is None:
        return None
    if t == "Conv2d":
        pad = kw.pop("padding")
        return nn.Conv2d(kw.pop("in_channels"), kw.pop("out_channels"), tuple(kw.pop("kernel_size")), stride=tuple(kw.pop("stride")),
                         padding=pad if isinstance(pad, str) else tuple(pad), dilation=tuple(kw.pop("dilation")), **kw)
    if t == "LayerNorm":
        return nn.LayerNorm(tuple(kw.pop("normalized_shape")), **kw)
    classes = {"Linear": nn.Linear, "GroupNorm": nn.GroupNorm, "Identity": nn.Identity, "SkippedBlock": SkippedBlock,
               "NullAttention": NullAttention, "LinearAsConv1x1": LinearAsConv1x1, "SeparableConv2d": SeparableConv2d}
    if t not in classes:
        raise ValueError(f"{STRUCTURE_KEY}: unknown module type {t!r}")
    return classes[t](**kw)


#: attributes forward passes read that structural edits change, per module class name
ATTRIBUTES = {
    "Attention": ("heads", "scale", "inner_dim", "inner_kv_dim", "query_dim", "out_dim", "rescale_output_factor"),
    "ResnetBlock2D": ("in_channels", "out_channels", "use_in_shortcut"),
    "Upsample2D": ("channels", "out_channels"),
    "Downsample2D": ("channels", "out_channels"),
    "Transformer2DModel": ("in_channels", "out_channels", "inner_dim"),
    "BasicTransformerBlock": ("dim",),
    "UNet2DConditionModel": ("num_upsamplers",),
    "SnapoptUNet2DConditionModel": ("num_upsamplers",),
}


def _attrs(m: nn.Module) -> dict:
    names = ATTRIBUTES.get(type(m).__name__, ())
    return {n: _plain(getattr(m, n)) for n in names if hasattr(m, n)}


def _plain(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def _signature(m: nn.Module | None):
    """Type, parameter shapes and attributes of a subtree: equal signatures are interchangeable structures."""
    if m is None:
        return None
    return (type(m).__name__, tuple((k, tuple(v.shape)) for k, v in m.state_dict().items()),
            tuple(sorted((n, repr(_attrs(s))) for n, s in m.named_modules())))


def _align(actual: nn.ModuleList, base: nn.ModuleList) -> list[int]:
    """Which base items survive in ``actual`` (same order): the first base item with the same signature,
    else the next one in line (its differences are then recorded as further edits)."""
    base_sigs = [_signature(b) for b in base]
    kept, j = [], 0
    for a in actual:
        sig = _signature(a)
        match = next((i for i in range(j, len(base)) if base_sigs[i] == sig and len(base) - i >= len(actual) - len(kept)), None)
        i = match if match is not None else j
        kept.append(i)
        j = i + 1
    return kept


def diff_structure(actual: nn.Module, base: nn.Module) -> list[dict]:
    """The edits that turn ``base`` (built from a diffusers config) into ``actual``'s structure. Edits ``base``
    as it goes; raises ValueError naming the first module it cannot describe."""
    ops: list[dict] = []

    def walk(a: nn.Module, b: nn.Module, path: str) -> None:
        same_type = type(a) is type(b) or (not path and isinstance(a, type(b)))  # the root may be a structured subclass
        if not same_type or (describe_module(a) is not None and describe_module(a) != describe_module(b)):
            spec = describe_module(a)
            if spec is None:
                raise ValueError(f"cannot describe module '{path or '<root>'}' ({type(a).__name__}) as data")
            ops.append({"op": "set", "path": path, "module": spec})
            return
        if describe_module(a) is not None:
            return
        values = {k: v for k, v in _attrs(a).items() if _attrs(b).get(k, object()) != v}
        if values:
            ops.append({"op": "attr", "path": path, "values": values})
            for k, v in values.items():
                setattr(b, k, v)
        if isinstance(a, nn.ModuleList) and len(a) != len(b):
            if len(a) > len(b):
                raise ValueError(f"module list '{path}' grew from {len(b)} to {len(a)} items")
            kept = _align(a, b)
            ops.append({"op": "keep", "path": path, "indices": kept})
            _keep(b, kept)
        names = list(dict.fromkeys(list(b._modules) + list(a._modules)))
        for name in names:
            sub = f"{path}.{name}" if path else name
            ca, cb = a._modules.get(name), b._modules.get(name)
            if name not in a._modules and name in b._modules:
                raise ValueError(f"module '{sub}' was deleted (not set to None); it cannot be described as data")
            if ca is None or cb is None:
                if ca is None and cb is None:
                    continue
                spec = describe_module(ca)
                if spec is None:
                    raise ValueError(f"cannot describe module '{sub}' ({type(ca).__name__}) as data")
                ops.append({"op": "set", "path": sub, "module": spec})
                continue
            walk(ca, cb, sub)

    walk(actual, base, "")
    return ops


def _keep(lst: nn.ModuleList, indices: list[int]) -> None:
    items = [lst[i] for i in indices]
    for i in range(len(lst) - 1, -1, -1):
        del lst[i]
    for m in items:
        lst.append(m)


def _resolve(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def apply_structure(root: nn.Module, ops: list[dict] | None) -> None:
    """Replay :func:`diff_structure`'s edits on a freshly built module (weights are loaded afterwards)."""
    for op in ops or []:
        kind, path = op["op"], op["path"]
        if kind == "keep":
            _keep(root.get_submodule(path), list(op["indices"]))
        elif kind == "set":
            parent, name = _resolve(root, path)
            module = build_module(op["module"])
            ref = next(iter(parent.parameters()), None) if module is not None else None
            if module is not None and ref is not None:
                module = module.to(device=ref.device, dtype=ref.dtype)
            if isinstance(parent, (nn.ModuleList, nn.Sequential)) and name.isdigit():
                parent[int(name)] = module
            else:
                setattr(parent, name, module)
        elif kind == "attr":
            target = root.get_submodule(path) if path else root
            for k, v in op["values"].items():
                setattr(target, k, tuple(v) if isinstance(getattr(target, k, None), tuple) else v)
        else:
            raise ValueError(f"{STRUCTURE_KEY}: unknown edit {kind!r}")


# ---- diffusers models that carry their structure in their config ------------------------------------------
def _structured(base_cls):
    """``base_cls``'s config plus ``snapopt_structure``: the same signature with one more argument."""
    base_init = base_cls.__init__
    sig = inspect.signature(base_init)
    params = list(sig.parameters.values())
    params.append(inspect.Parameter(STRUCTURE_KEY, inspect.Parameter.KEYWORD_ONLY, default=None))

    def __init__(self, *args, **kwargs):
        structure = kwargs.pop(STRUCTURE_KEY, None)
        base_init(self, *args, **kwargs)
        apply_structure(self, (structure or {}).get("edits"))
        self._mark()

    functools.update_wrapper(__init__, base_init)
    del __init__.__wrapped__
    __init__.__signature__ = sig.replace(parameters=params)
    return register_to_config(__init__)


class _Portable:
    """What makes a structured model save and reload as a diffusers custom component anywhere:
    ``save_pretrained`` writes this file beside config and weights, and the instance reports the module name
    diffusers' pipelines record in model_index.json as the file's name (``snapopt_unet``), so a pipeline's
    own ``save_pretrained`` writes a folder that ``from_pretrained(..., trust_remote_code=True)`` reloads."""

    code_file = ""

    def _mark(self) -> None:
        self.__dict__["__module__"] = self.code_file

    def save_pretrained(self, save_directory, *args, **kwargs):
        import os
        import shutil

        super().save_pretrained(save_directory, *args, **kwargs)
        shutil.copyfile(inspect.getsourcefile(type(self)), os.path.join(save_directory, self.code_file + ".py"))


class SnapoptUNet2DConditionModel(_Portable, UNet2DConditionModel):
    """A UNet2DConditionModel whose config also lists the structural edits (``snapopt_structure``)."""

    code_file = "snapopt_unet"
    __init__ = _structured(UNet2DConditionModel)


class SnapoptAutoencoderKL(_Portable, AutoencoderKL):
    """An AutoencoderKL whose config also lists the structural edits (``snapopt_structure``)."""

    code_file = "snapopt_vae"
    __init__ = _structured(AutoencoderKL)


STRUCTURED = {"UNet2DConditionModel": SnapoptUNet2DConditionModel, "AutoencoderKL": SnapoptAutoencoderKL}
