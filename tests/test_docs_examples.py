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
    assert set(first["phases"]) == {"drop layers"} and first["phases"]["drop layers"] <= first["seconds"]
    assert "time (s): drop layers" in (out / "report.md").read_text()  # the page's "Where a pass's time goes"
    assert first["changes"]["text_encoder"]["params_after"] < first["changes"]["text_encoder"]["params_before"]
    assert report["passes"][1]["verification"]["unet"]["relative_error"] < 1e-4
    assert report["exports"]["onnx"][0]["onnxruntime_relative_error"] < 1e-4
    again = snapopt.load(out / "model")
    assert again.text_encoder.config.num_hidden_layers == 1
    assert len(getattr(again.text_encoder, "text_model", again.text_encoder).encoder.layers) == 1
    assert (out / "model" / "model_index.json").is_file()  # config expresses it: plain diffusers folder


def _python_blocks(page: Path) -> list[str]:
    text = page.read_text()
    return [chunk.split("```", 1)[0] for chunk in text.split("```python\n")[1:]]


def test_writing_a_pass_code_runs_as_written(tmp_path):
    """The page's code block, copied as written (imports included), defines a working pass: run it in a fresh
    interpreter and apply the pass it defines; it is also the example file the recipe above loads."""
    import subprocess
    import sys

    (block,) = _python_blocks(DOCS / "writing-a-pass.md")
    example = (DOCS / "examples" / "keep_text_layers.py").read_text()
    assert block.strip() in example  # the page shows the file's code, not a paraphrase of it
    script = tmp_path / "copied.py"
    script.write_text(block + "\n"
                      "from snapopt.core import PassContext\n"
                      "from snapopt.models import load_model\n"
                      "pipe = load_model('arch:tiny')\n"
                      "out = KeepTextLayers({'keep': 1}).run(pipe, PassContext()).program\n"
                      "print(out.text_encoder.config.num_hidden_layers)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "1"
