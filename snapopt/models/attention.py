"""Attention implementations a pass can swap in. All compute the same function (exact rewrites).

* ``original``     – explicit QKᵀ, softmax, AV (diffusers ``AttnProcessor``; Apple's ORIGINAL)
* ``sdpa``         – ``torch.nn.functional.scaled_dot_product_attention`` (diffusers ``AttnProcessor2_0``)
* ``split_einsum`` – Apple's Neural Engine form: tensors in (B, C, 1, S) layout, one einsum per head,
  softmax over the key axis; avoids the large batched reshapes the ANE handles poorly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class SplitEinsumAttnProcessor:
    """Per-head einsum attention in the ANE's channels-first (B, C, 1, S) layout."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise NotImplementedError("split_einsum attention does not support q/k normalisation")
        if attention_mask is not None:
            raise NotImplementedError("split_einsum attention does not support attention masks")

        heads = attn.heads
        dim_head = query.shape[-1] // heads
        # (B, S, C) -> (B, C, 1, S): the layout Apple's ANE kernels are written for
        q = query.transpose(1, 2).unsqueeze(2)
        k = key.transpose(1, 2).unsqueeze(2)
        v = value.transpose(1, 2).unsqueeze(2)
        outs = []
        for i in range(heads):
            sl = slice(i * dim_head, (i + 1) * dim_head)
            weights = torch.einsum("bchq,bkhc->bkhq", q[:, sl], k[:, sl].permute(0, 3, 2, 1)) * attn.scale
            weights = weights.softmax(dim=1)
            outs.append(torch.einsum("bkhq,bchk->bchq", weights, v[:, sl]))
        out = torch.cat(outs, dim=1).squeeze(2).transpose(1, 2)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def make_processor(kind: str):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

    return {"original": AttnProcessor, "sdpa": AttnProcessor2_0, "split_einsum": SplitEinsumAttnProcessor,
            "grouped_kv": GroupedKVAttnProcessor, "fused_sdpa": FusedAttnProcessor2_0}[kind]()


_KINDS = {"AttnProcessor": "original", "AttnProcessor2_0": "sdpa", "SplitEinsumAttnProcessor": "split_einsum",
          "GroupedKVAttnProcessor": "grouped_kv", "FusedAttnProcessor2_0": "fused_sdpa"}


def processor_kind(processor) -> str:
    name = type(processor).__name__
    return _KINDS.get(name, name)


def attention_modules(root: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in root.named_modules() if isinstance(m, Attention)}


#: implementations tied to a structure (shrunk K/V, fused projections): only their own pass sets them
STRUCTURAL_KINDS = {"grouped_kv", "fused_sdpa"}


def set_attention(root: nn.Module, kind: str) -> int:
    """Give every diffusers ``Attention`` under ``root`` the ``kind`` implementation; return how many.
    Attentions whose structure fixes their implementation (grouped K/V, fused QKV) keep theirs."""
    count = 0
    for m in attention_modules(root).values():
        if processor_kind(m.processor) in STRUCTURAL_KINDS:
            continue
        m.set_processor(make_processor(kind))
        count += 1
    return count


def attention_kinds(root: nn.Module) -> dict[str, str]:
    return {name: processor_kind(m.processor) for name, m in attention_modules(root).items()}


class GroupedKVAttnProcessor:
    """Grouped-query attention (multi-query when ``kv_heads == 1``): ``attn.heads`` query heads share
    ``attn.kv_heads`` key/value heads, so K/V projections and the KV tensors shrink by heads/kv_heads."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        import torch.nn.functional as F

        if attention_mask is not None:
            raise NotImplementedError("grouped-KV attention does not support attention masks")
        b, s, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(context), attn.to_v(context)
        heads, groups = attn.heads, attn.kv_heads
        d = q.shape[-1] // heads
        q = q.view(b, -1, heads, d).transpose(1, 2)
        k = k.view(b, -1, groups, d).transpose(1, 2).repeat_interleave(heads // groups, dim=1)
        v = v.view(b, -1, groups, d).transpose(1, 2).repeat_interleave(heads // groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, s, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


#: forms that compute the same attention as sdpa in a layout meant for another engine (the Neural Engine)
_SAMPLING_SWAPS = {"split_einsum": "sdpa"}


@contextmanager
def sampling_attention(root: nn.Module):
    """Sample with torch's fused attention where a model ships an exact form meant for another engine:
    split-einsum (what Core ML's Neural Engine wants) computes the same numbers as sdpa, 1.14x slower to sample
    the zoo model on this CPU (bench/eval_sampling_attention.py). The original processor objects come back
    afterwards, so what is saved or exported is untouched."""
    saved = []
    for m in attention_modules(root).values():
        swap = _SAMPLING_SWAPS.get(processor_kind(m.processor))
        if swap is not None:
            saved.append((m, m.processor))
            m.set_processor(make_processor(swap))
    try:
        yield len(saved)
    finally:
        for m, processor in saved:
            m.set_processor(processor)
