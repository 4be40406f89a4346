"""Shared fixtures: tiny models (SD-v1.5's layout, narrow channels) so every test runs in seconds."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "0")
warnings.filterwarnings("ignore")
torch.set_num_threads(1)  # tiny models gain nothing from threads; oversubscribed threads cost seconds

@pytest.fixture(scope="session")
def bench_module():
    """``bench_module("chain_claims")``: a bench/ script imported by file (bench/ is scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


BK_BASE = [f"down_blocks.{i}.{k}.1" for i in range(3) for k in ("resnets", "attentions")] + [
    "down_blocks.3.resnets.1", "up_blocks.0.resnets.1"] + [f"up_blocks.{i}.{k}.1" for i in (1, 2, 3) for k in ("resnets", "attentions")]
BK_SMALL = BK_BASE + ["mid_block"]
BK_TINY = BK_SMALL + ["stage:3"]


@pytest.fixture(scope="session")
def tiny_pipe():
    from snapopt.models import load_model

    return load_model("arch:tiny", seed=0)


@pytest.fixture()
def tiny(tiny_pipe):
    """A private copy of the tiny pipeline a test may mutate."""
    return tiny_pipe.clone()


@pytest.fixture(scope="session")
def tiny_shapes(tiny_pipe):
    from snapopt.lowering.interfaces import Shapes

    return Shapes(resolution=tiny_pipe.resolution, batch=2)


@pytest.fixture()
def tripwire(monkeypatch):
    """Fail loudly if validation lets a bad input reach the run itself (model loading)."""
    import snapopt.models.loading
    import snapopt.run

    def boom(*a, **k):
        raise AssertionError("bad input reached snapopt.run.apply / load_model")

    monkeypatch.setattr(snapopt.run, "apply", boom)
    monkeypatch.setattr(snapopt.models.loading, "load_model", boom)
