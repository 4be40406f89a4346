"""Graph capture: torch.export (analysis and Core ML) and ONNX (see :mod:`snapopt.lowering.onnx`)."""

from snapopt.capture.export import capture, export_component

__all__ = ["capture", "export_component"]


def block_graph(pipe, component: str, shapes):
    """Capture ``component`` at ``shapes`` and derive its block graph."""
    from snapopt.ir import build_block_graph

    io, ep = capture(pipe, component, shapes)
    return build_block_graph(component, io.module, ep, io.input_names)
