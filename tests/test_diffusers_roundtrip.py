"""Diffusers in, diffusers out: a structurally edited pipeline saves as a folder that plain diffusers loads and
runs in a process that never imports snapopt, with outputs equal to snapopt's modules."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import snapopt
from snapopt.core import PassContext, PassManager
from snapopt.core.registry import PASSES
from snapopt.serialization import save

# Runs in a fresh interpreter: loads the folder with diffusers alone, computes the UNet and decoder outputs on
# the given inputs, draws an image, and checks that the pipeline's own save_pretrained reloads.
FRESH = r"""
import sys, torch
from safetensors.torch import load_file, save_file
from diffusers import DiffusionPipeline
folder, inputs, out, resaved = sys.argv[1:5]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
x = load_file(inputs)
with torch.no_grad():
    eps = pipe.unet(x["sample"], x["t"], x["context"], return_dict=False)[0]
    img = pipe.vae.decode(x["z"], return_dict=False)[0]
pic = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
assert torch.isfinite(pic).all() and pic.shape[-1] == pipe.unet.config.sample_size * pipe.vae_scale_factor
pipe.save_pretrained(resaved)
again = DiffusionPipeline.from_pretrained(resaved, trust_remote_code=True)
with torch.no_grad():
    eps2 = again.unet(x["sample"], x["t"], x["context"], return_dict=False)[0]
assert torch.equal(eps, eps2)
assert not [m for m in sys.modules if m.split(".")[0] == "snapopt"], "snapopt was imported"
save_file({"eps": eps.contiguous(), "img": img.contiguous()}, out)
print(type(pipe.unet).__name__, type(pipe.vae).__name__, type(pipe.scheduler).__name__)
"""

LONE_AND_PAIR = ["down_blocks.2.attentions.0",  # a lone attention: no diffusers block type says that
                 "down_blocks.1.resnets.1", "down_blocks.1.attentions.1", "up_blocks.2.resnets.1", "up_blocks.2.attentions.1"]


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """arch:tiny with a lone attention skipped, a ResNet/attention pair removed, 25% of the UNet's channels and
    half the decoder's (not the encoder's) pruned: structures plain diffusers configs cannot express."""
    from diffusers import PNDMScheduler

    from snapopt.models import load_model

    pipe = load_model("arch:tiny", seed=0)
    pipe.extra["scheduler"] = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)  # the input ships PNDM, as SD-v1.5
    passes = [PASSES.get("remove_blocks")({"component": "unet", "blocks": LONE_AND_PAIR}),
              PASSES.get("channel_prune")({"component": "vae_decoder", "ratio": 0.5}),
              PASSES.get("channel_prune")({"component": "unet", "ratio": 0.25}),
              PASSES.get("attention_split_einsum")({"component": "unet"})]
    from snapopt.lowering.interfaces import Shapes

    out, _ = PassManager(passes, PassContext(shapes=Shapes(resolution=pipe.resolution, batch=2)), verify=False).run(pipe)
    folder = tmp_path_factory.mktemp("rt") / "model"
    save(out, folder)
    return out, folder


def _inputs(pipe, path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = pipe.latent_size
    x = {"sample": torch.randn(2, 4, n, n, generator=g), "t": torch.tensor([999.0, 10.0]),
         "context": torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g),
         "z": torch.randn(1, 4, n, n, generator=g)}
    save_file(x, str(path))
    return x


def test_folder_is_a_diffusers_pipeline_with_custom_components(edited):
    _, folder = edited
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["snapopt_unet", "SnapoptUNet2DConditionModel"]
    assert index["vae"] == ["snapopt_vae", "SnapoptAutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]  # the input's scheduler, not snapopt's DDIM
    config = json.loads((folder / "unet" / "config.json").read_text())
    edits = config["snapopt_structure"]["edits"]
    assert {"op": "set", "path": "down_blocks.2.attentions.0",
            "module": {"type": "SkippedBlock", "kind": "attention", "replaced": "down_blocks.2.attentions.0"}} in edits
    assert (folder / "unet" / "snapopt_unet.py").is_file() and (folder / "vae" / "snapopt_vae.py").is_file()
    code = (folder / "unet" / "snapopt_unet.py").read_text()
    assert "import snapopt" not in code and "from snapopt" not in code


def test_plain_diffusers_loads_and_matches_in_a_fresh_process(edited, tmp_path):
    pipe, folder = edited
    x = _inputs(pipe, tmp_path / "in.safetensors")
    proc = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(tmp_path / "in.safetensors"),
                           str(tmp_path / "out.safetensors"), str(tmp_path / "resaved")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["SnapoptUNet2DConditionModel", "SnapoptAutoencoderKL", "PNDMScheduler"]
    got = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        eps = pipe.unet(x["sample"], x["t"], x["context"], return_dict=False)[0]
        img = pipe.vae.decode(x["z"], return_dict=False)[0]
    assert torch.allclose(got["eps"], eps, atol=1e-5) and torch.allclose(got["img"], img, atol=1e-5)


def test_snapopt_load_is_callable_and_its_modules_save_and_reload(edited, tmp_path):
    pipe, folder = edited
    again = snapopt.load(folder)
    images = again("a red circle", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, pipe.resolution, pipe.resolution, 3)
    # the loaded modules' configs describe their weights: a component's own save_pretrained reloads
    again.unet.save_pretrained(tmp_path / "unet")
    again.vae.save_pretrained(tmp_path / "vae")
    unet = type(again.unet).from_pretrained(tmp_path / "unet")
    vae = type(again.vae).from_pretrained(tmp_path / "vae")
    x = _inputs(pipe, tmp_path / "in.safetensors")
    with torch.no_grad():
        assert torch.allclose(unet(x["sample"], x["t"], x["context"], return_dict=False)[0],
                              again.unet(x["sample"], x["t"], x["context"], return_dict=False)[0], atol=1e-5)  # split-einsum vs sdpa
        assert torch.equal(vae.decode(x["z"], return_dict=False)[0], again.vae.decode(x["z"], return_dict=False)[0])
    # and saving the reloaded pipeline again gives the same structure (no edits lost or doubled)
    save(again, tmp_path / "again")
    first = json.loads((folder / "vae" / "config.json").read_text())["snapopt_structure"]
    second = json.loads((tmp_path / "again" / "vae" / "config.json").read_text())["snapopt_structure"]
    assert first == second


def test_plugin_structure_reloads_without_the_plugin(tmp_path):
    """A structural pass from a local file: the saved structure is data, so reloading never needs the pass."""
    plugin = tmp_path / "drop_attention.py"
    plugin.write_text(
        "from snapopt.core import Pass, PassResult\n"
        "from snapopt.models.blocks import SkippedBlock\n"
        "class DropAttention(Pass):\n"
        "    '''Skip the first down block's first attention (a structure diffusers' config cannot say).'''\n"
        "    name = 'drop_first_attention'\n"
        "    structural = True\n"
        "    def run(self, program, ctx):\n"
        "        program.unet.down_blocks[0].attentions[0] = SkippedBlock('attention', 'down_blocks.0.attentions.0')\n"
        "        return PassResult(program=program, modified=True)\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: arch:tiny\nplugins: [drop_attention.py]\npasses:\n  - pass: drop_first_attention\n"
                      "export: {coreml: false, onnx: false}\n")
    snapopt.apply(recipe, tmp_path / "run")
    code = ("import sys, snapopt; p = snapopt.load(sys.argv[1]); "
            "print(type(p.unet.down_blocks[0].attentions[0]).__name__)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run" / "model")], capture_output=True, text=True,
                          cwd=tmp_path.parent, timeout=300)  # a new process where the plugin was never registered
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "SkippedBlock"
