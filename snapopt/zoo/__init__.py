"""Embedded teacher models ("zoo:<name>") that ship inside the package, with their evaluators.

No Stable Diffusion weights can be downloaded where snapopt is built and tested, so the zoo holds a
small, really trained text-to-image latent diffusion model with SD-v1.5's block layout (see docs/zoo.md).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
_MODELS = ("snapshapes",)


class UnknownZooModel(ValueError):
    """Raised for a zoo name that the package does not ship."""


def available() -> list[str]:
    """Names of the shipped zoo pipelines (usable as ``zoo:<name>``)."""
    return [name for name in _MODELS if (WEIGHTS_DIR / name / "model_index.json").exists()]


def zoo_path(name: str) -> Path:
    """Folder of a shipped zoo pipeline, loadable with ``StableDiffusionPipeline.from_pretrained``."""
    name = name.removeprefix("zoo:")
    if name not in available():
        raise UnknownZooModel(f"unknown zoo model {name!r}; available: {', '.join(available()) or 'none'}")
    return WEIGHTS_DIR / name


__all__ = ["UnknownZooModel", "available", "zoo_path", "WEIGHTS_DIR"]
