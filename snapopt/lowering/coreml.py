"""Core ML lowering: torch.export → ``run_decompositions({})`` → coremltools ML program.

fp16 compute, fixed shapes, minimum deployment target from the target, Apple ml-stable-diffusion's tensor
and package names (see :mod:`snapopt.lowering.interfaces`). Works for any UNet structure the capture
handles, pruned ones included (Apple's own converter rejects a UNet without a mid block).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snapopt.capture.export import export_component
from snapopt.errors import LoweringError
from snapopt.lowering.interfaces import Shapes, component_io
from snapopt.models.pipeline import Pipeline


def _quiet_coremltools():
    """coremltools logs missing macOS-only runtime libraries and draws tqdm bars for every MIL pass;
    snapopt shows its own progress, so keep the terminal readable."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="coremltools")

@contextlib.contextmanager
def _silenced():
    """Swallow coremltools' per-pass progress bars and macOS-runtime notices (stderr), keep exceptions."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def import_coremltools():
    _quiet_coremltools()
    with _silenced():
        import coremltools

    return coremltools


def _strip_aliases(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``aten.alias`` (a no-op view) has no coremltools lowering; route its users to its input."""
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in (torch.ops.aten.alias.default, torch.ops.aten.alias_copy.default):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    ep.graph_module.recompile()
    return ep


def convert_component(pipe: Pipeline, component: str, shapes: Shapes, *, deployment_target=None,
                      weight_bits: int = 16, compute_units: str = "CPU_AND_NE"):
    """Return the converted ``ct.models.MLModel`` (not yet saved)."""
    ct = import_coremltools()
    if pipe.structure_only:
        raise LoweringError(f"cannot lower '{component}' of a structure-only model: load it with weights")
    target = deployment_target or ct.target.iOS16
    io = component_io(pipe, component, shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = _strip_aliases(export_component(io).run_decompositions({}))
    fp16_io = target >= ct.target.iOS16
    inputs = []
    for name, t in zip(io.input_names, io.example_inputs):
        if t.dtype in (torch.int32, torch.int64):
            dtype = np.int32
        else:
            dtype = np.float16 if fp16_io else np.float32
        inputs.append(ct.TensorType(name=name, shape=tuple(t.shape), dtype=dtype))
    outputs = [ct.TensorType(name=n, dtype=np.float16 if fp16_io else np.float32) for n in io.output_names]
    try:
        with warnings.catch_warnings(), _silenced():
            warnings.simplefilter("ignore")
            model = ct.convert(
                ep, inputs=inputs, outputs=outputs, convert_to="mlprogram", minimum_deployment_target=target,
                compute_precision=ct.precision.FLOAT16, compute_units=getattr(ct.ComputeUnit, compute_units),
                skip_model_load=True,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise LoweringError(f"Core ML conversion of '{component}' failed: {first}") from exc
    if weight_bits < 16:
        with _silenced():
            model = palettize(model, weight_bits)
    import snapopt

    model.author = "snapopt"
    model.short_description = f"{io.package_name} of {pipe.source}, lowered by snapopt {snapopt.__version__}"
    model.user_defined_metadata["snapopt.source"] = pipe.source
    model.user_defined_metadata["snapopt.component"] = component
    return model


def palettize(model, bits: int):
    """Palettize weights to ``bits`` (k-means LUT): what lets a full UNet fit iOS's per-model size limit."""
    import coremltools.optimize.coreml as cto

    config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(nbits=bits, mode="kmeans", weight_threshold=2048))
    return cto.palettize_weights(model, config)


def interface_of(path: Path) -> dict[str, Any]:
    """Input/output names, shapes and types read back from a saved package's spec."""
    ct = import_coremltools()
    spec = ct.utils.load_spec(str(path))
    def desc(features):
        out = {}
        for f in features:
            arr = f.type.multiArrayType
            dtype = {65552: "float16", 65568: "float32", 131104: "int32"}.get(arr.dataType, str(arr.dataType))
            out[f.name] = {"shape": [int(s) for s in arr.shape], "dtype": dtype}
        return out
    return {"inputs": desc(spec.description.input), "outputs": desc(spec.description.output),
            "specification_version": spec.specificationVersion}


def lower_component(pipe: Pipeline, component: str, shapes: Shapes, out_dir: Path, **kw) -> dict[str, Any]:
    """Convert and save ``<out_dir>/<PackageName>.mlpackage``; return what the report needs."""
    from snapopt.lowering.interfaces import PACKAGE_NAMES

    model = convert_component(pipe, component, shapes, **kw)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{PACKAGE_NAMES[component]}.mlpackage"
    model.save(str(path))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"component": component, "path": str(path), "bytes": size, **interface_of(path)}


def write_tokenizer_resources(pipe: Pipeline, out_dir: Path) -> list[str]:
    """``vocab.json`` and ``merges.txt`` beside the packages, as Apple's Swift pipeline expects."""
    if pipe.tokenizer is None:
        return []
    from snapopt.models.tokenizer import write_bpe_files

    return write_bpe_files(pipe.tokenizer, out_dir)
