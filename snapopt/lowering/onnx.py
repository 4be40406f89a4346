"""ONNX lowering: ``torch.onnx.export`` (dynamo) → onnxscript's optimizer → onnxsim → checked against torch in onnxruntime."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snapopt.errors import LoweringError
from snapopt.lowering.interfaces import Shapes
from snapopt.models.pipeline import Pipeline

_PROTOBUF_LIMIT = 2 * 1024**3


@contextlib.contextmanager
def _single_output_rules():
    """Run onnxscript's default rewrite rules without those whose pattern has several output nodes.

    onnxscript matches such a pattern (today only ``SlicesSplit``: two last-axis Slices of one tensor → Split) by
    brute force, rebuilding an op index of the whole graph for every node it tries and pairing every Slice with every
    other: quadratic in the graph. On the split-einsum UNet (770 Slices, one per head) that was 57 of the 93 s the
    ONNX export took on 2 CPU cores, and it rewrote nothing; the rest of the optimizer is unchanged. When the rule
    would have fired, the graph keeps two Slices instead of a Split: the same values, checked in ONNX Runtime."""
    try:
        from onnxscript import rewriter
        rules = rewriter._DEFAULT_REWRITE_RULES
        kept = tuple(r for r in rules if getattr(getattr(r, "_target_pattern", None), "has_single_output_node", True))
    except (ImportError, AttributeError):  # another onnxscript: its own optimizer, unchanged
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = kept
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def to_onnx(module, example_inputs, input_names, output_names, *, external_data: bool = False, fast: bool = True):
    """``torch.onnx.export`` (dynamo) with onnxscript's optimizer, ``fast`` without its quadratic multi-output rules
    (:func:`_single_output_rules`). ``module`` may be an ``ExportedProgram`` already captured for Core ML."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, example_inputs, dynamo=True, input_names=input_names, output_names=output_names,
                                    verbose=False, external_data=external_data, optimize=not fast)
        if fast:
            with _single_output_rules():
                program.optimize()
    return program


def export_onnx(pipe: Pipeline, component: str, shapes: Shapes, out_dir: Path, *, simplify: bool = True,
                check: bool = True, io=None, name: str | None = None, program=None) -> dict[str, Any]:
    """Export ``component`` with the interface the Core ML package has (:func:`snapopt.lowering.apple.apple_io`),
    so ONNX Runtime checks the same graph the phone runs; ``io``/``name`` export a UNet chunk instead.

    ``program``: the ``torch.export`` capture of ``io.module`` at ``io.example_inputs`` when the caller already has
    it (the Core ML lowering makes the same one), so the model is traced once."""
    from snapopt.lowering.apple import apple_io

    if pipe.structure_only:
        raise LoweringError(f"cannot export '{component}' of a structure-only model to ONNX: load it with weights")
    io = io or apple_io(pipe, component, shapes)
    return export_io(io, component, out_dir, simplify=simplify, check=check, name=name, program=program)


def export_io(io, component: str, out_dir: Path, *, simplify: bool = True, check: bool = True, name: str | None = None,
              program=None) -> dict[str, Any]:
    """:func:`export_onnx` of an interface already made (what the export worker receives)."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or io.package_name}.onnx"
    big = sum(p.numel() * 4 for p in io.module.parameters()) >= _PROTOBUF_LIMIT
    try:
        onnx_program = to_onnx(program if program is not None else io.module, io.example_inputs, io.input_names,
                               io.output_names, external_data=big)
        onnx_program.save(str(path), external_data=big)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise LoweringError(f"ONNX export of '{component}' failed: {first}") from exc
    info: dict[str, Any] = {"component": component, "package": path.stem, "path": str(path), "simplified": False}
    if simplify and not big:
        import onnxsim

        model = onnx.load(str(path))
        nodes_before = len(model.graph.node)
        simplified, ok = onnxsim.simplify(model)
        if ok:
            onnx.save(simplified, str(path))
            info.update(simplified=True, nodes_before=nodes_before, nodes_after=len(simplified.graph.node))
    elif big:
        info["simplify_skipped"] = "model exceeds protobuf's 2 GB limit; saved with external data"
    info["bytes"] = sum(f.stat().st_size for f in out_dir.glob(path.stem + "*") if f.is_file())
    if check:
        info["onnxruntime_relative_error"] = check_onnxruntime(path, io)
    return info


def check_onnxruntime(path: Path, io) -> float:
    """Max over outputs of ‖ort − torch‖/‖torch‖ on the interface's example inputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for name, t in zip(io.input_names, io.example_inputs):
        feeds[name] = t.numpy()
    got = sess.run(None, feeds)
    with torch.no_grad():
        ref = io.module(*io.example_inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    errs = []
    for g, r in zip(got, ref):
        r = r.float().numpy()
        errs.append(float(np.linalg.norm(g.astype(np.float64) - r) / max(np.linalg.norm(r), 1e-12)))
    return max(errs)
