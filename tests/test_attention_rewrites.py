"""Exact attention rewrites match the original outputs within 1e-4, and the manager checks it."""

import pytest

from snapopt.core import PassContext, PassManager
from snapopt.core.verify import compare, run_component
from snapopt.models.attention import attention_kinds
from snapopt.passes.attention_rewrites import AttentionOriginal, AttentionSDPA, AttentionSplitEinsum


@pytest.mark.parametrize("cls", [AttentionSplitEinsum, AttentionOriginal, AttentionSDPA])
@pytest.mark.parametrize("component", ["unet", "vae_decoder"])
def test_rewrite_is_exact(tiny, tiny_shapes, cls, component):
    reference = run_component(tiny, component, tiny_shapes)
    out, records = PassManager([cls({"component": component})], PassContext(shapes=tiny_shapes)).run(tiny)
    err = records[0].verification[component]["relative_error"]
    assert err < 1e-4
    assert compare(reference, run_component(out, component, tiny_shapes)) == pytest.approx(err, abs=1e-9)
    root = out.unet if component == "unet" else out.vae.decoder
    assert set(attention_kinds(root).values()) == {cls.kind}


def test_split_einsum_capture_has_per_head_einsums(tiny, tiny_shapes):
    from snapopt.capture import block_graph

    out, _ = PassManager([AttentionSplitEinsum()], PassContext(shapes=tiny_shapes)).run(tiny)
    g = block_graph(out, "unet", tiny_shapes)
    ops = [o.op for o in g.ops("down_blocks.0.attentions.0")]
    heads = out.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads
    assert ops.count("einsum") == 2 * 2 * heads  # QKᵀ and AV, per head, self- and cross-attention
    assert "scaled_dot_product_attention" not in ops
