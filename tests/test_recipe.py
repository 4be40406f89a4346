"""Recipes are validated whole before anything runs: one line naming the field, exit 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

from snapopt.errors import RecipeError
from snapopt.recipe import load_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data, message", [
    ({"name": "x", "modle": "arch:tiny"}, "modle: unknown key"),
    ({"name": "x", "batch": "two"}, "batch: Input should be a valid integer"),
    ({"name": "x", "resolution": 100}, "resolution: Input should be a multiple of 8"),
    ({"name": "x", "passes": [{"pass": "no_such_pass"}]}, "passes[0].pass: unknown pass 'no_such_pass'"),
    ({"name": "x", "passes": [{"pass": "remove_blocks", "options": {"blokcs": []}}]}, "passes[0].options.blokcs: unknown key"),
    ({"name": "x", "passes": [{"pass": "remove_blocks", "options": {"blocks": "mid_block"}}]}, "passes[0].options.blocks: Input should be a valid list"),
    ({"name": "x", "targets": ["iphone-99"]}, "targets[0]: unknown target 'iphone-99'"),
    ({"name": "x", "model": "arch:sd-9"}, "model: unknown architecture preset"),
    ({"name": "x", "export": {"components": ["unet", "vae"]}}, "export.components[1]: Input should be"),
])
def test_invalid_recipes_name_the_field(data, message):
    with pytest.raises(RecipeError) as exc:
        validate_recipe({"model": "arch:tiny", **data})
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_shipped_recipes_validate():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        resolved = load_recipe(path)
        assert resolved.recipe.name == path.stem
        assert resolved.to_dict()["passes"] == [{"pass": p.name, "options": p.options.model_dump(mode="json")} for p in resolved.passes]


def test_cli_bad_recipe_exits_2_and_writes_nothing(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\nmodel: arch:tiny\npasses:\n  - pass: remove_blocks\n    options: {blocks: [mid_block], colour: red}\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "snapopt.cli", "apply", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {recipe}: passes[0].options.colour: unknown key"]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [recipe]


def test_cli_invalid_yaml(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: x\npasses: [\n")
    proc = subprocess.run([sys.executable, "-m", "snapopt.cli", "apply", str(recipe)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "invalid YAML" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
