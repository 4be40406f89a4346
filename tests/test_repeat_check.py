"""bench/repeat_check.py: a recipe run twice, its saved weights compared tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_trained_recipe_repeats_bit_for_bit_on_the_cpu(bench_module, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: arch:tiny\ndeterministic: true\npasses:\n  - pass: recover\n"
                      "    options: {train: {steps: 2, batch: 2, data: {pool: 4}}, zoo_eval_prompts: 0}\n"
                      "export: {coreml: false, onnx: false}\nquality: {enabled: false}\n")
    summary = bench_module("repeat_check").main([str(recipe), "--json", str(tmp_path / "r.json")])
    assert summary["identical"] and summary["deterministic"] and summary["accelerator"] == {"device": "cpu"}
    again = summary["runs"][1]
    assert again["differing_tensors"] == 0 and again["tensors"] == summary["runs"][0]["tensors"] > 100
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(summary))
    assert not list(tmp_path.glob("run*"))  # the runs' folders are gone


def test_a_run_that_draws_fresh_randomness_is_reported_different(bench_module, tmp_path):
    (tmp_path / "jitter.py").write_text(
        "import os, torch\nfrom snapopt.core import Pass, PassResult\n"
        "class Jitter(Pass):\n    '''Adds noise seeded from the OS: differs on every run.'''\n    name = 'jitter'\n"
        "    def run(self, program, ctx):\n"
        "        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), 'little'))\n"
        "        with torch.no_grad():\n"
        "            w = program.unet.conv_out.weight\n"
        "            w.add_(1e-3 * torch.randn(w.shape, generator=gen))\n"
        "        return PassResult(program=program, modified=True)\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: arch:tiny\nplugins: [jitter.py]\npasses:\n  - pass: jitter\n"
                      "export: {coreml: false, onnx: false}\nquality: {enabled: false}\n")
    summary = bench_module("repeat_check").main([str(recipe)])
    run = summary["runs"][1]
    assert not summary["identical"] and not run["identical"]
    assert run["differing_tensors"] == 1 and "conv_out.weight" in run["examples"][0] and 0 < run["max_abs_diff"] < 0.1


def test_one_run_is_refused(bench_module, tmp_path):
    with pytest.raises(SystemExit, match="--runs must be at least 2"):
        bench_module("repeat_check").main([str(ROOT / "recipes" / "snapfusion.yaml"), "--runs", "1"])
