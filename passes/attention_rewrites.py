"""Exact attention rewrites: swap how every attention computes, not what it computes.

The manager verifies each against the previous program's outputs (declared ``exact``). The Neural Engine
prefers ``split_einsum``; GPUs and the CPU prefer ``sdpa``; ``original`` is the explicit reference form.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from snapopt.core import ComponentOptions, Pass, PassContext, PassResult
from snapopt.errors import PreconditionError
from snapopt.models.attention import attention_kinds, set_attention


class AttentionOptions(ComponentOptions):
    component: Literal["unet", "vae_decoder"] = Field("unet", description="component whose attention is rewritten")


class _AttentionRewrite(Pass):
    Options = AttentionOptions
    exact = True
    kind = ""

    def _root(self, program):
        return program.unet if self.options.component == "unet" else program.vae.decoder

    def requires(self, program, ctx: PassContext) -> None:
        if not attention_kinds(self._root(program)):
            raise PreconditionError(self.name, f"component '{self.options.component}' has no attention to rewrite", tuple(ctx.history))

    def run(self, program, ctx: PassContext) -> PassResult:
        root = self._root(program)
        before = attention_kinds(root)
        count = set_attention(root, self.kind)
        changed = sum(1 for k in before.values() if k != self.kind)
        return PassResult(program, modified=changed > 0, stats={"attention_modules": count, "rewritten": changed, "implementation": self.kind})


class AttentionSDPA(_AttentionRewrite):
    """Compute attention with torch's fused scaled_dot_product_attention (exact)."""

    name = "attention_sdpa"
    kind = "sdpa"


class AttentionSplitEinsum(_AttentionRewrite):
    """Compute attention in Apple's split-einsum form for the Neural Engine: (B,C,1,S) layout, one einsum per head (exact)."""

    name = "attention_split_einsum"
    kind = "split_einsum"


class AttentionOriginal(_AttentionRewrite):
    """Compute attention as explicit QKᵀ, softmax and AV matmuls, the reference form (exact)."""

    name = "attention_original"
    kind = "original"
