"""`snapopt apply` end to end on the tiny preset: passes, save/reload, Core ML and ONNX, report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import snapopt
from snapopt.cli import app
from snapopt.core.verify import compare, run_component
from snapopt.lowering.interfaces import Shapes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bk_tiny_run(tmp_path_factory):
    """BK-SDM-Tiny's recipe on arch:tiny: no mid block, three stages — what Apple's converter rejects."""
    out = tmp_path_factory.mktemp("runs") / "bk-tiny"
    recipe = REPO / "recipes" / "bk-sdm-tiny.yaml"
    result = snapopt.apply(recipe, out, model="arch:tiny",
                           export={"coreml": True, "onnx": True, "components": ["unet", "vae_decoder", "text_encoder"]})
    return result


def test_run_folder_layout(bk_tiny_run):
    out = bk_tiny_run.out_dir
    for rel in ["recipe.resolved.yaml", "manifest.json", "report.md", "report.json", "blocks/unet.json",
                "model/snapopt.json", "model/model_index.json", "exports/coreml/Unet.mlpackage",
                "exports/coreml/VAEDecoder.mlpackage", "exports/coreml/TextEncoder.mlpackage",
                "exports/coreml/vocab.json", "exports/coreml/merges.txt", "exports/onnx/Unet.onnx"]:
        assert (out / rel).exists(), rel
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["seed"] == 0
    assert any(k.endswith("bk-sdm-tiny.yaml") for k in manifest["inputs_sha256"])


def test_coreml_packages_carry_apples_interface(bk_tiny_run):
    cm = {e["component"]: e for e in bk_tiny_run.report["exports"]["coreml"]}
    unet = cm["unet"]
    assert unet["inputs"] == {"sample": {"shape": [2, 4, 8, 8], "dtype": "float16"},
                              "timestep": {"shape": [2], "dtype": "float16"},
                              "encoder_hidden_states": {"shape": [2, 32, 1, 77], "dtype": "float16"}}
    assert list(unet["outputs"]) == ["noise_pred"]
    assert list(cm["vae_decoder"]["inputs"]) == ["z"] and cm["vae_decoder"]["outputs"]["image"]["shape"] == [1, 3, 64, 64]
    assert cm["text_encoder"]["inputs"]["input_ids"] == {"shape": [1, 77], "dtype": "float32"}  # what Apple's Swift pipeline feeds
    assert list(cm["text_encoder"]["outputs"]) == ["last_hidden_state", "pooled_outputs"]
    assert bk_tiny_run.report["exports"]["coreml_deployment_target"].endswith("iOS17")


def test_onnx_matches_torch_in_onnxruntime(bk_tiny_run):
    for e in bk_tiny_run.report["exports"]["onnx"]:
        assert e["onnxruntime_relative_error"] < 1e-4, e
        assert e["simplified"]


def test_saved_model_reloads_with_identical_outputs(bk_tiny_run):
    from diffusers import StableDiffusionPipeline

    pipe, folder = bk_tiny_run.pipeline, bk_tiny_run.out_dir / "model"
    again = snapopt.load(folder)
    assert again.unet.config.mid_block_type is None and len(again.unet.down_blocks) == 3
    shapes = Shapes(resolution=64, batch=2)
    for comp in ("unet", "vae_decoder", "text_encoder"):
        assert compare(run_component(pipe, comp, shapes), run_component(again, comp, shapes)) < 1e-6
    sd = StableDiffusionPipeline.from_pretrained(folder, trust_remote_code=True)  # diffusers can load it directly
    assert sum(p.numel() for p in sd.unet.parameters()) == sum(p.numel() for p in pipe.unet.parameters())


def test_report_tables(bk_tiny_run):
    md = (bk_tiny_run.out_dir / "report.md").read_text()
    assert "| 0 | remove_blocks | True | unet |" in md
    assert "sample, timestep, encoder_hidden_states → noise_pred" in md
    comps = bk_tiny_run.report["components"]
    assert comps["unet"]["after"]["params"] < comps["unet"]["before"]["params"]


def test_non_config_structure_saves_as_custom_component_and_reloads(tmp_path):
    """A lone removed attention: no diffusers block type says it, so the UNet is saved as a diffusers custom
    component whose config lists the structure (the pass log stays beside it as provenance)."""
    recipe = tmp_path / "lone.yaml"
    recipe.write_text("name: lone\nmodel: arch:tiny\npasses:\n  - pass: remove_blocks\n"
                      "    options: {blocks: [down_blocks.0.attentions.1, up_blocks.3.attentions.0]}\n"
                      "  - pass: attention_original\nexport: {coreml: false, onnx: false}\n")
    result = snapopt.apply(recipe, tmp_path / "run")
    folder = tmp_path / "run" / "model"
    manifest = json.loads((folder / "snapopt.json").read_text())
    assert manifest["components"]["unet"]["format"] == "structured" and manifest["diffusers_loadable"]
    edits = json.loads((folder / "unet" / "config.json").read_text())["snapopt_structure"]["edits"]
    assert sorted(e["path"] for e in edits if e["op"] == "set") == ["down_blocks.0.attentions.1", "up_blocks.3.attentions.0"]
    arch = json.loads((folder / "unet" / "snapopt_arch.json").read_text())
    assert [e["pass"] for e in arch["edits"]] == ["remove_blocks"]
    again = snapopt.load(folder)
    assert set(manifest["components"]["unet"]["attention"].values()) == {"original"}
    shapes = Shapes(resolution=64, batch=2)
    assert compare(run_component(result.pipeline, "unet", shapes), run_component(again, "unet", shapes)) < 1e-6


def test_failed_pass_writes_nothing(tmp_path):
    (tmp_path / "boom.py").write_text(
        "from snapopt.core import Pass\nclass Boom(Pass):\n    '''Fails.'''\n    name = 'boom'\n"
        "    def run(self, program, ctx):\n        raise ValueError('no luck')\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: arch:tiny\nplugins: [boom.py]\npasses:\n  - pass: boom\n")
    proc = subprocess.run([sys.executable, "-m", "snapopt.cli", "apply", str(recipe), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: pass 'boom': ValueError: no luck"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boom.py", "r.yaml"]


def test_export_command_onnx_only(tmp_path):
    result = CliRunner().invoke(app, ["export", "arch:tiny", "--format", "onnx", "--component", "vae_decoder",
                                      "--out", str(tmp_path / "ex")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ex" / "exports" / "onnx" / "VAEDecoder.onnx").is_file()
    assert not (tmp_path / "ex" / "model").exists()


def test_a_run_without_exports_needs_no_converter(tmp_path):
    """exports off: the run (manifest included) completes where coremltools and onnx cannot be imported
    (the GPU machine of a training chain has neither); the manifest says they are absent."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: arch:tiny\npasses:\n  - pass: attention_split_einsum\n    options: {component: unet}\n"
                      "export: {coreml: false, onnx: false}\n")
    code = ("import sys\nfor m in ('coremltools', 'onnx'): sys.modules[m] = None  # import fails\n"
            f"import snapopt\nsnapopt.apply({str(recipe)!r}, {str(tmp_path / 'run')!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["versions"]["torch"] == torch.__version__
    assert set(manifest["versions"]) >= {"coremltools", "onnx", "diffusers", "transformers"}
    from importlib.metadata import version

    assert manifest["versions"]["coremltools"] == version("coremltools")  # read from metadata, not by importing


def test_installed_version_prefers_the_imported_module():
    from snapopt.run import installed_version

    assert installed_version("torch") == torch.__version__
    assert installed_version("no-such-distribution-snapopt") is None


def test_deterministic_recipe_holds_for_the_whole_run_and_is_undone_after(tmp_path):
    """deterministic: true is on from the first pass (set before the model loads, cuBLAS's workspace included),
    recorded in the manifest, and the process's own settings come back after the run, also after a failed one."""
    probe = tmp_path / "probe.json"
    (tmp_path / "probe.py").write_text(
        "import json, os, torch\nfrom snapopt.core import Pass, PassResult\n"
        "class Probe(Pass):\n    '''Records the kernel settings a pass sees.'''\n    name = 'probe'\n"
        "    def run(self, program, ctx):\n"
        f"        open({str(probe)!r}, 'w').write(json.dumps([torch.are_deterministic_algorithms_enabled(),\n"
        "            torch.backends.cudnn.benchmark, os.environ.get('CUBLAS_WORKSPACE_CONFIG')]))\n"
        "        return PassResult(program=program, modified=False)\n"
        "class Boom(Pass):\n    '''Fails.'''\n    name = 'boom'\n"
        "    def run(self, program, ctx):\n        raise ValueError('no luck')\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: arch:tiny\ndeterministic: true\nplugins: [probe.py]\npasses:\n  - pass: probe\n"
                      "export: {coreml: false, onnx: false}\n")
    import os

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    assert before[0] is False
    result = snapopt.apply(recipe, tmp_path / "run")
    assert json.loads(probe.read_text()) == [True, False, ":4096:8"]
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["deterministic"] is True and manifest["accelerator"] == {"device": "cpu"}
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before

    failing = tmp_path / "f.yaml"
    failing.write_text(recipe.read_text().replace("  - pass: probe\n", "  - pass: probe\n  - pass: boom\n"))
    probe.unlink()
    with pytest.raises(Exception, match="no luck"):
        snapopt.apply(failing, tmp_path / "run2")
    assert json.loads(probe.read_text())[0] is True  # deterministic up to the failing pass
    assert (torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before[::2]


def test_deterministic_kernels_puts_back_what_the_caller_had(monkeypatch):
    """The caller's own settings (strict determinism, a cuBLAS workspace of its choice, attention kernels, cuDNN flags)
    come back after a deterministic block, and after a plain one in which a stage changed them."""
    import os

    from snapopt.train.accel import deterministic_kernels

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.flash_sdp_enabled())
    try:
        torch.use_deterministic_algorithms(True, warn_only=False)
        with deterministic_kernels():
            assert torch.is_deterministic_algorithms_warn_only_enabled() and torch.backends.cudnn.deterministic
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the caller's choice is kept
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(False)
        with deterministic_kernels(False):  # a plain run whose stage switched things process-wide
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.enable_flash_sdp(False)
        assert torch.backends.cudnn.benchmark == old[2] and torch.backends.cuda.flash_sdp_enabled() == old[4]
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = old[2], old[3]
        torch.backends.cuda.enable_flash_sdp(old[4])


def test_deterministic_recipe_refuses_cudnn_autotuning_in_a_stage(tmp_path):
    from snapopt.errors import RecipeError
    from snapopt.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: arch:tiny\ndeterministic: true\npasses:\n  - pass: recover\n"
                      "    options: {train: {steps: 1, cudnn_benchmark: true}}\n")
    with pytest.raises(RecipeError, match=r"passes\[0\]\.options\.train\.cudnn_benchmark: true conflicts with deterministic"):
        load_recipe(recipe)
    recipe.write_text(recipe.read_text().replace("deterministic: true", "deterministic: false"))
    load_recipe(recipe)  # without determinism, autotuning is the user's choice
