"""Convolution-level rewrites for the Neural Engine.

* ``linear_to_conv`` – every Linear inside the attention blocks computed as a 1×1 convolution over the
  (B, C, 1, S) layout Apple's ANE kernels expect (exact; the weights are reshaped, not changed).
* ``separable_conv`` – SnapGen's depthwise-separable convolutions in place of the dense 3×3 convolutions of
  chosen ResNet blocks, initialised from a per-channel rank-1 SVD of the dense kernel (lossy).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from snapopt.core import ComponentOptions, Pass, PassContext, PassResult
from snapopt.core.pass_base import MAX_LIST, BlockPath, LatentResolution
from snapopt.errors import UsageError
from snapopt.ir.select import select_blocks
from snapopt.models.blocks import LinearAsConv1x1, SeparableConv2d, SkippedBlock


class LinearToConvOptions(ComponentOptions):
    component: Literal["unet"] = "unet"


class LinearToConv(Pass):
    """Compute the attention blocks' Linear layers as 1x1 Conv2d in the ANE's (B,C,1,S) layout (exact)."""

    name = "linear_to_conv"
    Options = LinearToConvOptions
    exact = True
    structural = True

    def run(self, program, ctx: PassContext) -> PassResult:
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        count = 0
        for block in program.unet.modules():
            if not isinstance(block, Transformer2DModel):
                continue
            for parent in list(block.modules()):
                for child_name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        setattr(parent, child_name, LinearAsConv1x1.from_linear(child))
                        count += 1
        return PassResult(program, modified=count > 0, stats={"linears_converted": count})


class SeparableConvOptions(ComponentOptions):
    component: Literal["unet", "vae_decoder"] = "unet"
    blocks: list[BlockPath] = Field(default_factory=list, max_length=MAX_LIST, description="ResNet blocks whose convolutions to make separable")
    resolutions: list[LatentResolution] = Field(default_factory=list, max_length=16, description="latent resolutions whose ResNet blocks to rewrite")
    convs: list[Literal["conv1", "conv2"]] = Field(default_factory=lambda: ["conv1", "conv2"], description="which convolutions of each ResNet")


class SeparableConv(Pass):
    """Replace dense 3x3 convs of chosen ResNet blocks with depthwise+pointwise pairs initialised by low-rank SVD (SnapGen)."""

    name = "separable_conv"
    Options = SeparableConvOptions
    structural = True

    def run(self, program, ctx: PassContext) -> PassResult:
        o = self.options
        if not o.blocks and not o.resolutions:
            raise UsageError(f"{self.name}: give 'blocks' or 'resolutions'")
        root = program.component(o.component)
        names = list(o.blocks) if o.blocks and not o.resolutions else select_blocks(
            program, o.component, ctx.shapes, kind="resnet", names=o.blocks, resolutions=o.resolutions,
            graph=ctx.input_graph(program, o.component))
        replaced, before, after = 0, 0, 0
        for name in names:
            try:
                resnet = root.get_submodule(name)
            except AttributeError:
                raise UsageError(f"{self.name}: component '{o.component}' has no block '{name}'") from None
            if isinstance(resnet, SkippedBlock):
                continue
            for conv_name in o.convs:
                conv = getattr(resnet, conv_name)
                if not isinstance(conv, nn.Conv2d) or conv.kernel_size == (1, 1) or conv.groups != 1:
                    continue
                sep = SeparableConv2d.from_conv(conv)
                before += sum(p.numel() for p in conv.parameters())
                after += sum(p.numel() for p in sep.parameters())
                setattr(resnet, conv_name, sep)
                replaced += 1
        return PassResult(program, modified=replaced > 0,
                          stats={"blocks": names, "convs_replaced": replaced, "conv_params_before": before, "conv_params_after": after},
                          replay_options={"component": o.component, "blocks": names, "convs": list(o.convs)})
