"""Exports Apple's Swift pipeline can run: dtypes, 8-channel encoder, folded latent scale, Swift tokenization,
``snapopt check apple`` (passes on a real export, fails naming the problem), UNet chunking."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from snapopt.lowering.interfaces import Shapes


def _micro_unet(cross_dim: int):
    """Two stages with and without cross-attention: the smallest UNet with SD's block kinds (fast to convert)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
                                attention_head_dim=2, norm_num_groups=4).eval()


@pytest.fixture(scope="module")
def micro(tiny_pipe):
    """arch:tiny's VAE, text encoder and tokenizer with a micro UNet and the zoo's kind of latent scale (not 0.18215)."""
    pipe = tiny_pipe.clone()
    pipe.unet = _micro_unet(pipe.text_encoder.config.hidden_size)
    pipe.vae.config.scaling_factor = 0.6072
    return pipe


def _lower(pipe, folder, **export):
    from snapopt.lowering.export import lower_exports
    from snapopt.recipe import validate_recipe

    resolved = validate_recipe({"name": "t", "model": "arch:tiny", "targets": ["iphone-14-pro"],
                                "export": {"components": ["unet", "vae_decoder", "vae_encoder", "text_encoder"], **export}})
    return lower_exports(pipe, resolved, Shapes(resolution=pipe.resolution, batch=2), folder, lambda name: contextlib.nullcontext())


@pytest.fixture(scope="module")
def export(micro, tmp_path_factory):
    folder = tmp_path_factory.mktemp("apple") / "exports"
    return folder, _lower(micro, folder, onnx=False)


def test_export_has_apples_dtypes_channels_and_files(export):
    folder, result = export
    cm = {e["package"]: e for e in result["coreml"]}
    assert cm["Unet"]["inputs"]["sample"]["dtype"] == "float16"
    assert cm["Unet"]["outputs"] == {"noise_pred": {"shape": [2, 4, 8, 8], "dtype": "float32"}}
    assert cm["VAEDecoder"]["outputs"]["image"]["dtype"] == "float32"
    assert cm["VAEEncoder"]["outputs"]["latent"] == {"shape": [1, 8, 8, 8], "dtype": "float32"}
    assert cm["TextEncoder"]["inputs"]["input_ids"] == {"shape": [1, 77], "dtype": "float32"}
    assert {o["dtype"] for o in cm["TextEncoder"]["outputs"].values()} == {"float32"}
    res = folder / "coreml"
    for f in ["Unet.mlpackage", "VAEDecoder.mlpackage", "VAEEncoder.mlpackage", "TextEncoder.mlpackage", "vocab.json",
              "merges.txt", "snapopt-apple.json", "README.txt"]:
        assert (res / f).exists(), f
    assert "xcrun coremlcompiler compile" in (res / "README.txt").read_text()
    meta = json.loads((res / "snapopt-apple.json").read_text())
    assert meta["app"]["scale_folded"] and meta["app"]["decoderScaleFactor"] == 0.18215
    assert meta["app"]["model_scale_factor"] == pytest.approx(0.6072)
    assert meta["app"]["scheduler"] == "dpmpp"
    assert result["apple_check"]["passed"], result["apple_check"]["problems"]
    titles = [s["title"] for s in result["sections"]]
    assert "Apple Swift pipeline" in titles


def test_check_apple_cli_passes_on_the_export(export):
    from snapopt.lowering.cli import check_app

    folder, _ = export
    out = CliRunner().invoke(check_app, ["apple", str(folder.parent)])  # the run folder works too
    assert out.exit_code == 0, out.output
    assert "conforms" in out.output


def _bare_convert(module, example, in_name, out_name, path):
    """A conversion the obvious way, with coremltools' default fp16 outputs (what snapopt emitted before)."""
    import coremltools as ct

    ep = torch.export.export(module.eval(), (example,), strict=False).run_decompositions({})
    model = ct.convert(ep, inputs=[ct.TensorType(name=in_name, shape=tuple(example.shape), dtype=np.float16)],
                       outputs=[ct.TensorType(name=out_name, dtype=np.float16)], convert_to="mlprogram",
                       minimum_deployment_target=ct.target.iOS17, skip_model_load=True)
    shutil.rmtree(path)
    model.save(str(path))


def test_check_apple_names_fp16_outputs_and_a_4_channel_encoder(export, micro, tmp_path):
    from snapopt.errors import LoweringError
    from snapopt.lowering.apple_check import check_apple
    from snapopt.lowering.cli import check_app

    folder, _ = export
    bad = tmp_path / "coreml"
    shutil.copytree(folder / "coreml", bad)
    _bare_convert(micro.component("vae_decoder"), torch.randn(1, 4, 8, 8), "z", "image", bad / "VAEDecoder.mlpackage")
    _bare_convert(micro.component("vae_encoder"), torch.randn(1, 3, 64, 64), "x", "latent", bad / "VAEEncoder.mlpackage")
    problems, _ = check_apple(bad)
    assert any(p.startswith("VAEDecoder: output 'image' is float16") for p in problems), problems
    assert any(p.startswith("VAEEncoder: output 'latent' has 4 channels") for p in problems), problems
    out = CliRunner().invoke(check_app, ["apple", str(bad)])
    assert out.exit_code != 0 and isinstance(out.exception, LoweringError)
    assert "VAEDecoder: output 'image' is float16" in str(out.exception)


def test_check_apple_catches_missing_files_and_bad_tokenizer(export, tmp_path):
    from snapopt.lowering.apple_check import check_apple

    folder, _ = export
    bad = tmp_path / "coreml"
    shutil.copytree(folder / "coreml", bad)
    shutil.rmtree(bad / "TextEncoder.mlpackage")
    (bad / "merges.txt").write_text("#version: 0.2\na b c\n")
    problems, _ = check_apple(bad)
    assert any(p.startswith("TextEncoder.mlpackage/.mlmodelc missing") for p in problems), problems
    assert any("merges.txt line 2" in p for p in problems), problems


def test_latent_scale_is_folded_for_swifts_default(micro):
    """Swift decodes ``latents / 0.18215`` and encodes ``sample(mean, std) * 0.18215``; the exported halves must turn
    that into the model's ``latents / s`` and ``sample * s``."""
    from snapopt.lowering.apple import SWIFT_SCALE_FACTOR, apple_io

    s = micro.vae.config.scaling_factor
    shapes = Shapes(resolution=micro.resolution)
    latents = torch.randn(1, 4, 8, 8)
    dec = apple_io(micro, "vae_decoder", shapes).module
    with torch.no_grad():
        want = micro.vae.decode(latents / s).sample
        got = dec(latents / SWIFT_SCALE_FACTOR)
    assert torch.allclose(got, want, atol=1e-5)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        dist = micro.vae.encode(x).latent_dist
        out = apple_io(micro, "vae_encoder", shapes).module(x)
    mean, logvar = out[:, :4], out[:, 4:]
    assert torch.allclose(mean * SWIFT_SCALE_FACTOR, dist.mean * s, atol=1e-5)
    assert torch.allclose((0.5 * logvar).exp() * SWIFT_SCALE_FACTOR, dist.std * s, rtol=1e-4)


def test_float_ids_are_exact_and_not_narrowed_to_int16(tiny_pipe, tmp_path):
    """Ids travel as float32 (exact below 2^24); coremltools would cast them to int16 for iOS 17, which wraps CLIP's
    49407 — the text encoder's program must keep int32."""
    from snapopt.lowering.apple import apple_io
    from snapopt.lowering.apple_check import _ids_through_int16
    from snapopt.lowering.coreml import lower_component

    io = apple_io(tiny_pipe, "text_encoder", Shapes(resolution=64))
    ids = torch.randint(0, 514, (1, 77))
    with torch.no_grad():
        a = io.module(ids.float())[0]
        b = tiny_pipe.text_encoder(ids).last_hidden_state
    assert torch.equal(a, b)
    from snapopt.devices.registry import TARGETS

    info = lower_component(tiny_pipe, "text_encoder", Shapes(resolution=64), tmp_path,
                           deployment_target=TARGETS.resolve("iphone-15-pro").coreml_deployment_target())
    assert not _ids_through_int16(tmp_path / "TextEncoder.mlpackage"), info


# ---- Swift tokenizer --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from snapopt.zoo.vocabulary import write_tokenizer_files

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder)


def test_swift_bpe_matches_clip_on_plain_words(zoo_tokenizer, tmp_path):
    from snapopt.lowering.swift_tokenizer import SwiftBPE, reference_ids
    from snapopt.models.tokenizer import write_bpe_files

    write_bpe_files(zoo_tokenizer, tmp_path)
    bpe = SwiftBPE.from_folder(tmp_path)
    text = "a small red circle at the left on a white background"
    assert bpe.ids(text) == reference_ids(zoo_tokenizer, text)
    # The comma glued to a word is where Swift's whitespace split differs from CLIP's.
    text = "a small red circle, a large blue square and a small green triangle in a row on a gray background"
    assert bpe.ids(text) != reference_ids(zoo_tokenizer, text)


def test_zoo_captions_tokenize_identically_in_swift_after_the_patch(zoo_tokenizer, tmp_path):
    from snapopt.lowering.swift_tokenizer import write_swift_tokenizer
    from snapopt.zoo import shapes

    captions = list(dict.fromkeys(shapes.sample_scenes(512, seed=0).captions()))
    assert any("," in c for c in captions)
    report = write_swift_tokenizer(zoo_tokenizer, tmp_path, captions)
    assert report["patched"] and report["swift_agrees_raw"], report
    assert report["mismatches_raw"] == 0 and report["prompt_rule"] == "none"
    # Captions the patch never saw (held-out combinations) agree too.
    from snapopt.lowering.swift_tokenizer import SwiftBPE, reference_ids

    bpe = SwiftBPE.from_folder(tmp_path)
    for c in shapes.heldout_prompts(32).captions():
        assert bpe.ids(c) == reference_ids(zoo_tokenizer, c), c


def test_char_tokenizer_needs_the_prompt_rule(tiny_pipe, tmp_path):
    from snapopt.lowering.swift_tokenizer import GENERIC_PROBES, write_swift_tokenizer

    report = write_swift_tokenizer(tiny_pipe.tokenizer, tmp_path, GENERIC_PROBES)
    assert not report["swift_agrees_raw"] and report["mismatches_with_rule"] == 0


# ---- chunking --------------------------------------------------------------------------------------------------------
def test_chunks_compose_to_the_unet_at_every_cut(tiny_pipe, tiny_shapes):
    from snapopt.lowering.chunking import _stages, compose_error, plan_chunks

    for cut in range(1, len(_stages(tiny_pipe.unet))):
        plan = plan_chunks(tiny_pipe, tiny_shapes, cut=cut)
        assert compose_error(tiny_pipe, plan, tiny_shapes) < 1e-6, cut
    plan = plan_chunks(tiny_pipe, tiny_shapes)
    assert abs(plan.params[0] - plan.params[1]) < 0.5 * sum(plan.params)
    pruned = tiny_pipe.clone(["unet"])
    pruned.unet.mid_block = None  # BK-SDM-Small/Tiny have none (Apple's converter rejects them)
    for cut in range(1, len(_stages(pruned.unet))):
        assert compose_error(pruned, plan_chunks(pruned, tiny_shapes, cut=cut), tiny_shapes) < 1e-6, cut


def test_chunked_export_passes_check_and_composes_in_onnxruntime(micro, tmp_path):
    result = _lower(micro, tmp_path / "exports", chunk_unet=True, components=["unet", "vae_decoder", "text_encoder"])
    names = [e["package"] for e in result["coreml"]]
    assert "UnetChunk1" in names and "UnetChunk2" in names and "Unet" not in names
    assert result["apple_check"]["passed"], result["apple_check"]["problems"]
    ch = result["unet_chunking"]
    assert ch["chunked"] and ch["torch_compose_relative_error"] < 1e-6
    assert ch["onnxruntime_compose_relative_error"] < 1e-4
    c1 = next(e for e in result["coreml"] if e["package"] == "UnetChunk1")
    c2 = next(e for e in result["coreml"] if e["package"] == "UnetChunk2")
    assert set(c1["outputs"]) <= set(c2["inputs"]) and list(c2["outputs"]) == ["noise_pred"]


def test_auto_chunking_follows_the_targets_limit(tiny_pipe):
    from snapopt.lowering.export import should_chunk
    from snapopt.lowering.spec import ExportSpec
    from snapopt.recipe import validate_recipe

    t = validate_recipe({"name": "t", "model": "arch:tiny", "targets": ["iphone-12-pro-max"]}).targets
    assert should_chunk(ExportSpec(), tiny_pipe.unet, 16, t)[0] is False
    big = torch.nn.Linear(1, 1)
    big.weight = torch.nn.Parameter(torch.empty(600_000_000, 1, device="meta"))  # 1.2 GB at fp16, like SD-v1.5's 1.72
    assert should_chunk(ExportSpec(), big, 16, t)[0] is True
    assert should_chunk(ExportSpec(), big, 6, t)[0] is False  # 450 MB palettized
    assert should_chunk(ExportSpec(chunk_unet=False), big, 16, t)[0] is False


def test_export_spec_rejects_bad_bits():
    from snapopt.errors import RecipeError
    from snapopt.recipe import validate_recipe

    with pytest.raises(RecipeError, match="weight_bits"):
        validate_recipe({"name": "t", "model": "arch:tiny", "export": {"weight_bits": 12}})


# ---- Core AI ---------------------------------------------------------------------------------------------------------
def test_coreai_export_runs_in_coreai_runtime(micro, tmp_path):
    pytest.importorskip("coreai_torch")
    result = _lower(micro, tmp_path / "exports", coreml=False, onnx=False, coreai=True,
                    components=["unet", "vae_decoder", "vae_encoder", "text_encoder"])
    got = {e["package"]: e for e in result["coreai"]}
    assert set(got) == {"Unet", "VAEDecoder", "VAEEncoder", "TextEncoder"}
    for e in got.values():
        assert (tmp_path / e["file"]).is_dir() and e["file"].endswith(".aimodel")
        assert e["coreai_runtime_relative_error"] < 1e-4, e
    assert got["TextEncoder"]["inputs"]["input_ids"]["dtype"] == "float32"
    assert got["Unet"]["outputs"] == ["noise_pred"]
    assert any(s["title"] == "Core AI" for s in result["sections"])


# ---- compression -----------------------------------------------------------------------------------------------------
def test_compression_schemes_shrink_the_package_and_keep_the_interface(tiny_pipe, tmp_path):
    from snapopt.lowering.coreml import lower_component
    from snapopt.lowering.export import compression_plan
    from snapopt.lowering.spec import ExportSpec

    shapes = Shapes(resolution=64)
    fp16 = lower_component(tiny_pipe, "vae_decoder", shapes, tmp_path / "fp16")
    int8 = lower_component(tiny_pipe, "vae_decoder", shapes, tmp_path / "int8",
                           compression=compression_plan(ExportSpec(compression="int8"), []))
    assert int8["bytes"] < 0.75 * fp16["bytes"]
    assert int8["outputs"] == fp16["outputs"] and int8["inputs"] == fp16["inputs"]
    pytest.importorskip("sklearn")  # coremltools' k-means palettizer
    pal = lower_component(tiny_pipe, "vae_decoder", shapes, tmp_path / "pal4",
                          compression=compression_plan(ExportSpec(weight_bits=4), []))
    assert pal["bytes"] < int8["bytes"]


def test_compression_plan_follows_recipe_then_target():
    from snapopt.lowering.export import compression_plan
    from snapopt.lowering.spec import ExportSpec
    from snapopt.recipe import validate_recipe

    six = validate_recipe({"name": "t", "model": "arch:tiny", "targets": ["iphone-14-pro@apple-split-einsum-v2-6bit"]}).targets
    assert compression_plan(ExportSpec(), six)["bits"] == 6
    assert compression_plan(ExportSpec(weight_bits=4), six)["bits"] == 4
    assert compression_plan(ExportSpec(compression="none"), six)["scheme"] == "fp16"
    assert compression_plan(ExportSpec(palettize_group_size=16, weight_bits=4), [])["scheme"] == "palettize_g16"


def test_export_report_measures_the_scheme_and_the_memory_fit(export):
    _, result = export
    titles = [s["title"] for s in result["sections"]]
    assert "Compression per target" in titles and "Memory fit per target" in titles
    rep = result["compression_report"]
    assert rep["exported"]["scheme"] == "fp16" and rep["exported"]["latency_ms"]["iphone-14-pro"] > 0
    assert rep["exported"]["package_mb"]["Unet"] > 0 and rep["exported"]["psnr_db"] > 40  # fp16 weights vs fp32
    fit = result["memory_fit"]["targets"][0]
    assert fit["target"] == "iphone-14-pro" and fit["ram_gb"] == 6 and fit["fits_resident"]
    assert fit["components"]["unet"]["weights_mb"] > 0


def test_v_prediction_unet_ships_as_epsilon_and_passes_the_check(micro, tmp_path):
    """A v-prediction student (step distillation) is exported with the exact v -> epsilon re-expression inside the
    Unet package, so Swift's epsilon schedulers sample it; the metadata says so and `check apple` passes."""
    from snapopt.lowering.apple import app_settings, apple_io
    from snapopt.lowering.interfaces import component_io

    pipe = micro.clone()
    pipe.prediction_type = "v_prediction"
    shapes = Shapes(resolution=pipe.resolution, batch=2)
    raw, apple = component_io(pipe, "unet", shapes), apple_io(pipe, "unet", shapes)
    sample, timestep = raw.example_inputs[0], raw.example_inputs[1]
    ab = torch.as_tensor(pipe.scheduler.alphas_cumprod)[timestep.long()].view(-1, 1, 1, 1).float()
    with torch.no_grad():
        v, eps = raw.module(*raw.example_inputs), apple.module(*apple.example_inputs)
    torch.testing.assert_close(eps, ab.sqrt() * v + (1 - ab).sqrt() * sample, rtol=1e-5, atol=1e-6)
    settings = app_settings(pipe)
    assert settings["prediction_type"] == "epsilon" and settings["model_prediction_type"] == "v_prediction"

    result = _lower(pipe, tmp_path / "exports", onnx=False, components=["unet", "vae_decoder", "text_encoder"])
    assert result["apple_check"]["passed"], result["apple_check"]["problems"]
    with pytest.raises(Exception, match="cannot chunk a v_prediction UNet"):
        _lower(pipe, tmp_path / "chunked", onnx=False, chunk_unet=True, components=["unet"])
