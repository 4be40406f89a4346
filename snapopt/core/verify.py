"""Program verification after each pass: it still runs at the recipe's shapes with finite outputs, and an
exact pass reproduces the previous outputs (relative error ``‖a−b‖/‖b‖`` within tolerance)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snapopt.lowering.interfaces import Shapes, component_io
from snapopt.models.pipeline import Pipeline


@dataclass
class Outputs:
    component: str
    tensors: tuple[torch.Tensor, ...]


def run_component(pipe: Pipeline, component: str, shapes: Shapes, seed: int = 0) -> Outputs:
    """Run a component through its interface on seeded inputs (fp32, CPU, no grad)."""
    io = component_io(pipe, component, shapes, seed=seed)
    with torch.no_grad():
        out = io.module(*io.example_inputs)
    tensors = out if isinstance(out, tuple) else (out,)
    return Outputs(component, tuple(t.detach().float() for t in tensors))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = b.norm().item()
    return (a - b).norm().item() / max(denom, 1e-12)


def check_finite(out: Outputs) -> str | None:
    for i, t in enumerate(out.tensors):
        if not torch.isfinite(t).all():
            return f"component '{out.component}' output {i} has non-finite values"
    return None


def compare(before: Outputs, after: Outputs) -> float:
    if len(before.tensors) != len(after.tensors):
        return float("inf")
    errs = []
    for a, b in zip(after.tensors, before.tensors):
        if a.shape != b.shape:
            return float("inf")
        errs.append(relative_error(a, b))
    return max(errs) if errs else 0.0
