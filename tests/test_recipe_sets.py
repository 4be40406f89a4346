"""``snapopt apply RECIPE --set KEY=VALUE``: ablations without copying the recipe. Overrides address top-level
fields, a pass's options by its name or by position, create missing mappings, remove keys with null; bad ones exit 2
with one line; the report records them with the effective recipe, and --resume refuses a different effective recipe."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from snapopt.errors import UsageError
from snapopt.recipe import apply_sets, load_recipe, parse_set

BASE = {
    "name": "t",
    "seed": 0,
    "export": {"coreml": True, "onnx": True},
    "targets": ["iphone-14-pro", "iphone-15-pro"],
    "passes": [
        {"pass": "block_prune", "options": {"component": "unet", "robust_training": {"train": {"steps": 200}}}},
        {"pass": "recover", "options": {"train": {"steps": 1600}, "loss": {"task": 1.0, "timestep_scaling": True}}},
        {"pass": "channel_prune", "options": {"component": "vae_decoder", "ratio": 0.5}},
        {"pass": "channel_prune", "options": {"component": "vae_decoder", "ratio": 0.5}},
        {"pass": "step_distill"},
    ],
}


def _set(*sets: str) -> dict:
    data = copy.deepcopy(BASE)
    apply_sets(data, list(sets))
    return data


def test_parse_set_reads_value_as_yaml():
    assert parse_set("lr=1e-4") == ("lr", 1e-4)
    assert parse_set("a.b=[2, 14]") == ("a.b", [2, 14])
    assert parse_set("x={a: 1}") == ("x", {"a": 1})
    assert parse_set("on=true") == ("on", True)
    assert parse_set("t=self") == ("t", "self")
    assert parse_set("eq=a=b") == ("eq", "a=b")  # only the first '=' splits


def test_top_level_fields_and_list_items():
    data = _set("seed=1", "export.onnx=false", "targets[1]=iphone-16-pro", "quality.steps=8")
    assert data["seed"] == 1 and data["export"] == {"coreml": True, "onnx": False}
    assert data["targets"] == ["iphone-14-pro", "iphone-16-pro"]
    assert data["quality"] == {"steps": 8}  # created: the YAML had no quality section
    assert data["passes"] == BASE["passes"]


def test_pass_options_by_name_and_by_position():
    data = _set("recover.loss.timestep_scaling=false", "step_distill.teacher=self", "passes[3].options.ratio=0.25",
                "recover.train.steps=800")
    assert data["passes"][1]["options"] == {"train": {"steps": 800}, "loss": {"task": 1.0, "timestep_scaling": False}}
    assert data["passes"][4]["options"] == {"teacher": "self"}  # the pass had no options at all
    assert [p["options"]["ratio"] for p in data["passes"][2:4]] == [0.5, 0.25]


def test_nested_mappings_are_created_and_later_sets_win():
    data = _set("recover.train.optim.lr=1e-5", "recover.new.deep.x=[2, 14]", "seed=1", "seed=2")
    assert data["passes"][1]["options"]["train"] == {"steps": 1600, "optim": {"lr": 1e-5}}
    assert data["passes"][1]["options"]["new"] == {"deep": {"x": [2, 14]}}
    assert data["seed"] == 2


def test_null_removes_the_key_so_the_default_applies():
    data = _set("block_prune.robust_training=null", "seed=null", "recover.nothing.here=null")
    assert "robust_training" not in data["passes"][0]["options"] and "seed" not in data
    assert "nothing" not in data["passes"][1]["options"]  # removing under a missing mapping creates nothing
    # a null option can be filled in again by a later override
    data = _set("block_prune.robust_training=null", "block_prune.robust_training.train.steps=5")
    assert data["passes"][0]["options"]["robust_training"] == {"train": {"steps": 5}}


@pytest.mark.parametrize("text, fragment", [
    ("seed", "expected KEY=VALUE"),
    ("=1", "expected KEY=VALUE"),
    ("nosuch.x=1", "passes: block_prune, recover, channel_prune, channel_prune, step_distill"),
    ("channel_prune.ratio=0.3", "occurs 2 times (passes[2], passes[3]); name one by position, e.g. passes[2].options.ratio"),
    ("recover=1", "name an option of pass 'recover'"),
    ("passes[9].options.x=1", "passes[9] does not exist"),
    ("targets[5]=x", "targets[5] does not exist"),
    ("targets[0]=null", "null cannot remove a list item"),
    ("seed.x=1", "seed is 0, not a mapping"),
    ("a..b=1", "bad KEY segment"),
    ("seed=[1,", "is not valid YAML"),
])
def test_bad_overrides_are_one_line_usage_errors(text, fragment):
    with pytest.raises(UsageError) as exc:
        _set(text)
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg, msg


RECIPE = """name: sets
model: arch:tiny
passes:
  - pass: remove_blocks
    options: {component: unet, blocks: [mid_block]}
  - pass: channel_prune
    options: {component: vae_decoder, ratio: 0.5}
  - pass: channel_prune
    options: {component: vae_decoder, ratio: 0.5}
export: {coreml: false, onnx: false}
quality: {enabled: false}
output: {save_model: false}
"""


@pytest.fixture()
def recipe(tmp_path) -> Path:
    (tmp_path / "r.yaml").write_text(RECIPE)
    return tmp_path / "r.yaml"


def _cli(args, capsys) -> tuple[int, list[str]]:
    from snapopt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["apply", *map(str, args)])
    return exc.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_load_recipe_validates_the_overridden_recipe(recipe):
    resolved = load_recipe(recipe, sets=["seed=7", "passes[2].options.ratio=0.25", "remove_blocks.blocks=[mid_block]"])
    assert resolved.recipe.seed == 7 and resolved.passes[2].options.ratio == 0.25 and resolved.passes[1].options.ratio == 0.5
    assert resolved.sets == ["seed=7", "passes[2].options.ratio=0.25", "remove_blocks.blocks=[mid_block]"]
    assert load_recipe(recipe, {"model": "arch:tiny"}).sets == []  # --model alone still works


@pytest.mark.parametrize("sets, fragment", [
    (["seed"], "error: --set 'seed': expected KEY=VALUE"),
    (["nosuch.x=1"], "(passes: remove_blocks, channel_prune, channel_prune)"),
    (["channel_prune.ratio=0.3"], "pass 'channel_prune' occurs 2 times (passes[1], passes[2]); name one by position"),
    (["remove_blocks.bogus=1"], "passes[0].options.bogus: unknown key (from --set remove_blocks.bogus=1)"),
    (["passes[1].options.ratio=2"], "passes[1].options.ratio: Input should be less than 1 (got 2) (from --set passes[1].options.ratio=2)"),
    (["batch=0"], "batch: Input should be greater than or equal to 1 (got 0) (from --set batch=0)"),
])
def test_cli_bad_overrides_exit_2_with_one_line(recipe, sets, fragment, capsys, tmp_path):
    args = [recipe, "--out", tmp_path / "run"]
    for s in sets:
        args += ["--set", s]
    code, err = _cli(args, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))  # refused before anything ran


def test_resume_compares_the_effective_recipe(recipe, tmp_path, capsys):
    """The work folder's fingerprint hashes the resolved recipe, so an override that changes it is refused on
    --resume and one that leaves it as it was (seed=0 is the default) is the same run; the report records it."""
    from snapopt.checks.output import work_folder
    from snapopt.work_folder import recipe_fingerprint

    same = recipe_fingerprint(load_recipe(recipe, sets=["seed=0"]))
    assert same == recipe_fingerprint(load_recipe(recipe))
    assert recipe_fingerprint(load_recipe(recipe, sets=["seed=5"])) != same

    out = tmp_path / "runs" / "run"
    work = work_folder(out)
    (work / ".resume").mkdir(parents=True)
    (work / ".resume" / "journal.json").write_text(json.dumps({"format": 1, **same, "passes": [], "components": {}}))
    code, err = _cli([recipe, "--out", out, "--resume", "--set", "seed=5"], capsys)
    assert code == 2 and len(err) == 1 and "different recipe" in err[0], err
    assert (work / ".resume" / "journal.json").is_file()  # refused: nothing removed

    sets = ["seed=0", "passes[2].options.ratio=0.25", "verify.enabled=false"]
    assert recipe_fingerprint(load_recipe(recipe, sets=sets)) != same  # the journal names the run with these
    (work / ".resume" / "journal.json").write_text(json.dumps(
        {"format": 1, **recipe_fingerprint(load_recipe(recipe, sets=sets)), "passes": [], "components": {}}))
    args = [recipe, "--out", out, "--resume", "--json"]
    for s in sets:
        args += ["--set", s]
    code, err = _cli(args, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["overrides"] == sets and json.loads((out / "manifest.json").read_text())["overrides"] == sets
    assert report["recipe"]["passes"][2]["options"]["ratio"] == 0.25 and report["recipe"]["verify"]["enabled"] is False
    assert [p["stats"]["requested_ratio"] for p in report["passes"][1:]] == [0.5, 0.25]  # the override is what ran
    md = (out / "report.md").read_text()
    assert "`--set passes[2].options.ratio=0.25`" in md and "## Recipe" in md and "ratio: 0.25" in md


def test_fuzzed_overrides_fail_only_with_one_line_usage_errors(recipe):
    """Random keys (fields, pass names, positions, nesting) and values: each override either gives a valid recipe
    or a one-line UsageError, never another exception."""
    import random

    rng = random.Random(0)
    heads = ["seed", "batch", "export", "quality", "targets[0]", "targets[3]", "passes[0]", "passes[2]", "passes[7]",
             "remove_blocks", "channel_prune", "nosuch", "name", "output", "verify", "1bad", "", "passes"]
    tails = ["", ".options", ".options.ratio", ".ratio", ".blocks", ".blocks[0]", ".component", ".x.y", ".enabled",
             ".steps", ".pass", "[0]", ".options.train.steps", ".onnx"]
    values = ["1", "0", "-1", "null", "true", "1e-4", "[1, 2]", "{a: 1}", "unet", "''", "[", "{a: 1, a: 2}", "2.5", "x=y"]
    outcomes = {"ok": 0, "usage": 0}
    for _ in range(100):
        text = f"{rng.choice(heads)}{rng.choice(tails)}={rng.choice(values)}"
        try:
            load_recipe(recipe, sets=[text])
            outcomes["ok"] += 1
        except UsageError as exc:
            assert "\n" not in str(exc) and str(exc), text
            outcomes["usage"] += 1
    assert outcomes["ok"] >= 2 and outcomes["usage"] >= 50, outcomes  # both kinds were exercised
