"""Choosing blocks for a pass: by name, or by the latent resolution they run at (from the capture)."""

from __future__ import annotations

from snapopt.errors import UsageError


def select_blocks(program, component: str, shapes, *, kind: str, names: list[str] | None = None,
                  resolutions: list[int] | None = None, graph=None) -> list[str]:
    """Blocks of ``kind`` (``attention``, ``resnet`` …) named in ``names`` or running at one of
    ``resolutions`` (latent side, at ``shapes``), in execution order. Unknown names are errors. ``graph``:
    ``program``'s block graph at ``shapes`` when the caller has it (a pass: ``ctx.input_graph``), else captured."""
    if shapes is None:
        raise UsageError("block selection by resolution needs the recipe's shapes")
    if graph is None:
        from snapopt.capture import block_graph

        graph = block_graph(program, component, shapes)
    of_kind = [b for b in graph.blocks() if graph.node(b)["kind"] == kind]
    chosen = []
    for name in names or []:
        if name not in of_kind:
            raise UsageError(f"component '{component}' has no {kind} block '{name}' (see `snapopt inspect`)")
    for b in of_kind:
        if (names and b in names) or (resolutions and graph.node(b)["resolution"] in resolutions):
            chosen.append(b)
    if resolutions and not chosen and not names:
        present = sorted({graph.node(b)["resolution"] for b in of_kind if graph.node(b)["resolution"]})
        raise UsageError(f"no {kind} block of '{component}' runs at resolution {resolutions}; resolutions present: {present}")
    return chosen
