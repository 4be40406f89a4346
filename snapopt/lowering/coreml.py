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
from snapopt.lowering.interfaces import Shapes
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
                      weight_bits: int = 16, compute_units: str = "CPU_AND_NE", io=None,
                      compression: dict[str, Any] | None = None, program=None):
    """Return the converted ``ct.models.MLModel`` (not yet saved), with Apple's Swift interface
    (:func:`snapopt.lowering.apple.apple_io`): fp16 UNet/VAE inputs, float32 ``input_ids``, fp32 outputs.

    ``program``: ``io``'s ``torch.export`` capture when the caller has it (shared with the ONNX export; left intact:
    ``run_decompositions`` returns a new program)."""
    from snapopt.lowering.apple import apple_io

    ct = import_coremltools()
    if pipe.structure_only:
        raise LoweringError(f"cannot lower '{component}' of a structure-only model: load it with weights")
    target = deployment_target or ct.target.iOS16
    io = io or apple_io(pipe, component, shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = _strip_aliases((program if program is not None else export_component(io)).run_decompositions({}))
    fp16_io = target >= ct.target.iOS16
    inputs = []
    for name, t in zip(io.input_names, io.example_inputs):
        if t.dtype in (torch.int32, torch.int64):
            dtype = np.int32
        elif name == "input_ids":
            dtype = np.float32  # Swift sends Float32 ids; Apple's converter declares them so
        else:
            dtype = np.float16 if fp16_io else np.float32
        inputs.append(ct.TensorType(name=name, shape=tuple(t.shape), dtype=dtype))
    outputs = [ct.TensorType(name=n, dtype=np.float32) for n in io.output_names]
    try:
        with warnings.catch_warnings(), _silenced():
            warnings.simplefilter("ignore")
            model = ct.convert(
                ep, inputs=inputs, outputs=outputs, convert_to="mlprogram", minimum_deployment_target=target,
                compute_precision=ct.precision.FLOAT16, compute_units=getattr(ct.ComputeUnit, compute_units),
                skip_model_load=True, pass_pipeline=_pass_pipeline(ct, component),
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise LoweringError(f"Core ML conversion of '{component}' failed: {first}") from exc
    compression = compression or ({"scheme": "palettize", "bits": weight_bits} if weight_bits < 16 else {"scheme": "fp16", "bits": 16})
    if compression["scheme"] != "fp16":
        try:
            with _silenced(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = compress(model, compression, component=component, pipe=pipe)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise LoweringError(f"compressing '{component}' ({compression['scheme']}) failed: {first}") from exc
    import snapopt

    model.author = "snapopt"
    model.short_description = f"{io.package_name} of {pipe.source}, lowered by snapopt {snapopt.__version__}"
    model.user_defined_metadata["snapopt.source"] = pipe.source
    model.user_defined_metadata["snapopt.component"] = component
    return model


def _pass_pipeline(ct, component: str):
    """coremltools' default passes, except that token ids must not go through int16.

    For iOS 17+ ``common::add_int16_cast`` casts the float32 ids to int16 before the embedding gather:
    CLIP's ids reach 49407, past int16's 32767, so they would wrap to wrong embeddings."""
    pipeline = ct.PassPipeline.DEFAULT
    if component == "text_encoder":
        pipeline.remove_passes(["common::add_int16_cast"])
    return pipeline


def palettize(model, bits: int, group_size: int = 0):
    """Palettize weights to ``bits`` (k-means LUT): what lets a full UNet fit iOS's per-model size limit.
    ``group_size`` > 0 gives one LUT per that many output channels (needs iOS 18)."""
    import coremltools.optimize.coreml as cto

    if group_size:
        op = cto.OpPalettizerConfig(nbits=bits, mode="kmeans", granularity="per_grouped_channel", group_size=group_size,
                                    weight_threshold=2048)
    else:
        op = cto.OpPalettizerConfig(nbits=bits, mode="kmeans", weight_threshold=2048)
    return cto.palettize_weights(model, cto.OptimizationConfig(global_config=op))


def quantize_int8(model):
    """Linear symmetric int8 weights, one scale per output channel (iOS 16+; dequantized to fp16 at load unless
    the chip computes int8)."""
    import coremltools.optimize.coreml as cto

    op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=2048)
    return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op))


def compress(model, compression: dict[str, Any], *, component: str | None = None, pipe: Pipeline | None = None):
    """Apply :func:`snapopt.lowering.export.compression_plan`'s choice to a converted model.

    ``mixed`` and ``w8a8`` act per layer on the UNet (its recipe / activation scales come from
    :func:`snapopt.lowering.schemes.prepare_scheme`); the other components get the scheme's uniform weight part."""
    from snapopt.lowering import compression as cmp

    scheme = compression["scheme"]
    if scheme == "int8":
        return quantize_int8(model)
    if scheme.startswith("palettize"):
        return palettize(model, compression["bits"], compression.get("group_size", 0))
    if scheme == "mixed":
        if component == "unet" and pipe is not None and "recipe" in compression:
            return cmp.palettize_mixed(model, pipe.unet, compression["recipe"])
        return palettize(model, uniform_bits(compression["bits"]))
    if scheme == "w8a8":
        if component == "unet" and pipe is not None and "act_scales" in compression:
            return cmp.quantize_w8a8(model, pipe.unet, compression["act_scales"])
        return quantize_int8(model)
    raise LoweringError(f"unknown compression scheme '{scheme}'")


def uniform_bits(average: float) -> int:
    """The Neural Engine palettization width a mixed scheme gives components outside its per-layer recipe:
    the smallest accelerated width at or above the target average."""
    from snapopt.lowering.compression import NBITS

    return next((b for b in NBITS if b >= average), 8)


#: Core ML ArrayFeatureType data types (``FeatureTypes.proto``).
DTYPES = {65552: "float16", 65568: "float32", 65600: "float64", 131104: "int32", 131080: "int8"}


def interface_of(path: Path) -> dict[str, Any]:
    """Input/output names, shapes and types read back from a saved package's spec."""
    ct = import_coremltools()
    spec = ct.utils.load_spec(str(path))
    return interface_of_spec(spec)


def interface_of_spec(spec) -> dict[str, Any]:
    def desc(features):
        out = {}
        for f in features:
            arr = f.type.multiArrayType
            dtype = DTYPES.get(arr.dataType, str(arr.dataType))
            out[f.name] = {"shape": [int(s) for s in arr.shape], "dtype": dtype}
        return out
    return {"inputs": desc(spec.description.input), "outputs": desc(spec.description.output),
            "specification_version": spec.specificationVersion}


def package_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def lower_component(pipe: Pipeline, component: str, shapes: Shapes, out_dir: Path, *, name: str | None = None,
                    **kw) -> dict[str, Any]:
    """Convert and save ``<out_dir>/<name or PackageName>.mlpackage``; return what the report needs."""
    from snapopt.lowering.interfaces import PACKAGE_NAMES

    model = convert_component(pipe, component, shapes, **kw)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or PACKAGE_NAMES[component]}.mlpackage"
    model.save(str(path))
    return {"component": component, "package": path.stem, "path": str(path), "bytes": package_bytes(path), **interface_of(path)}
