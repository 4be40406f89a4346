"""The worked example in docs/writing-a-pass.md, run exactly as the page says."""

from pathlib import Path

from typer.testing import CliRunner

import snapopt
from snapopt.cli import app

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_clip_skip_recipe_from_docs(tmp_path):
    out = tmp_path / "clip-skip"
    result = CliRunner().invoke(app, ["apply", str(DOCS / "examples" / "clip-skip.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = __import__("json").loads((out / "report.json").read_text())
    first = report["passes"][0]
    assert first["pass"] == "keep_text_layers" and first["stats"] == {"layers_before": 2, "layers_after": 1}
    assert first["changes"]["text_encoder"]["params_after"] < first["changes"]["text_encoder"]["params_before"]
    assert report["passes"][1]["verification"]["unet"]["relative_error"] < 1e-4
    assert report["exports"]["onnx"][0]["onnxruntime_relative_error"] < 1e-4
    again = snapopt.load(out / "model")
    assert again.text_encoder.config.num_hidden_layers == 1
    assert len(getattr(again.text_encoder, "text_model", again.text_encoder).encoder.layers) == 1
    assert (out / "model" / "model_index.json").is_file()  # config expresses it: plain diffusers folder
