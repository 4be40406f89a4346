"""Attention and convolution rewrites (SnapGen): exact ones verified within 1e-4, lossy ones report their
divergence; every result captures, saves, reloads and exports."""

from pathlib import Path

import pytest
import torch

import snapopt
from snapopt.core import PassContext, PassManager
from snapopt.core.verify import compare, run_component
from snapopt.errors import PreconditionError
from snapopt.passes.attention_structure import FuseQKV, GroupedQueryAttention, RemoveSelfAttention
from snapopt.passes.conv_rewrites import LinearToConv, SeparableConv
from snapopt.serialization import save


def _run(tiny, shapes, *passes):
    return PassManager(list(passes), PassContext(shapes=shapes)).run(tiny)


def _roundtrip(pipe, shapes, tmp_path: Path):
    save(pipe, tmp_path / "m")
    again = snapopt.load(tmp_path / "m")
    assert compare(run_component(pipe, "unet", shapes), run_component(again, "unet", shapes)) < 1e-6
    return again


@pytest.mark.parametrize("make", [lambda: LinearToConv(), lambda: FuseQKV()], ids=["linear_to_conv", "fuse_qkv"])
def test_exact_rewrites(tiny, tiny_shapes, tmp_path, make):
    params = sum(p.numel() for p in tiny.unet.parameters())
    out, (rec,) = _run(tiny, tiny_shapes, make())
    assert rec.verification["unet"]["relative_error"] < 1e-4
    assert sum(p.numel() for p in out.unet.parameters()) == params  # same weights, new arrangement
    _roundtrip(out, tiny_shapes, tmp_path)


def test_remove_high_resolution_self_attention(tiny, tiny_shapes, tmp_path):
    out, (rec,) = _run(tiny, tiny_shapes, RemoveSelfAttention({"resolutions": [8]}))
    assert rec.stats["blocks"] == ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "up_blocks.3.attentions.0",
                                   "up_blocks.3.attentions.1", "up_blocks.3.attentions.2"]
    assert rec.stats["self_attentions_removed"] == 5
    assert 0 < rec.verification["unet"]["relative_error"] < 1  # lossy: divergence reported
    ch = rec.changes["unet"]
    assert ch["params_after"] < ch["params_before"] and ch["macs_after"] < ch["macs_before"]
    again = _roundtrip(out, tiny_shapes, tmp_path)
    assert type(again.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1).__name__ == "NullAttention"


def test_multi_query_attention(tiny, tiny_shapes, tmp_path):
    out, (rec,) = _run(tiny, tiny_shapes, GroupedQueryAttention({"resolutions": [8, 4], "kv_heads": 1}))
    attn = out.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.kv_heads == 1 and attn.to_k.out_features == attn.to_q.out_features // attn.heads
    assert rec.verification["unet"]["relative_error"] > 0
    _roundtrip(out, tiny_shapes, tmp_path)
    with pytest.raises(PreconditionError, match="kv_heads=3 does not divide the 8 heads"):
        _run(tiny, tiny_shapes, GroupedQueryAttention({"resolutions": [8], "kv_heads": 3}))


def test_grouped_query_with_all_heads_is_exact(tiny, tiny_shapes):
    # kv_heads == heads: averaging groups of one head changes nothing — a check on the processor itself
    out, (rec,) = _run(tiny, tiny_shapes, GroupedQueryAttention({"resolutions": [8], "kv_heads": 8}))
    assert rec.verification["unet"]["relative_error"] < 1e-5


def test_separable_conv_is_low_rank_initialised(tiny, tiny_shapes, tmp_path):
    conv = tiny.unet.down_blocks[0].resnets[0].conv1
    out, (rec,) = _run(tiny, tiny_shapes, SeparableConv({"blocks": ["down_blocks.0.resnets.0"]}))
    sep = out.unet.down_blocks[0].resnets[0].conv1
    assert rec.stats["convs_replaced"] == 2 and rec.stats["conv_params_after"] < rec.stats["conv_params_before"]
    x = torch.randn(1, conv.in_channels, 8, 8)
    with torch.no_grad():
        dense, approx = conv(x), sep(x)
        zero_init = sep.pointwise(torch.zeros_like(sep.depthwise(x)))
    # the SVD initialisation is much closer to the dense conv than an uninformed one
    assert (approx - dense).norm() < 0.9 * (zero_init - dense).norm()
    _roundtrip(out, tiny_shapes, tmp_path)


def test_rewritten_unet_lowers_to_onnx_and_coreml(tiny, tiny_shapes, tmp_path):
    from snapopt.lowering.coreml import lower_component
    from snapopt.lowering.onnx import export_onnx

    from snapopt.capture import block_graph
    from snapopt.devices.latency import build_table
    from snapopt.devices.registry import TARGETS

    # priced from the managers' own captures (each program is captured once: torch.export is this test's cost)
    first = PassManager([RemoveSelfAttention({"resolutions": [8]})], PassContext(shapes=tiny_shapes),
                        graphs={"unet": block_graph(tiny, "unet", tiny_shapes)})
    target = TARGETS.resolve("iphone-14-pro")
    before = build_table(first.graphs["unet"], target).total_ms
    no_self_attn, _ = first.run(tiny)
    rest = PassManager([GroupedQueryAttention({"resolutions": [4], "kv_heads": 2}), FuseQKV(), SeparableConv({"resolutions": [8]})],
                       PassContext(shapes=tiny_shapes), graphs={"unet": first.graphs["unet"]})
    out, _ = rest.run(no_self_attn)
    after = build_table(rest.graphs["unet"], target).total_ms
    # every rewritten op is priced (finite, positive). On a model this small, GQA's K/V expansion and the
    # separable convs' extra op cost more than the MACs they save, so only the removal is sure to pay off
    assert 0 < after < float("inf")
    assert build_table(first.graphs["unet"], target).total_ms < before
    onnx = export_onnx(out, "unet", tiny_shapes, tmp_path / "onnx")
    assert onnx["onnxruntime_relative_error"] < 1e-4
    cm = lower_component(out, "unet", tiny_shapes, tmp_path / "coreml")
    assert list(cm["outputs"]) == ["noise_pred"]
