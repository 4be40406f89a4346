"""Core AI lowering: torch.export → coreai-torch → ``<Name>.aimodel``, checked in ``coreai.runtime``.

Apple's newer on-device stack (coreai-torch 0.4.3, coreai-core 1.0.0b3). Every component is lowered through the
same Apple interface wrappers as Core ML (:func:`snapopt.lowering.apple.apple_io`: tensor names, 8-channel
encoder, folded latent scale, float32 ids), with fp32 inputs and outputs. On Linux ``coreai.runtime`` executes an
asset through its reference interpreter (``AIModelAsset.executable()`` writes an ``.aimodelx`` and loads it), so
exports are checked numerically against torch here, as ONNX Runtime checks the ONNX exports. Specialisation for
the Neural Engine/GPU happens on Apple hardware at load time and cannot be checked on Linux.
"""

from __future__ import annotations

import asyncio
import dataclasses
import contextlib
import io as _io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snapopt.errors import LoweringError, UsageError
from snapopt.lowering.interfaces import PACKAGE_NAMES, ComponentIO, Shapes
from snapopt.models.pipeline import Pipeline

PINS = "coreai-torch==0.4.3 coreai-opt==0.4.0 (coreai-core==1.0.0b3 comes with them; pip install --pre)"


def _import():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coreai_torch
            from coreai.runtime import NDArray
    except ImportError as exc:
        raise LoweringError(f"export.coreai needs Apple's Core AI packages: pip install --pre {PINS.split(' (')[0]} ({exc})") from None
    return coreai_torch, NDArray


def convert(io: ComponentIO, path: Path):
    """Convert ``io`` and save ``path`` (an ``.aimodel`` folder); return the ``AIModelAsset``."""
    coreai_torch, _ = _import()
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(_io.StringIO()), \
                contextlib.redirect_stderr(_io.StringIO()):
            warnings.simplefilter("ignore")
            ep = torch.export.export(io.module, io.example_inputs, strict=False).run_decompositions(coreai_torch.get_decomp_table())
            program = coreai_torch.TorchConverter().add_exported_program(
                ep, input_names=io.input_names, output_names=io.output_names).to_coreai()
            return program.save_asset(path)
    except LoweringError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise LoweringError(f"Core AI conversion of '{io.component}' failed: {first}") from exc


def run_asset(asset, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute the asset's ``main`` function in ``coreai.runtime`` (works on Linux and macOS)."""
    _, NDArray = _import()

    async def go():
        async with asset.executable() as model:
            fn = model.load_function("main")
            out = await fn({k: NDArray(np.ascontiguousarray(v)) for k, v in feeds.items()})
            return {k: v.numpy() for k, v in out.items()}

    with contextlib.redirect_stdout(_io.StringIO()), contextlib.redirect_stderr(_io.StringIO()), _native_output_silenced():
        return asyncio.run(go())


@contextlib.contextmanager
def _native_output_silenced():
    """The runtime's interpreter prints "ODIE [default]: Loading function 'main'" from native code, past
    ``sys.stdout``: point file descriptors 1 and 2 at /dev/null while it runs (Python exceptions still propagate)."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _outputs(module, io: ComponentIO) -> list[np.ndarray]:
    with torch.no_grad():
        ref = module(*io.example_inputs)
    return [r.float().numpy().astype(np.float64) for r in (ref if isinstance(ref, tuple) else (ref,))]


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))


def compare(asset, io: ComponentIO, *references) -> list[dict[str, float]]:
    """Run the asset once on the example inputs; per reference module, the worst output's relative error and PSNR
    (peak |reference| over RMS error, as the Core ML compression rows measure)."""
    from snapopt.lowering.compression import psnr

    got = run_asset(asset, {n: t.numpy() for n, t in zip(io.input_names, io.example_inputs)})
    out = []
    for module in references:
        ref = _outputs(module, io)
        pairs = [(got[n].astype(np.float64), r) for n, r in zip(io.output_names, ref)]
        out.append({"relative_error": max(_rel(g, r) for g, r in pairs),
                    "psnr_db": min(psnr(torch.from_numpy(r), torch.from_numpy(g)) for g, r in pairs)})
    return out


def relative_error(asset, io: ComponentIO) -> float:
    """Max over outputs of ‖coreai − torch‖/‖torch‖ on the interface's example inputs."""
    return compare(asset, io, io.module)[0]["relative_error"]


def lower_component(pipe: Pipeline, component: str, shapes: Shapes, out_dir: Path, *, name: str | None = None,
                    io: ComponentIO | None = None, check: bool = True, compression: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert and save ``<out_dir>/<name>.aimodel``; with ``check``, run it in ``coreai.runtime`` against torch.

    With ``compression`` (a :func:`snapopt.lowering.export.compression_plan`), the weights go through coreai-opt
    first (:mod:`snapopt.lowering.coreai_compress`) and the check also compares the asset with the fp32 torch model
    (the scheme's quality) and with coreai-opt's torch simulation of the scheme (what the runtime must reproduce)."""
    from snapopt.lowering.apple import apple_io
    from snapopt.lowering.coreml import package_bytes

    if pipe.structure_only:
        raise LoweringError(f"cannot lower '{component}' of a structure-only model to Core AI: load it with weights")
    io = io or apple_io(pipe, component, shapes)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or PACKAGE_NAMES[component]}.aimodel"
    sim = None
    if compression is not None:
        from snapopt.lowering import coreai_compress

        calib = None
        if component == "unet" and coreai_compress.component_plan(compression, component)["scheme"] == "w8a8":
            calib = coreai_compress.unet_calibration(pipe, io, shapes)
        try:
            module, sim, scheme = coreai_compress.compress_io(io, compression, component, recipe_module=pipe.unet, calibration=calib)
        except (LoweringError, UsageError):
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise LoweringError(f"compressing '{component}' for Core AI ({compression['scheme']}, coreai-opt) failed: {first}") from exc
        asset = convert(dataclasses.replace(io, module=module), path)
    else:
        asset = convert(io, path)
    info: dict[str, Any] = {
        "component": component, "package": path.stem, "path": str(path), "bytes": package_bytes(path),
        "inputs": {n: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for n, t in zip(io.input_names, io.example_inputs)},
        "outputs": list(io.output_names),
    }
    if compression is not None:
        info["compression"] = scheme
    if check and sim is not None:
        fp, simulated = compare(asset, io, io.module, sim)
        info["coreai_runtime_relative_error"] = fp["relative_error"]
        info["coreai_runtime_psnr_db"] = round(fp["psnr_db"], 2) if np.isfinite(fp["psnr_db"]) else "inf"
        info["coreai_runtime_vs_simulation_relative_error"] = simulated["relative_error"]
        info["simulation_relative_error"] = max(_rel(s, r) for s, r in zip(_outputs(sim, io), _outputs(io.module, io)))
    elif check:
        info["coreai_runtime_relative_error"] = relative_error(asset, io)
    return info
