"""snapopt: a compiler-style toolchain that makes Stable Diffusion fast on specific iPhones.

Python API entry points::

    import snapopt
    pipe = snapopt.load_model("arch:tiny")          # or a folder, a hub id, zoo:snapshapes
    graph = snapopt.inspect(pipe, "unet")            # block IR (networkx) with params/MACs/bytes
    result = snapopt.apply("recipes/snapfusion.yaml", out="runs/sf")
    pipe = snapopt.load("runs/sf/model")             # reload an optimised model
"""

from __future__ import annotations

import logging as _logging

# torchao (pulled in by coreai-opt) logs "Skipping import of cpp extensions" on CPU torch when diffusers imports it.
_logging.getLogger("torchao").setLevel(_logging.ERROR)

__version__ = "0.1.0"

from pathlib import Path
from typing import Any


def load_model(ref: str, **kw):
    from snapopt.models.loading import load_model as _load

    return _load(ref, **kw)


def load(path: str | Path):
    """Reload a model folder written by a snapopt run."""
    from snapopt.serialization import load as _load

    return _load(path)


def inspect(pipe, component: str = "unet", *, resolution: int | None = None, batch: int = 1):
    from snapopt.capture import block_graph
    from snapopt.lowering.interfaces import Shapes

    return block_graph(pipe, component, Shapes(resolution=resolution or pipe.resolution, batch=batch))


def apply(recipe: str | Path, out: str | Path, *, overwrite: bool = False, resume: bool = False, **overrides: Any):
    """Run a recipe into ``out``; ``resume=True`` continues a killed run from its hidden ``.OUT.work`` folder."""
    from snapopt.recipe import load_recipe
    from snapopt.run import apply as _apply

    return _apply(load_recipe(recipe, overrides), Path(out), overwrite=overwrite, resume=resume)
