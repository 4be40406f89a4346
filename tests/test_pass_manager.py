"""Pass infrastructure: verification, failure isolation, plugins by name, module:Class and file."""

from pathlib import Path

import pytest
import torch

from snapopt.core import Pass, PassContext, PassManager, PassOptions, PassResult
from snapopt.core.registry import PassRegistry
from snapopt.errors import PassError, PluginError, PostconditionError

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "keep_text_layers.py"


class ScaleConvOut(Pass):
    """Multiply conv_out's weights: claims to be exact, is not."""

    name = "scale_conv_out"
    exact = True

    def run(self, program, ctx):
        with torch.no_grad():
            program.unet.conv_out.weight.mul_(2.0)
        return PassResult(program, modified=True)


class PoisonConvOut(Pass):
    """Makes the UNet produce NaNs."""

    name = "poison_conv_out"

    def run(self, program, ctx):
        with torch.no_grad():
            program.unet.conv_out.bias.fill_(float("nan"))
        return PassResult(program, modified=True)


class Crash(Pass):
    """Raises inside run()."""

    name = "crash"

    def run(self, program, ctx):
        program.unet.conv_in = None  # mutate, then fail: the caller's program must not see it
        raise RuntimeError("boom")


def test_exact_claim_is_verified(tiny, tiny_shapes):
    ctx = PassContext(shapes=tiny_shapes, history=["attention_sdpa"])
    with pytest.raises(PostconditionError, match=r"pass 'scale_conv_out' \(after attention_sdpa\): declared exact but changed 'unet'"):
        PassManager([ScaleConvOut()], ctx).run(tiny)


def test_non_finite_outputs_fail_the_pass(tiny, tiny_shapes):
    with pytest.raises(PostconditionError, match="non-finite"):
        PassManager([PoisonConvOut()], PassContext(shapes=tiny_shapes)).run(tiny)


def test_crashing_pass_is_named_and_input_untouched(tiny, tiny_shapes):
    conv_in = tiny.unet.conv_in
    with pytest.raises(PassError, match="pass 'crash': RuntimeError: boom"):
        PassManager([Crash()], PassContext(shapes=tiny_shapes)).run(tiny)
    assert tiny.unet.conv_in is conv_in


def test_records_report_changes(tiny, tiny_shapes):
    from snapopt.passes.remove_blocks import RemoveBlocks

    out, (rec,) = PassManager([RemoveBlocks({"blocks": ["mid_block"]})], PassContext(shapes=tiny_shapes)).run(tiny)
    ch = rec.changes["unet"]
    assert ch["params_after"] < ch["params_before"] and ch["macs_after"] < ch["macs_before"]
    assert set(ch["names_gone"]) == {"mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"}
    assert ch["blocks_before"] - ch["blocks_after"] == 3


def test_builtins_come_from_entry_points():
    reg = PassRegistry()
    names = {name: source for name, _, source in reg.items()}
    assert {"remove_blocks", "attention_sdpa", "attention_split_einsum", "attention_original"} <= set(names)
    assert names["remove_blocks"].startswith("entry point")


def test_plugin_by_file_and_by_module(tmp_path, monkeypatch):
    reg = PassRegistry()
    cls = reg.resolve(str(EXAMPLE))
    assert cls.name == "keep_text_layers" and reg.get("keep_text_layers") is cls
    (tmp_path / "my_passes.py").write_text(EXAMPLE.read_text().replace('"keep_text_layers"', '"keep_text_layers2"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    cls2 = PassRegistry().resolve("my_passes:KeepTextLayers")
    assert cls2.name == "keep_text_layers2"


def test_bad_plugins_are_rejected_by_name(tmp_path):
    reg = PassRegistry()
    bad = tmp_path / "bad.py"
    bad.write_text("from snapopt.core import Pass\nclass NoRun(Pass):\n    name = 'no_run'\n")
    with pytest.raises(PluginError, match="'no_run' from file .*bad.py does not implement run"):
        reg.resolve(str(bad))
    (tmp_path / "worse.py").write_text("raise ImportError('missing dependency xyz')\n")
    with pytest.raises(PluginError, match="cannot import pass file .*worse.py.*xyz"):
        reg.resolve(str(tmp_path / "worse.py"))
    (tmp_path / "clash.py").write_text(
        "from snapopt.core import Pass, PassResult\nclass C(Pass):\n    name = 'remove_blocks'\n"
        "    def run(self, p, c):\n        return PassResult(p, False)\n")
    with pytest.raises(PluginError, match="uses the name 'remove_blocks' of the built-in pass registered by entry point"):
        reg.resolve(str(tmp_path / "clash.py"))


def test_options_are_typed():
    from snapopt.passes.remove_blocks import RemoveBlocks

    with pytest.raises(Exception, match="blocks"):
        RemoveBlocks({"blokcs": ["mid_block"]})


class Opts(PassOptions):
    factor: float = 1.0


def test_option_docs_listed():
    class P(Pass):
        """Doc line."""

        name = "p"
        Options = Opts

        def run(self, program, ctx):
            return PassResult(program, False)

    assert P.summary() == "Doc line."
    assert P.option_docs()[0][:3] == ("factor", "float", "1.0")


def test_broken_entry_point_does_not_hide_other_passes(tmp_path, monkeypatch):
    dist = tmp_path / "brokenplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[snapopt.passes]\nghost = not_a_module_xyz:Ghost\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = PassRegistry()
    assert reg.get("remove_blocks").name == "remove_blocks"
    with pytest.raises(PluginError, match="cannot load pass plugin entry point 'ghost = not_a_module_xyz:Ghost'"):
        reg.get("ghost")
    assert "ghost" in reg.broken()


class SneakyTextEncoder(Pass):
    """Declares the UNet but writes the text encoder (which the teacher shares)."""

    name = "sneaky"

    def run(self, program, ctx):
        with torch.no_grad():
            next(program.text_encoder.parameters()).mul_(1.0)
        return PassResult(program, modified=True)


def test_undeclared_mutation_is_caught(tiny, tiny_shapes):
    with pytest.raises(PassError, match="pass 'sneaky': modified 'text_encoder', which it did not declare in touches\\(\\) \\(declared: unet\\)"):
        PassManager([SneakyTextEncoder()], PassContext(shapes=tiny_shapes)).run(tiny)


def test_broken_input_model_is_bad_input_not_the_first_pass(tiny, tiny_shapes):
    from snapopt.errors import ModelRefError
    from snapopt.passes.attention_rewrites import AttentionSDPA

    with torch.no_grad():
        tiny.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(ModelRefError, match="input model 'arch:tiny': component 'unet' output 0 has non-finite values") as exc:
        PassManager([AttentionSDPA()], PassContext(shapes=tiny_shapes)).run(tiny)
    assert exc.value.exit_code == 2


def test_plugins_cannot_take_builtin_names_or_exit(tmp_path):
    reg = PassRegistry()
    (tmp_path / "exits.py").write_text("raise SystemExit(0)\n")
    with pytest.raises(PluginError, match="cannot import pass file .*exits.py.*SystemExit"):
        reg.resolve(str(tmp_path / "exits.py"))
    (tmp_path / "ctrlc.py").write_text("raise KeyboardInterrupt\n")
    with pytest.raises(PluginError, match="cannot import pass file .*ctrlc.py.*KeyboardInterrupt"):
        reg.resolve(str(tmp_path / "ctrlc.py"))
    # a plugin loaded before anything else still finds the built-ins registered first
    (tmp_path / "clash.py").write_text(
        "from snapopt.core import Pass, PassResult\nclass C(Pass):\n    name = 'channel_prune'\n"
        "    def run(self, p, c):\n        return PassResult(p, False)\n")
    with pytest.raises(PluginError, match="name 'channel_prune' of the built-in pass"):
        PassRegistry().load_spec(str(tmp_path / "clash.py"))
    assert PassRegistry().get("channel_prune").__module__ == "snapopt.passes.channel_prune"


def test_loaded_model_checks_for_run_apply(tiny, tiny_shapes):
    """snapopt.checks.model's checks on a loaded pipeline: clean passes; an all-NaN VAE is refused by name."""
    from snapopt.checks.model import check_pipeline_outputs, check_pipeline_weights
    from snapopt.errors import ModelRefError

    check_pipeline_weights(tiny)
    check_pipeline_outputs(tiny, tiny_shapes)
    with torch.no_grad():
        for p in tiny.vae.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ModelRefError, match="model 'arch:tiny': vae_decoder weight '.*' has non-finite values") as exc:
        check_pipeline_weights(tiny)
    assert exc.value.exit_code == 2
    with pytest.raises(ModelRefError, match="component 'vae_decoder' output 0 has non-finite values at the recipe's shapes"):
        check_pipeline_outputs(tiny, tiny_shapes)


def test_fingerprint_ignores_replaced_equal_buffers_and_catches_changed_ones():
    """``Module.to`` replaces buffers (a teacher moved to a GPU and back): same values are no change;
    a new value, or a parameter written in place, is."""
    import torch

    from snapopt.core.pass_manager import _fingerprint

    m = torch.nn.Linear(3, 2)
    m.register_buffer("position_ids", torch.arange(7)[None])
    before = _fingerprint(m)
    m.position_ids = m.position_ids.clone()  # what .to(device) and back does to a buffer
    assert _fingerprint(m) == before
    m.position_ids = m.position_ids + 1
    assert _fingerprint(m) != before
    again = _fingerprint(m)
    with torch.no_grad():
        m.weight.mul_(2)
    assert _fingerprint(m) != again
