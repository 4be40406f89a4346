"""Core AI compression through coreai-opt: each scheme writes a smaller ``.aimodel`` than fp16 that executes in
coreai.runtime close to coreai-opt's torch simulation, the plan follows the recipe, and a scheme Core AI cannot
lower is one UsageError line."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from snapopt.lowering.interfaces import Shapes

pytest.importorskip("coreai_torch")
pytest.importorskip("coreai_opt")


def _small_unet(cross_dim: int):
    """Channels wide enough that weights, not per-op overhead, dominate the asset (so sizes compare), still seconds to convert."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
                                attention_head_dim=8, norm_num_groups=8).eval()


@pytest.fixture(scope="module")
def small(tiny_pipe):
    pipe = tiny_pipe.clone()
    pipe.unet = _small_unet(pipe.text_encoder.config.hidden_size)
    return pipe


@pytest.fixture(scope="module")
def fp16_unet(small, tmp_path_factory):
    from snapopt.lowering import coreai

    return coreai.lower_component(small, "unet", Shapes(resolution=small.resolution, batch=2), tmp_path_factory.mktemp("fp16"),
                                  compression={"scheme": "fp16", "bits": 16})


@pytest.mark.parametrize("plan, psnr_min", [
    ({"scheme": "palettize", "bits": 4, "group_size": 0}, 20.0),
    ({"scheme": "int8", "bits": 8}, 40.0),
    ({"scheme": "int4", "bits": 4}, 20.0),
    ({"scheme": "w8a8", "bits": 8}, 30.0),
])
def test_compressed_unet_is_smaller_than_fp16_and_runs_as_simulated(small, fp16_unet, tmp_path, plan, psnr_min):
    from snapopt.lowering import coreai

    before = [p.detach().clone() for p in small.unet.parameters()]
    info = coreai.lower_component(small, "unet", Shapes(resolution=small.resolution, batch=2), tmp_path, compression=plan)
    assert (tmp_path / "Unet.aimodel").is_dir()
    c = info["compression"]
    assert c["scheme"] == plan["scheme"] and c["layers"] > 0 and c["layers_compressed"] == c["layers"], c
    assert c["weight_bits"] <= c["measured_bits"] < c["weight_bits"] + 1.5, c  # LUT / scale overhead
    assert info["bytes"] < 0.75 * fp16_unet["bytes"], (info["bytes"], fp16_unet["bytes"])
    assert info["outputs"] == ["noise_pred"] and info["inputs"]["sample"]["dtype"] == "float32"
    # the runtime executes the compressed ops as coreai-opt simulates them, fp16 compute aside; W8A8's int8
    # activation codes flip between fp16 and fp32 activations, so there the runtime is checked to be as close to
    # fp32 torch as the simulation is
    if plan["scheme"] == "w8a8":
        assert info["coreai_runtime_relative_error"] < 1.5 * info["simulation_relative_error"] + 1e-3, info
    else:
        assert info["coreai_runtime_vs_simulation_relative_error"] < 0.01, info
    assert psnr_min < info["coreai_runtime_psnr_db"] < 80, info
    assert all(torch.equal(a, b) for a, b in zip(before, small.unet.parameters())), "the pipeline's UNet was modified"


def test_fp16_asset_is_half_the_fp32_one_and_close(small, fp16_unet, tmp_path):
    from snapopt.lowering import coreai

    fp32 = coreai.lower_component(small, "unet", Shapes(resolution=small.resolution, batch=2), tmp_path)
    assert 0.4 < fp16_unet["bytes"] / fp32["bytes"] < 0.6
    assert fp32["coreai_runtime_relative_error"] < 1e-5 < fp16_unet["coreai_runtime_relative_error"] < 1e-2


def _lower(pipe, folder, **export):
    from snapopt.lowering.export import lower_exports
    from snapopt.recipe import validate_recipe

    resolved = validate_recipe({"name": "t", "model": "arch:tiny", "targets": export.pop("targets", ["iphone-14-pro"]),
                                "export": {"coreml": False, "onnx": False, "coreai": True, **export}})
    return lower_exports(pipe, resolved, Shapes(resolution=pipe.resolution, batch=2), folder, lambda name: contextlib.nullcontext())


def test_export_compresses_every_component_and_reports_rows(small, tmp_path):
    result = _lower(small, tmp_path / "exports", components=["vae_decoder", "text_encoder"],
                    compression={"scheme": "palettize", "bits": 6, "group_size": 64})
    assert result["coreai_compression"]["scheme"] == "palettize_g64" and result["coreai_compression"]["bits"] == 6
    got = {e["package"]: e for e in result["coreai"]}
    assert set(got) == {"VAEDecoder", "TextEncoder"}
    te = got["TextEncoder"]["compression"]  # mlp.fc2 (32 outputs) x 2: 64 does not divide, coreai-opt keeps them fp16
    assert "2 layers whose output channels 64 does not divide stay fp16" in te["description"]
    assert te["layers_compressed"] == te["layers"] - 2 and te["weight_bits"] == pytest.approx((64 * 32 * 2 * 6 + 32 * 64 * 2 * 16) / (4 * 2048))
    assert "2 embedding tables stay fp16" in got["TextEncoder"]["compression"]["description"]
    for e in got.values():
        c = e["compression"]
        assert np.isfinite(e["coreai_runtime_psnr_db"])
        assert 0 <= c["layers_compressed"] <= c["layers"], c
        assert e["coreai_runtime_vs_simulation_relative_error"] < 0.02, e
    lines = next(s["lines"] for s in result["sections"] if s["title"] == "Core AI")
    assert sum(1 for line in lines if line.startswith("| `exports/coreai/")) == 2


def test_w8a8_falls_back_to_int8_where_the_chip_has_no_int8_compute(small, tmp_path):
    result = _lower(small, tmp_path / "exports", components=["text_encoder"], compression={"scheme": "w8a8"})
    assert result["coreai_compression"]["scheme"] == "int8" and "A16" in result["coreai_compression"]["refused"]
    assert result["coreai"][0]["compression"]["scheme"] == "int8"


def test_default_export_stays_fp32_and_uncompressed(small, tmp_path):
    result = _lower(small, tmp_path / "exports", components=["text_encoder"])
    assert "coreai_compression" not in result and "compression" not in result["coreai"][0]
    assert result["coreai"][0]["coreai_runtime_relative_error"] < 1e-4


def test_scheme_core_ai_cannot_lower_is_one_usage_line(small, tmp_path):
    from snapopt.errors import UsageError

    with pytest.raises(UsageError, match=r"Core AI palettizes at 1, 2, 3, 4, 6, 8 bits.*not 5$") as exc:
        _lower(small, tmp_path / "exports", components=["unet"], weight_bits=5)
    assert "\n" not in str(exc.value) and exc.value.exit_code == 2
    assert not (tmp_path / "exports" / "coreai").exists()


def test_check_plan_and_component_plan():
    from snapopt.errors import UsageError
    from snapopt.lowering.coreai_compress import check_plan, component_plan

    with pytest.raises(UsageError, match="no Core AI lowering"):
        check_plan({"scheme": "sparse", "bits": 4})
    with pytest.raises(UsageError, match=r"mixed recipe uses \[5\] bits"):
        check_plan({"scheme": "mixed", "bits": 4.5, "recipe": {"a": 5, "b": 4}})
    assert component_plan({"scheme": "w8a8", "bits": 8}, "text_encoder")["scheme"] == "int8"
    assert component_plan({"scheme": "mixed", "bits": 4.5}, "vae_decoder") == {"scheme": "palettize", "bits": 6, "group_size": 0}


def test_mixed_recipe_palettizes_each_layer_at_its_width(small, fp16_unet, tmp_path):
    from snapopt.lowering import coreai
    from snapopt.lowering.compression import quantizable

    layers = [n for n, _ in quantizable(small.unet)]
    recipe = {n: (4 if i % 2 else 8) for i, n in enumerate(layers)}
    recipe[layers[0]] = 16  # kept fp16
    plan = {"scheme": "mixed", "bits": 6.0, "recipe": recipe}
    info = coreai.lower_component(small, "unet", Shapes(resolution=small.resolution, batch=2), tmp_path, compression=plan)
    sizes = dict((n, m.weight.numel()) for n, m in quantizable(small.unet))
    expected = sum(recipe[n] * k for n, k in sizes.items()) / sum(sizes.values())
    assert info["compression"]["weight_bits"] == pytest.approx(expected, abs=1e-3)
    assert "{4: " in info["compression"]["description"] and "8: " in info["compression"]["description"]
    assert info["bytes"] < 0.75 * fp16_unet["bytes"]
    assert info["coreai_runtime_vs_simulation_relative_error"] < 0.01, info
