"""Block IR: every block attributed, parameters and MACs add up, skip connections are edges."""

import json

from typer.testing import CliRunner

from snapopt.capture import block_graph
from snapopt.cli import app
from snapopt.lowering.interfaces import Shapes
from snapopt.models import load_model


def test_tiny_unet_blocks_and_skips(tiny_pipe, tiny_shapes):
    g = block_graph(tiny_pipe, "unet", tiny_shapes)
    names = g.blocks()
    for expected in ["conv_in", "time_embedding", "down_blocks.0.resnets.0", "down_blocks.0.attentions.1",
                     "down_blocks.0.downsamplers.0", "mid_block.resnets.0", "mid_block.attentions.0",
                     "up_blocks.0.upsamplers.0", "up_blocks.3.attentions.2", "conv_out"]:
        assert expected in names
    assert "other" not in names  # every op is attributed to a block
    assert sum(g.node(b)["params"] for b in names) == g.total_params == sum(p.numel() for p in tiny_pipe.unet.parameters())
    skips = g.skip_edges()
    # SD's UNet has 12 skip connections (conv_in + 8 down ResNets/attentions + 3 downsamplers)
    assert len({dst for _, dst in skips if dst.endswith("resnets.0") or ".resnets." in dst}) == 12
    assert ("conv_in", "up_blocks.3.resnets.2") in skips
    assert g.node("up_blocks.3.attentions.0")["out_shape"] == (2, 32, 8, 8)


def test_sd15_macs_and_high_resolution_attention_dominates():
    pipe = load_model("arch:sd-v1.5", structure_only=True, components=["unet"])
    g = block_graph(pipe, "unet", Shapes(resolution=512, batch=1))
    t = g.totals()
    assert abs(t["macs"] / 1e9 - 401.6) < 0.1                      # with QKᵀ and AV
    assert abs((t["macs"] - t["attention_macs"]) / 1e9 - 338.6) < 0.2  # without attention matmuls
    top = sorted(g.rows(), key=lambda r: -r["macs"])[:5]
    assert all(r["kind"] == "attention" and r["resolution"] == 64 for r in top)
    # the 64x64 stages hold ~3.4% of the parameters but ~38% of the MACs
    hi = [r for r in g.rows() if r["resolution"] == 64 and r["stage"] in ("down_blocks.0", "up_blocks.3")]
    assert 0.02 < sum(r["params"] for r in hi) / t["params"] < 0.05
    assert 0.33 < sum(r["macs"] for r in hi) / t["macs"] < 0.43


def test_inspect_cli_json():
    result = CliRunner().invoke(app, ["inspect", "arch:sd-v1.5", "--json", "--component", "unet"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["components"]["unet"]["totals"]["params"] == 859_520_964


def test_inspect_cli_rejects_unknown_component():
    result = CliRunner().invoke(app, ["inspect", "arch:tiny", "--component", "unet,vea"])
    assert result.exit_code != 0
