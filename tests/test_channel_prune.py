"""channel_prune: exact half-width counts on SD-v1.5 (meta), working pruned tiny models end to end
(forward, ONNX, Core ML, save/reload), valid diffusers attributes, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snapopt.core import PASSES, PassContext, PassManager
from snapopt.core.verify import run_component
from snapopt.errors import UsageError
from snapopt.models import load_model
from snapopt.passes.channel_prune import ChannelPrune, dependency_groups
from snapopt.serialization import config_expresses, load, save

SD15_VAE_DECODER_HALF = 12_387_459  # AutoencoderKL(block_out_channels=(64, 128, 256, 256)).decoder


@pytest.fixture(scope="module")
def sd15():
    return load_model("arch:sd-v1.5", structure_only=True, components=["unet", "vae"])


def _prune(pipe, shapes, verify=True, **options):
    out, records = PassManager([ChannelPrune(options)], PassContext(shapes=shapes), verify=verify).run(pipe)
    return out, records[0]


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registered_through_entry_point():
    assert PASSES.get("channel_prune") is ChannelPrune


# ---- SD-v1.5, structure only ------------------------------------------------------------------------------
def test_sd15_vae_decoder_half_width_is_exact(sd15):
    res = ChannelPrune({"component": "vae_decoder", "ratio": 0.5}).run(sd15.clone(["vae_decoder"]), PassContext())
    assert _params(res.program.vae.decoder) == SD15_VAE_DECODER_HALF
    assert res.stats["decoder_block_out_channels"] == [64, 128, 256, 256]
    assert res.stats["criterion"] == "index"  # meta weights: deterministic fallback
    assert all(g["achieved"] == 0.5 for g in res.stats["groups"])
    dec = res.program.vae.decoder
    assert dec.conv_in.in_channels == 4 and dec.conv_out.out_channels == 3  # the interface is never pruned
    assert dec.mid_block.attentions[0].heads == 1 and dec.mid_block.attentions[0].inner_dim == 256


@pytest.mark.parametrize("ratio, params", [(0.25, 486_955_396), (0.5, 219_891_684)])
def test_sd15_unet_hits_ratio_structurally(sd15, ratio, params):
    res = ChannelPrune({"ratio": ratio}).run(sd15.clone(["unet"]), PassContext())
    assert res.stats["requested_ratio"] == res.stats["achieved_ratio"] == ratio
    assert res.stats["params_after"] == _params(res.program.unet) == params
    unet = res.program.unet
    assert unet.conv_in.in_channels == 4 and unet.conv_out.out_channels == 4
    assert unet.time_embedding.linear_1.in_features == 320  # sinusoidal features are an input: frozen
    for m in unet.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_groups == 32 and m.num_channels % 32 == 0
    assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 8


def test_dependency_groups_split_skip_concatenation(tiny):
    dg = dependency_groups(tiny, "unet")
    assert dg.unhandled == {}
    conv1 = "up_blocks.1.resnets.0.conv1.weight"
    owners = [g for g in dg.groups if (conv1, 1) in g.members]
    # the up-block ResNet's input is the previous stage's output and a skip: two groups, 64 channels each
    assert sorted(g.size for g in owners) == [64, 64]
    assert all(g.multiple == 8 for g in owners)  # their concatenation's GroupNorm keeps 8 groups
    heads = dg.group("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q:out")
    assert (heads.structure, heads.n_blocks, heads.size) == ("heads", 8, 64)
    assert {("conv_out.weight", 0)} & {k for g in dg.groups for k in g.members} == set()


# ---- tiny, with weights -------------------------------------------------------------------------------------
def test_tiny_vae_decoder_with_encoder_round_trips_through_diffusers(tiny, tiny_shapes, tmp_path):
    from snapopt.lowering.coreml import lower_component

    out, rec = _prune(tiny, tiny_shapes, component="vae_decoder", ratio=0.5, with_encoder=True)
    assert tuple(out.vae.config.block_out_channels) == (4, 8, 8, 8)
    assert config_expresses(out.vae) and rec.stats["vae_config_expresses"]
    image = run_component(out, "vae_decoder", tiny_shapes).tensors[0]
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    manifest = save(out, tmp_path / "model")
    assert manifest["components"]["vae"]["format"] == "diffusers"
    again = run_component(load(tmp_path / "model"), "vae_decoder", tiny_shapes).tensors[0]
    assert torch.equal(image, again)
    info = lower_component(out, "vae_decoder", tiny_shapes, tmp_path / "coreml")
    assert info["outputs"]["image"]["shape"] == [1, 3, 64, 64]


def test_tiny_unet_half_runs_exports_and_lowers(tiny, tiny_shapes, tmp_path):
    from snapopt.lowering.coreml import lower_component
    from snapopt.lowering.onnx import export_onnx

    before = _params(tiny.unet)
    res = ChannelPrune({"ratio": 0.5}).run(tiny.clone(["unet"]), PassContext(shapes=tiny_shapes))
    out = res.program
    assert res.stats["achieved_ratio"] == 0.5 and _params(out.unet) == 828_500 < before
    unet = out.unet
    down = unet.down_blocks[0].downsamplers[0]
    assert down.channels == down.conv.in_channels == 16  # Torch-Pruning leaves this stale
    up = unet.up_blocks[0].upsamplers[0]
    assert up.channels == up.conv.in_channels == 32
    attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert (attn.heads, attn.inner_dim, attn.scale) == (8, 32, 4 ** -0.5)
    r = unet.up_blocks[1].resnets[0]
    assert (r.in_channels, r.out_channels) == (r.conv1.in_channels, r.conv2.out_channels) == (64, 32)
    y = run_component(out, "unet", tiny_shapes).tensors[0]
    assert y.shape == (2, 4, 8, 8) and torch.isfinite(y).all()
    onnx_info = export_onnx(out, "unet", tiny_shapes, tmp_path / "onnx", simplify=False)
    assert onnx_info["onnxruntime_relative_error"] < 1e-3
    info = lower_component(out, "unet", tiny_shapes, tmp_path / "coreml")
    assert info["outputs"]["noise_pred"]["shape"] == [2, 4, 8, 8]


def test_tiny_unet_quarter_taylor_saves_and_replays(tiny, tiny_shapes, tmp_path):
    out, rec = _prune(tiny, tiny_shapes, verify=False, ratio=0.25, criterion="taylor")  # checked below instead
    assert rec.stats["criterion"] == "taylor" and rec.stats["achieved_ratio"] == 0.25
    edits = getattr(out.unet, "_snapopt_edits")
    assert edits[-1]["options"]["keep"]  # the resolved structure is what gets logged for replay
    y = run_component(out, "unet", tiny_shapes).tensors[0]
    assert y.shape == (2, 4, 8, 8) and torch.isfinite(y).all()
    manifest = save(out, tmp_path / "model")
    # sinusoid width is tied to block_out_channels[0], so diffusers cannot express it: a custom component
    assert manifest["components"]["unet"]["format"] == "structured"
    again = load(tmp_path / "model")
    assert {k: v.shape for k, v in again.unet.state_dict().items()} == {k: v.shape for k, v in out.unet.state_dict().items()}
    # rebuilt from its saved structure rather than the edited module: equal up to float op order
    torch.testing.assert_close(run_component(again, "unet", tiny_shapes).tensors[0], y, rtol=0, atol=1e-5)


def test_whole_heads_and_per_module(tiny, tiny_shapes):
    res = ChannelPrune({"ratio": 0.0, "per_module": {"down_blocks.1": 0.5}, "heads": "whole"}).run(
        tiny.clone(["unet"]), PassContext(shapes=tiny_shapes))
    pruned = {g["group"] for g in res.stats["groups"] if g["kept"] < g["channels"]}
    # only channels down_blocks.1 produces; not the time embedding every ResNet reads
    assert pruned and all(g.startswith("down_blocks.1.") for g in pruned)
    attn = res.program.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert (attn.heads, attn.inner_dim, attn.scale) == (4, 32, 8 ** -0.5)  # head dim unchanged
    assert res.program.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 8
    y = run_component(res.program, "unet", tiny_shapes).tensors[0]
    assert torch.isfinite(y).all()


def test_bad_options_fail_in_one_line():
    pipe = load_model("arch:tiny", structure_only=True, components=["unet"])
    with pytest.raises(UsageError, match=r"^channel_prune: component 'unet' has no module 'down_blocks.9' \(per_module\)$"):
        ChannelPrune({"per_module": {"down_blocks.9": 0.5}}).run(pipe, PassContext())
    vae = load_model("arch:tiny", structure_only=True, components=["vae"])  # captures in 0.5 s
    with pytest.raises(UsageError, match="keep names group 'nope:out'"):
        ChannelPrune({"component": "vae_decoder", "keep": {"nope:out": "0-3"}}).run(vae, PassContext())
    with pytest.raises(Exception, match="less than 1"):
        ChannelPrune({"ratio": 1.0})
    with pytest.raises(Exception, match="per_module ratio for 'down_blocks.0' is 1.5"):
        ChannelPrune({"per_module": {"down_blocks.0": 1.5}})
    with pytest.raises(Exception, match="'unet' or 'vae_decoder', not 'text_encoder'"):
        ChannelPrune({"component": "text_encoder"})


def test_whole_groupnorm_groups_keep_statistics_exact_and_reload(tiny, tiny_shapes, tmp_path):
    """groups: whole drops whole GroupNorm groups and lowers num_groups, so a kept group normalises exactly the
    channels it did: the first norm after conv_in (whose input the latent alone decides) is unchanged on the
    kept channels. Keeping num_groups instead (groups: dim) regroups them and changes that norm's output."""
    teacher = tiny.clone(["vae_decoder"])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def norm_out(pipe):
        seen = {}
        norm = pipe.vae.decoder.mid_block.resnets[0].norm1
        h = norm.register_forward_hook(lambda m, i, o: seen.setdefault("y", o.detach()))
        with torch.no_grad():
            image = pipe.vae.decoder(z)
        h.remove()
        return seen["y"], image

    ref, _ = norm_out(teacher)
    outs = {}
    for mode in ("whole", "dim"):
        res = ChannelPrune({"component": "vae_decoder", "ratio": 0.5, "groups": mode}).run(tiny.clone(["vae_decoder"]), PassContext())
        w_new, w_old = res.program.vae.decoder.conv_in.weight, teacher.vae.decoder.conv_in.weight
        kept = [next(j for j in range(w_old.shape[0]) if torch.equal(w_old[j], w_new[i])) for i in range(w_new.shape[0])]
        y, image = norm_out(res.program)
        outs[mode] = (res, kept, y, image)
    res, kept, y, image = outs["whole"]
    norm = res.program.vae.decoder.mid_block.resnets[0].norm1
    assert len(kept) == 8 and norm.num_groups == 2 == teacher.vae.decoder.mid_block.resnets[0].norm1.num_groups // 2
    torch.testing.assert_close(y, ref[:, kept], rtol=0, atol=1e-6)
    _, kept_dim, y_dim, _ = outs["dim"]
    assert not torch.allclose(y_dim, ref[:, kept_dim], atol=1e-3)  # the same count kept per group, regrouped
    groups = {m.num_groups for m in res.program.vae.decoder.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {2}  # every decoder norm (the attention's too) lost half its groups
    save(res.program, tmp_path / "model")
    again = load(tmp_path / "model")
    assert {m.num_groups for m in again.vae.decoder.modules() if isinstance(m, nn.GroupNorm)} == {2}
    with torch.no_grad():
        assert torch.equal(again.vae.decoder(z), image)


def test_prunes_after_self_attention_was_removed(tiny, tiny_shapes):
    """A transformer block whose attn1 is remove_self_attention's NullAttention takes its width from attn2."""
    from snapopt.passes.attention_structure import RemoveSelfAttention

    ctx = PassContext(shapes=tiny_shapes)
    passes = [RemoveSelfAttention({"resolutions": [8]}), ChannelPrune({"component": "unet", "ratio": 0.5})]
    out, records = PassManager(passes, ctx, verify=False).run(tiny)
    assert [r.modified for r in records] == [True, True]
    block = next(m for m in out.unet.modules() if type(m).__name__ == "BasicTransformerBlock" and not hasattr(m.attn1, "heads"))
    assert block.dim == block.attn2.query_dim and block.num_attention_heads == block.attn2.heads
    y = run_component(out, "unet", tiny_shapes).tensors[0]
    assert y.shape == (2, 4, 8, 8) and torch.isfinite(y).all()
