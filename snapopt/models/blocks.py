"""Modules that stand in for blocks a pass removed or rewrote.

They are defined in :mod:`snapopt.models.portable` (the self-contained file saved beside a model's weights,
so a saved model reloads in plain diffusers) and re-exported here, one class each for snapopt and for the
saved folder."""

from __future__ import annotations

from snapopt.models.portable import LinearAsConv1x1, NullAttention, SeparableConv2d, SkippedBlock

__all__ = ["LinearAsConv1x1", "NullAttention", "SeparableConv2d", "SkippedBlock"]
