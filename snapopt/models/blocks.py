"""Modules that stand in for blocks a pass removed."""

from __future__ import annotations

from torch import nn


class SkippedBlock(nn.Module):
    """A removed block: passes its input through, holds no parameters.

    Used where a block cannot leave its container without breaking the container's wiring (an attention
    paired with a surviving ResNet in a diffusers down block). ``kind`` and ``replaced`` record what it was,
    so the IR, reports and the architecture file can say so."""

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
        import torch

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
        import torch

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
        import torch

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
