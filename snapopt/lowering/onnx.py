"""ONNX lowering: ``torch.onnx.export`` (dynamo) → onnxsim → checked against torch in onnxruntime."""

from __future__ import annotations

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


def export_onnx(pipe: Pipeline, component: str, shapes: Shapes, out_dir: Path, *, simplify: bool = True,
                check: bool = True, io=None, name: str | None = None) -> dict[str, Any]:
    """Export ``component`` with the interface the Core ML package has (:func:`snapopt.lowering.apple.apple_io`),
    so ONNX Runtime checks the same graph the phone runs; ``io``/``name`` export a UNet chunk instead."""
    import onnx

    from snapopt.lowering.apple import apple_io

    if pipe.structure_only:
        raise LoweringError(f"cannot export '{component}' of a structure-only model to ONNX: load it with weights")
    io = io or apple_io(pipe, component, shapes)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or io.package_name}.onnx"
    big = sum(p.numel() * 4 for p in io.module.parameters()) >= _PROTOBUF_LIMIT
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(io.module, io.example_inputs, dynamo=True, input_names=io.input_names,
                                        output_names=io.output_names, verbose=False, external_data=big)
            program.save(str(path), external_data=big)
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
