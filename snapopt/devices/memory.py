"""Memory fit: does a pipeline run within an iPhone's per-app memory limit, with every model resident or loaded
just in time (Apple's ``reduceMemory``)?

Per component (text encoder, UNet at the CFG batch, VAE decoder), predicted from the captured graph:

* load-time memory = weights at their stored bits. On iOS 17+ Core ML decompresses palettized/quantized weights
  just in time on the Neural Engine (Apple ml-stable-diffusion README, "Compression: 6 bits and higher"), so they
  stay resident compressed; before iOS 17 they are expanded to fp16 at load.
* peak memory = load-time memory + the largest live activations: the largest op's inputs + outputs + its
  attention-score working set as the target's attention form materialises it (split_einsum: one head at a time;
  split_einsum_v2: one head and query chunk), plus, for the UNet, the skip tensors the up path still holds.

Pipeline: all resident = Σ weights + the largest component's activations (one runs at a time); just in time =
the largest single component's peak (``reduceMemory`` loads each model when it is needed and unloads it after).

The per-app limit is not RAM. iOS terminates (jetsams) a foreground app far below physical memory; Apple does not
publish the limits. :data:`APP_LIMIT_FRACTION` holds commonly reported crash-test figures (roughly half of RAM:
about 2 GB on 4 GB iPhones, 3 GB on 6 GB, 4 GB on 8 GB); the ``com.apple.developer.kernel.increased-memory-limit``
entitlement, which Apple's ml-stable-diffusion README recommends for Stable Diffusion apps, raises it on supported
devices by an amount Apple does not state either (modelled as :data:`ENTITLED_LIMIT_FRACTION`). Treat the verdict
as a prediction with that uncertainty; Apple's README also counts "over 2 GB of peak memory" for SD-v1.5.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: bytes per activation element on device (fp16)
ACT_BYTES = 2
#: default per-app limit as a fraction of RAM (community crash tests; not documented by Apple)
APP_LIMIT_FRACTION = 0.5
#: with the increased-memory-limit entitlement (approximate; Apple documents no figure)
ENTITLED_LIMIT_FRACTION = 0.65
#: app, runtime and image buffers besides the models (Core ML runtime, Swift pipeline, UI)
APP_BASE_MB = 200.0


@dataclass
class ComponentMemory:
    component: str
    weights_mb: float
    activations_mb: float
    largest_op: str

    @property
    def peak_mb(self) -> float:
        return self.weights_mb + self.activations_mb

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()} | {"peak_mb": round(self.peak_mb, 2)}


def resident_bits(target, bits: float) -> float:
    """Bits per weight held in memory: compressed on iOS 17+ (just-in-time decompression), else fp16."""
    return bits if bits < 16 and target.ios_major >= 17 else 16.0


def score_chunks(op, attention: str, v2_query_chunk: float = 512.0) -> float:
    """How many pieces the attention form splits one attention op's score tensor into."""
    extra = op.extra or {}
    heads, q_len = extra.get("heads", 1), extra.get("q_len", 1)
    if attention == "split_einsum":
        return float(heads)
    if attention == "split_einsum_v2":
        return float(heads * max(1, math.ceil(q_len / v2_query_chunk)))
    return 1.0


def activation_peak(graph, attention: str) -> tuple[float, str]:
    """Largest single op's live bytes: inputs + output + the attention scores it materialises at once."""
    from snapopt.devices.cost_model import canonical_ops

    best, name = 0.0, ""
    for block in graph.blocks():
        for op in canonical_ops(graph.ops(block)):
            live = op.in_bytes + op.out_bytes
            if op.op_class == "attention":
                live += (op.extra or {}).get("score_bytes", 0) / score_chunks(op, attention)
            if live > best:
                best, name = float(live), f"{block}:{op.name}"
    return best, name


def unet_skip_bytes(pipe, shapes) -> float:
    """Bytes of the skip tensors the UNet's down path hands to its up path (held across the mid block)."""
    import torch

    from snapopt.lowering.interfaces import component_io

    io = component_io(pipe, "unet", shapes)
    unet = pipe.unet
    sizes: list[int] = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: sizes.append(out.numel()))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, a, out: sizes.extend(t.numel() for t in out[1])))
    try:
        with torch.no_grad():
            io.module(*io.example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return float(sum(sizes) * ACT_BYTES)


def weight_params(graph) -> int:
    from snapopt.devices.latency import graph_arrays

    _, arrays, _ = graph_arrays(graph)
    return int(arrays.weight_params.sum())


def component_params(pipe) -> dict[str, int]:
    """Parameters each on-device model holds (the graph's op records count an embedding by the rows it reads)."""
    mods = {"unet": [pipe.unet], "text_encoder": [pipe.text_encoder],
            "vae_decoder": [getattr(pipe.vae, "decoder", None), getattr(pipe.vae, "post_quant_conv", None)] if pipe.vae is not None else []}
    return {c: sum(p.numel() for m in ms if m is not None for p in m.parameters()) for c, ms in mods.items()
            if any(m is not None for m in ms)}


def component_memory(graph, target, bits: float, extra_live_bytes: float = 0.0, params: int | None = None) -> ComponentMemory:
    w = (weight_params(graph) if params is None else params) * resident_bits(target, bits) / 8
    act, op = activation_peak(graph, target.profile.attention)
    return ComponentMemory(graph.component, w / 1e6, (act + extra_live_bytes) / 1e6, op)


def app_limit_mb(target, entitled: bool = False) -> float:
    return target.device.chip.ram_gb * 1e3 * (ENTITLED_LIMIT_FRACTION if entitled else APP_LIMIT_FRACTION)


def pipeline_fit(graphs: dict[str, Any], target, bits: dict[str, float] | float = 16.0, skip_bytes: float = 0.0,
                 params: dict[str, int] | None = None) -> dict[str, Any]:
    """Memory of every component on ``target`` and whether the pipeline fits its per-app limit, all resident and
    just in time, without and with the increased-memory-limit entitlement. ``bits``: per component or one value."""
    comps = {}
    for c, g in graphs.items():
        b = bits.get(c, 16.0) if isinstance(bits, dict) else bits
        comps[c] = component_memory(g, target, b, skip_bytes if c == "unet" else 0.0, (params or {}).get(c))
    resident = APP_BASE_MB + sum(m.weights_mb for m in comps.values()) + max(m.activations_mb for m in comps.values())
    jit = APP_BASE_MB + max(m.peak_mb for m in comps.values())
    limit, entitled = app_limit_mb(target), app_limit_mb(target, True)
    return {"target": target.id, "profile": target.profile.name, "ram_gb": target.device.chip.ram_gb, "ios": target.device.ios,
            "app_limit_mb": round(limit), "entitled_limit_mb": round(entitled),
            "components": {c: m.to_json() for c, m in comps.items()},
            "resident_mb": round(resident, 1), "just_in_time_mb": round(jit, 1),
            "fits_resident": resident <= limit, "fits_just_in_time": jit <= limit,
            "fits_resident_entitled": resident <= entitled, "fits_just_in_time_entitled": jit <= entitled,
            "verdict": verdict(resident, jit, limit, entitled)}


def verdict(resident: float, jit: float, limit: float, entitled: float) -> str:
    if resident <= limit:
        return "fits with all models resident"
    if jit <= limit:
        return "fits only loading models just in time (reduceMemory)"
    if resident <= entitled:
        return "fits resident only with the increased-memory-limit entitlement"
    if jit <= entitled:
        return "fits only just in time and with the increased-memory-limit entitlement"
    return "does not fit"


def pipeline_graphs_for(pipe, shapes) -> dict[str, Any]:
    """Block graphs of the text encoder, the UNet at the CFG batch and the VAE decoder, as run on device."""
    from snapopt.capture import block_graph
    from snapopt.lowering.interfaces import Shapes

    out = {}
    for c, batch in (("text_encoder", 1), ("unet", shapes.batch), ("vae_decoder", 1)):
        if c in pipe.components() or (c == "vae_decoder" and "vae" in pipe.components()):
            out[c] = block_graph(pipe, c, Shapes(resolution=shapes.resolution, batch=batch, text_len=shapes.text_len))
    return out


def memory_report(pipe, shapes, targets, bits: dict[str, float] | float | None = None) -> tuple[dict[str, Any], list[str]]:
    """Per-target memory fit and the report lines (the export's "Memory fit per target" section; callable from
    run.py as ``memory_report(pipe, shapes, resolved.targets, bits)``). ``bits``: stored bits per component
    (or one value); None prices each target at its deployment profile's ``weight_bits``."""
    graphs = pipeline_graphs_for(pipe, shapes)
    skips = unet_skip_bytes(pipe, shapes) if "unet" in graphs else 0.0
    params = component_params(pipe)
    rows = [pipeline_fit(graphs, t, float(t.profile.weight_bits) if bits is None else bits, skips, params) for t in targets]
    return {"targets": rows, "app_limit_fraction": APP_LIMIT_FRACTION, "entitled_limit_fraction": ENTITLED_LIMIT_FRACTION,
            "app_base_mb": APP_BASE_MB}, fit_lines(rows)


def fit_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    comps = list(rows[0]["components"])
    lines = ["| target | RAM GB | per-app limit MB (entitled) | " + " | ".join(f"{c} load / peak MB" for c in comps)
             + " | all resident MB | just in time MB | verdict |",
             "|---|---:|---:|" + "---:|" * len(comps) + "---:|---:|---|"]
    for r in rows:
        cells = " | ".join(f"{r['components'][c]['weights_mb']:.0f} / {r['components'][c]['peak_mb']:.0f}" for c in comps)
        lines.append(f"| {r['target']} | {r['ram_gb']:g} | {r['app_limit_mb']} ({r['entitled_limit_mb']}) | {cells} | "
                     f"{r['resident_mb']:.0f} | {r['just_in_time_mb']:.0f} | {r['verdict']} |")
    lines += ["", f"Per-app limit: ~{APP_LIMIT_FRACTION:.0%} of RAM (commonly reported crash-test figures; Apple publishes none), "
              f"~{ENTITLED_LIMIT_FRACTION:.0%} with the increased-memory-limit entitlement (approximate). Totals include "
              f"{APP_BASE_MB:.0f} MB for the app and runtime; weights resident at their stored bits on iOS 17+ (just-in-time "
              "decompression), fp16 before; peak = weights + the largest op's live tensors (attention scores as the "
              "target's attention form splits them) + the UNet's skip tensors. Just in time = Apple's `reduceMemory`."]
    return lines
