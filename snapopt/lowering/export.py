"""Lower a pipeline's components for the recipe's targets: Core ML packages (Apple's interface) and checked ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snapopt.lowering.interfaces import Shapes


def lower_exports(pipe, resolved, shapes: Shapes, folder: Path, stage) -> dict[str, Any]:
    from snapopt.lowering import coreml, onnx

    spec = resolved.recipe.export
    wanted = [c for c in spec.components if c in pipe.components()]
    result: dict[str, Any] = {"coreml": [], "onnx": [], "resources": []}
    if spec.coreml and wanted:
        target = min(resolved.targets, key=lambda t: t.ios_major) if resolved.targets else None
        deployment = target.coreml_deployment_target() if target else None
        result["coreml_deployment_target"] = deployment.name if deployment is not None else "iOS16"
        res = folder / "coreml"
        for comp in wanted:
            with stage(f"lower {comp} to Core ML"):
                info = coreml.lower_component(pipe, comp, shapes, res, deployment_target=deployment, weight_bits=spec.weight_bits,
                                              compute_units=target.profile.compute_units if target else "CPU_AND_NE")
                info["file"] = str(Path(info.pop("path")).relative_to(folder.parent))
                result["coreml"].append(info)
        result["resources"] = coreml.write_tokenizer_resources(pipe, res)
    if spec.onnx and wanted:
        for comp in wanted:
            with stage(f"export {comp} to ONNX"):
                info = onnx.export_onnx(pipe, comp, shapes, folder / "onnx", check=spec.onnx_check)
                info["file"] = str(Path(info.pop("path")).relative_to(folder.parent))
                result["onnx"].append(info)
    return result
