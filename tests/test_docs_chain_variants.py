"""The GPU chain variants docs/training.md tells the next session to run are valid overrides of
recipes/snapfusion-train.yaml, exactly as written there (a typo would cost a device session)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_documented_chain_variants_validate():
    from snapopt.recipe import load_recipe

    text = (ROOT / "docs" / "training.md").read_text()
    variants = re.findall(r'^CHAIN_NAME=(\S+) CHAIN_SETS="([^"]*)" bash bench/device/chain\.sh', text, flags=re.M)
    assert len(variants) >= 3
    base = load_recipe(ROOT / "recipes" / "snapfusion-train.yaml").to_dict()
    for name, sets in variants:
        resolved = load_recipe(ROOT / "recipes" / "snapfusion-train.yaml", sets=shlex.split(sets))
        assert resolved.to_dict() != base, f"{name}: its overrides change nothing"
