"""The ONNX export's fast path writes the same file: onnxscript's optimizer without its quadratic multi-output rule,
and an ``ExportedProgram`` captured once for Core ML and ONNX, give the bytes the default export gives."""

from __future__ import annotations

import torch

from snapopt.lowering.interfaces import Shapes


def _micro_split_einsum_unet(cross_dim: int):
    """A micro UNet in Apple's split-einsum attention: per-head Slices, the graph the slow rule was quadratic in."""
    from diffusers import UNet2DConditionModel

    from snapopt.models.attention import set_attention

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
                                attention_head_dim=2, norm_num_groups=4).eval()
    assert set_attention(unet, "split_einsum") > 0
    return unet


def test_fast_optimizer_and_shared_capture_write_the_default_exports_bytes(tiny_pipe):
    import onnxsim

    from snapopt.capture.export import export_component
    from snapopt.lowering.apple import apple_io
    from snapopt.lowering.onnx import to_onnx

    pipe = tiny_pipe.clone()
    pipe.unet = _micro_split_einsum_unet(pipe.text_encoder.config.hidden_size)
    io = apple_io(pipe, "unet", Shapes(resolution=pipe.resolution, batch=2))
    n_slices = sum(1 for n in torch.export.export(io.module, io.example_inputs, strict=False).graph.nodes
                   if "slice" in str(n.target))
    assert n_slices >= 4  # the per-head slices are there to be (not) rewritten

    def final(module, fast):
        proto = to_onnx(module, io.example_inputs, io.input_names, io.output_names, fast=fast).model_proto
        return onnxsim.simplify(proto)[0].SerializeToString()

    default = final(io.module, fast=False)
    assert final(io.module, fast=True) == default
    assert final(export_component(io), fast=True) == default


def test_fast_rules_restore_onnxscripts_rule_set():
    from onnxscript import rewriter

    from snapopt.lowering.onnx import _single_output_rules

    before = rewriter._DEFAULT_REWRITE_RULES
    with _single_output_rules():
        inside = rewriter._DEFAULT_REWRITE_RULES
        assert 0 < len(inside) < len(before)
        assert all(r._target_pattern.has_single_output_node for r in inside)
    assert rewriter._DEFAULT_REWRITE_RULES is before
