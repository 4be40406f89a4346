"""Structural attention rewrites from SnapGen (arXiv 2412.09619) and the LLM toolbox.

* ``remove_self_attention`` – drop self-attention at chosen resolutions (SnapGen removes it at high
  resolution, where the 4096×4096 score tensor dominates latency); cross-attention stays. Lossy.
* ``grouped_query_attention`` – share K/V heads among query heads (``kv_heads: 1`` is multi-query
  attention), initialised by averaging the heads of each group. Lossy.
* ``fuse_qkv`` – one projection for Q, K and V (K and V for cross-attention). Exact.

Each is structural: the chosen blocks are recorded explicitly (``replay_options``) so ``snapopt.load`` rebuilds
the same structure.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from snapopt.core import ComponentOptions, Pass, PassContext, PassResult
from snapopt.core.pass_base import MAX_LIST, BlockPath, LatentResolution
from snapopt.errors import UsageError
from snapopt.ir.select import select_blocks
from snapopt.models.attention import make_processor
from snapopt.models.blocks import NullAttention, SkippedBlock


class _TransformerSelection(ComponentOptions):
    component: Literal["unet"] = "unet"
    blocks: list[BlockPath] = Field(default_factory=list, max_length=MAX_LIST, description="attention blocks (Transformer2DModel paths) to rewrite")
    resolutions: list[LatentResolution] = Field(default_factory=list, max_length=16, description="latent resolutions whose attention blocks to rewrite, e.g. [64]")


def _chosen(pass_: Pass, program, ctx: PassContext) -> list[str]:
    o = pass_.options
    if not o.blocks and not o.resolutions:
        raise UsageError(f"{pass_.name}: give 'blocks' or 'resolutions'")
    if o.blocks and not o.resolutions:
        return list(o.blocks)  # explicit names (also the replay path: no capture needed)
    return select_blocks(program, o.component, ctx.shapes, kind="attention", names=o.blocks, resolutions=o.resolutions,
                         graph=ctx.input_graph(program, o.component))


def _transformer_blocks(unet: nn.Module, name: str):
    module = unet.get_submodule(name)
    if isinstance(module, SkippedBlock):
        return []
    return list(getattr(module, "transformer_blocks", []))


class RemoveSelfAttention(Pass):
    """Remove self-attention (keep cross-attention) in the attention blocks at chosen resolutions (SnapGen)."""

    name = "remove_self_attention"
    Options = _TransformerSelection
    structural = True

    def run(self, program, ctx: PassContext) -> PassResult:
        names = _chosen(self, program, ctx)
        removed = 0
        for name in names:
            for tb in _transformer_blocks(program.unet, name):
                if isinstance(tb.attn1, NullAttention):
                    continue
                tb.attn1 = NullAttention()
                tb.norm1 = nn.Identity()  # its only consumer was attn1
                removed += 1
        return PassResult(program, modified=removed > 0, stats={"blocks": names, "self_attentions_removed": removed},
                          replay_options={"component": "unet", "blocks": names})


class GQAOptions(_TransformerSelection):
    kv_heads: int = Field(1, ge=1, le=1024, description="key/value heads per attention (1 = multi-query attention)")
    which: Literal["self", "cross", "both"] = Field("self", description="which attentions of each transformer block")


class GroupedQueryAttention(Pass):
    """Share key/value heads among query heads (GQA; kv_heads=1 is multi-query attention), from the multi-head weights."""

    name = "grouped_query_attention"
    Options = GQAOptions
    structural = True

    def run(self, program, ctx: PassContext) -> PassResult:
        names = _chosen(self, program, ctx)
        g = self.options.kv_heads
        converted = 0
        for name in names:
            for tb in _transformer_blocks(program.unet, name):
                targets = {"self": [tb.attn1], "cross": [tb.attn2], "both": [tb.attn1, tb.attn2]}[self.options.which]
                for attn in targets:
                    if isinstance(attn, NullAttention) or getattr(attn, "kv_heads", None) is not None:
                        continue
                    if attn.heads % g:
                        raise UsageError(f"{self.name}: kv_heads={g} does not divide the {attn.heads} heads of {name}")
                    attn.to_k = _group_heads(attn.to_k, attn.heads, g)
                    attn.to_v = _group_heads(attn.to_v, attn.heads, g)
                    attn.kv_heads = g
                    attn.set_processor(make_processor("grouped_kv"))
                    converted += 1
        return PassResult(program, modified=converted > 0, stats={"blocks": names, "attentions_converted": converted, "kv_heads": g},
                          replay_options={"component": "unet", "blocks": names, "kv_heads": g, "which": self.options.which})


def _group_heads(linear: nn.Linear, heads: int, groups: int) -> nn.Linear:
    """A projection with ``groups`` heads whose weights are the mean of each group's original heads."""
    d = linear.out_features // heads
    new = nn.Linear(linear.in_features, groups * d, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
    if linear.weight.is_meta:
        return new
    with torch.no_grad():
        new.weight.copy_(linear.weight.view(groups, heads // groups, d, -1).mean(1).reshape(groups * d, -1))
        if linear.bias is not None:
            new.bias.copy_(linear.bias.view(groups, heads // groups, d).mean(1).reshape(-1))
    return new


class FuseQKVOptions(ComponentOptions):
    component: Literal["unet", "vae_decoder"] = "unet"


class FuseQKV(Pass):
    """Fuse Q, K and V projections into one matmul per attention (K and V for cross-attention); exact."""

    name = "fuse_qkv"
    Options = FuseQKVOptions
    exact = True
    structural = True

    def run(self, program, ctx: PassContext) -> PassResult:
        from snapopt.models.attention import attention_modules

        root = program.unet if self.options.component == "unet" else program.vae.decoder
        fused = 0
        for attn in attention_modules(root).values():
            if getattr(attn, "fused_projections", False) or getattr(attn, "kv_heads", None) is not None:
                continue
            attn.fuse_projections()
            # drop the unfused copies diffusers keeps, so parameters are not stored twice
            if attn.is_cross_attention:
                del attn.to_k, attn.to_v
            else:
                del attn.to_q, attn.to_k, attn.to_v
            attn.set_processor(make_processor("fused_sdpa"))
            fused += 1
        return PassResult(program, modified=fused > 0, stats={"attentions_fused": fused})
