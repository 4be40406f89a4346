"""The shipped zoo teacher: lookup, layout, generation and evaluation on CPU (short runs)."""

from pathlib import Path

import pytest
import torch

from snapopt.zoo import UnknownZooModel, available, zoo_path


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    return StableDiffusionPipeline.from_pretrained(zoo_path("zoo:snapshapes"))


def test_zoo_lookup_and_unknown_name():
    assert "snapshapes" in available()
    assert (zoo_path("snapshapes") / "model_index.json").exists()
    with pytest.raises(UnknownZooModel, match="available: snapshapes") as err:
        zoo_path("sd15")
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_shipped_weights_are_fp16_safetensors_under_40mb():
    from safetensors import safe_open

    weights = zoo_path("snapshapes").parent
    files = [f for f in weights.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 40 * 1024 * 1024
    tensors = [f for f in files if f.suffix == ".safetensors"]
    assert len(tensors) == 4 and not [f for f in files if f.suffix in (".bin", ".pt", ".pth")]
    for f in tensors:
        with safe_open(str(f), "pt") as sf:
            assert {sf.get_slice(k).get_dtype() for k in sf.keys()} == {"F16"}, f


def test_layout_mirrors_sd15(pipe):
    cfg = pipe.unet.config
    assert list(cfg.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(cfg.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert cfg.mid_block_type == "UNetMidBlock2DCrossAttn" and cfg.layers_per_block == 2
    assert len(pipe.vae.config.block_out_channels) == 4 and pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_generates_prompt_following_images(pipe):
    from snapopt.zoo import checker, shapes
    from snapopt.zoo.evaluate import generate

    scenes = shapes.heldout_prompts(2)
    images = generate(pipe, scenes.captions(), steps=5, cfg=7.5, seed=0)
    assert images.shape == (2, 3, 128, 128) and images.std() > 0.1
    assert checker.accuracy(shapes.to_uint8(images), scenes.scenes())["colour_accuracy"] >= 0.5


def test_evaluate_separates_teacher_from_noise(pipe):
    from snapopt.zoo import shapes
    from snapopt.zoo.evaluate import evaluate, score_images

    result = evaluate(pipe, steps=4, cfg=7.5, n_prompts=3, seed=0)
    for key in ("fid", "clip_score", "attribute_accuracy", "seconds_per_image"):
        assert key in result
    scenes = shapes.heldout_prompts(3)
    noise = score_images(torch.rand(3, 3, 128, 128) * 2 - 1, scenes)
    assert result["clip_score"] > noise["clip_score"] + 30
    assert result["fid"] < noise["fid"]


def test_eval_command_writes_grid(tmp_path: Path):
    """`snapopt eval` takes any model reference, a run's saved model too, and names the teacher it descends from."""
    import json

    from typer.testing import CliRunner

    from snapopt.errors import ModelRefError
    from snapopt.models import load_model
    from snapopt.serialization import save
    from snapopt.zoo.cli import app

    res = CliRunner().invoke(app, ["zoo:snapshapes", "--steps", "2", "--prompts", "2", "--out", str(tmp_path / "zoo")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "zoo" / "samples.png").exists() and "clip_score" in res.output
    save(load_model("zoo:snapshapes"), tmp_path / "run-model")  # what `snapopt apply` writes as run/model
    res = CliRunner().invoke(app, [str(tmp_path / "run-model"), "--steps", "2", "--prompts", "2", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "descends from zoo:snapshapes" in " ".join(res.output.split())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["teacher"] == "zoo:snapshapes"
    bad = CliRunner().invoke(app, ["zoo:nope", "--steps", "2", "--prompts", "2", "--out", str(tmp_path)])
    assert isinstance(bad.exception, ModelRefError)


def test_quality_retained_scores_both_and_renders(tmp_path: Path):
    """The report's quality-retained section: the same prompts and noise for input and output, a grid with the
    input above the output, and retained percentages computed from the two rows."""
    import copy

    from snapopt.models import load_model
    from snapopt.quality import quality_retained, snapshapes_model
    from snapopt.report import quality_section
    from PIL import Image

    teacher = load_model("zoo:snapshapes")
    student = copy.copy(teacher)
    assert snapshapes_model(teacher) and not snapshapes_model(load_model("arch:tiny", structure_only=True))
    q = quality_retained(teacher, student, steps=2, teacher_steps=2, prompts=2, grid=tmp_path / "grid.png")
    timeless = lambda r: {k: v for k, v in r.items() if k != "seconds_per_image"}  # noqa: E731
    assert timeless(q["teacher"]) == timeless(q["student"])  # same model, steps and noise: identical scores
    assert Image.open(tmp_path / "grid.png").size == (2 * 128, 2 * 128)  # 2 prompts: input row above output row
    md = "\n".join(quality_section(q))
    assert "| attribute accuracy |" in md and "| 100% |" in md and "grid.png" in md


def test_quality_settings_follow_step_distillation():
    from types import SimpleNamespace

    from snapopt.run import QUALITY_DEFAULTS, quality_settings

    rec = SimpleNamespace(name="step_distill", stats={"student_steps": 8})
    assert quality_settings(SimpleNamespace(), [rec])["steps"] == 8
    assert quality_settings(SimpleNamespace(), []) == QUALITY_DEFAULTS
    assert quality_settings(SimpleNamespace(quality={"steps": 4, "prompts": 8}), [rec])["steps"] == 4
