"""Keep a structurally edited UNet's diffusers config truthful, or say that it cannot be.

After a pass removes blocks, the UNet's ``config`` must describe the modules it now has, so that
``save_pretrained``/``from_pretrained`` round-trip. :func:`express_unet` derives that config from the
modules and proves it by instantiating it on the meta device and comparing every parameter name and shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from snapopt.models.blocks import SkippedBlock


def _real(modules) -> list[nn.Module]:
    return [m for m in modules if not isinstance(m, SkippedBlock)]


def _heads(block: nn.Module) -> int | None:
    for attn in _real(getattr(block, "attentions", None) or []):
        tb = getattr(attn, "transformer_blocks", None)
        if tb:
            for attn in (tb[0].attn1, getattr(tb[0], "attn2", None)):
                if getattr(attn, "heads", None) is not None:
                    return int(attn.heads)
    return None


def _transformer_layers(block: nn.Module) -> int | None:
    for attn in _real(getattr(block, "attentions", None) or []):
        tb = getattr(attn, "transformer_blocks", None)
        if tb is not None:
            return len(tb)
    return None


def _block_type(block: nn.Module, up: bool) -> str | None:
    attns = getattr(block, "attentions", None)
    real = _real(attns or [])
    if real and len(real) != len(attns):
        return None  # some attentions skipped, others not: no diffusers block type says that
    if any(isinstance(r, SkippedBlock) for r in block.resnets):
        return None
    cls = type(block).__name__
    if real:
        return cls
    return "UpBlock2D" if up else "DownBlock2D"


def derive_unet_config(unet: nn.Module) -> dict[str, Any] | None:
    """The diffusers config that describes ``unet``'s modules, or ``None`` if none can."""
    cfg = dict(unet.config)
    downs, ups = list(unet.down_blocks), list(unet.up_blocks)
    if len(downs) != len(ups):
        return None
    down_types, up_types = [], []
    for block in downs:
        t = _block_type(block, up=False)
        if t is None:
            return None
        down_types.append(t)
    for block in ups:
        t = _block_type(block, up=True)
        if t is None:
            return None
        up_types.append(t)
    n = len(downs)
    layers = [len(b.resnets) for b in downs]
    if any(len(ups[i].resnets) != layers[n - 1 - i] + 1 for i in range(n)):
        return None
    if any((getattr(downs[i], "downsamplers", None) is not None) != (i < n - 1) for i in range(n)):
        return None
    if any((getattr(ups[i], "upsamplers", None) is not None) != (i < n - 1) for i in range(n)):
        return None
    heads, tlayers = [], []
    orig_heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
    default_heads = orig_heads[0] if isinstance(orig_heads, (list, tuple)) else orig_heads
    for i in range(n):
        h_down, h_up = _heads(downs[i]), _heads(ups[n - 1 - i])
        if h_down and h_up and h_down != h_up:
            return None
        heads.append(h_down or h_up or default_heads)
        t_down, t_up = _transformer_layers(downs[i]), _transformer_layers(ups[n - 1 - i])
        if t_down and t_up and t_down != t_up:
            return None
        tlayers.append(t_down or t_up or 1)
    out_ch = [b.resnets[-1].out_channels for b in downs]
    mid = unet.mid_block
    cfg.update(
        down_block_types=tuple(down_types), up_block_types=tuple(up_types), block_out_channels=tuple(out_ch),
        layers_per_block=layers[0] if len(set(layers)) == 1 else tuple(layers),
        mid_block_type=None if mid is None else cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=tlayers[0] if len(set(tlayers)) == 1 else tuple(tlayers),
    )
    if cfg.get("num_attention_heads") is not None:
        cfg["num_attention_heads"] = heads[0] if len(set(heads)) == 1 else tuple(heads)
    else:
        cfg["attention_head_dim"] = heads[0] if len(set(heads)) == 1 else tuple(heads)
    if mid is not None and _real(getattr(mid, "attentions", []) or []) != list(getattr(mid, "attentions", []) or []):
        return None
    if mid is not None and any(isinstance(r, SkippedBlock) for r in mid.resnets):
        return None
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return cfg if _same_parameters(unet, cfg) else None


def _same_parameters(unet: nn.Module, cfg: dict[str, Any]) -> bool:
    from diffusers import UNet2DConditionModel

    try:
        with torch.device("meta"):
            probe = UNet2DConditionModel.from_config(cfg)
    except Exception:
        return False
    ours = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    return ours == theirs


def sync_unet_config(unet: nn.Module) -> bool:
    """Update ``unet.config`` (and ``num_upsamplers``) to match its modules; return whether diffusers can
    express the structure. When it cannot, the config is left as it was and saving goes through snapopt's
    architecture file instead."""
    unet.num_upsamplers = sum(1 for b in unet.up_blocks if getattr(b, "upsamplers", None) is not None)
    cfg = derive_unet_config(unet)
    if cfg is None:
        return False
    unet.register_to_config(**cfg)
    return True
