"""Capture a component as a torch.export ``ExportedProgram``.

Non-strict export: diffusers' UNets defeat ``torch.fx.symbolic_trace`` but export cleanly, and every aten
node keeps ``nn_module_stack`` so ops map back to the block that issued them.
"""

from __future__ import annotations

import warnings

import torch

from snapopt.errors import SnapoptError
from snapopt.lowering.interfaces import ComponentIO, Shapes, component_io
from snapopt.models.pipeline import Pipeline


def export_component(io: ComponentIO) -> torch.export.ExportedProgram:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(io.module, io.example_inputs, strict=False)
        except Exception as exc:  # torch raises many kinds; the user needs the component and the cause
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise SnapoptError(f"torch.export failed for component '{io.component}': {first}") from exc


def capture(pipe: Pipeline, component: str, shapes: Shapes) -> tuple[ComponentIO, torch.export.ExportedProgram]:
    io = component_io(pipe, component, shapes)
    return io, export_component(io)
