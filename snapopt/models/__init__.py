"""Model references, architecture presets and the :class:`Pipeline` container."""

from snapopt.models.loading import build_preset, load_model
from snapopt.models.pipeline import COMPONENTS, Pipeline
from snapopt.models.presets import PRESETS

__all__ = ["COMPONENTS", "PRESETS", "Pipeline", "build_preset", "load_model"]
