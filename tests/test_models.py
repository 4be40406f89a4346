"""Model references and architecture presets: the published parameter counts, and clear failures."""

import time

import pytest

from snapopt.errors import ModelRefError
from snapopt.models import load_model


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_sd15_preset_has_published_parameter_counts():
    pipe = load_model("arch:sd-v1.5", structure_only=True)
    assert pipe.structure_only
    assert _params(pipe.unet) == 859_520_964
    assert _params(pipe.vae.decoder) == 49_490_179
    assert _params(pipe.text_encoder) == 123_060_480  # CLIP ViT-L/14 text tower
    assert pipe.resolution == 512 and pipe.latent_size == 64


def test_sd21_base_and_sdxl_presets():
    assert _params(load_model("arch:sd-2.1-base", structure_only=True, components=["unet"]).unet) == 865_910_724
    sdxl = load_model("arch:sdxl-base", structure_only=True, components=["unet"])
    assert _params(sdxl.unet) == 2_567_463_684
    assert sdxl.resolution == 1024


def test_tiny_preset_keeps_sd15_block_layout(tiny_pipe):
    sd = load_model("arch:sd-v1.5", structure_only=True, components=["unet"]).unet
    tiny = tiny_pipe.unet
    assert tiny.config.down_block_types == sd.config.down_block_types
    assert tiny.config.up_block_types == sd.config.up_block_types
    assert [len(b.resnets) for b in tiny.down_blocks] == [len(b.resnets) for b in sd.down_blocks]
    assert [len(b.resnets) for b in tiny.up_blocks] == [len(b.resnets) for b in sd.up_blocks]
    assert _params(tiny) < 5_000_000


def test_unknown_preset_is_one_clear_line():
    with pytest.raises(ModelRefError, match=r"unknown architecture preset 'arch:sd-9'.*arch:sd-v1.5"):
        load_model("arch:sd-9")


def test_hub_id_fails_fast_when_offline():
    start = time.perf_counter()
    with pytest.raises(ModelRefError, match="cannot load 'nobody/not-a-model'"):
        load_model("nobody/not-a-model")
    assert time.perf_counter() - start < 15


def test_folder_without_model_index(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelRefError, match="single model, not a pipeline"):
        load_model(str(tmp_path))
    with pytest.raises(ModelRefError, match="neither an existing folder"):
        load_model("./does/not/exist")
