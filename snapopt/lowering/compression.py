"""Weight compression schemes, simulated in torch and applied to Core ML programs.

Simulating a scheme in torch (the weights a package will hold, put back into a copy of the module) is how
snapopt measures each scheme's quality without a Mac: coremltools on Linux cannot run a package.

* ``palettize``: k-means look-up table per tensor (or per group of output channels), :func:`kmeans_lut`.
* ``int8``: linear symmetric int8 weights per output channel.
* ``mixed``: per-layer palettization widths from a sensitivity analysis, the method of Apple's
  ml-stable-diffusion mixed-bit recipes (``mixed_bit_compression_pre_analysis.py``): palettize one layer at a
  time at each width in :data:`NBITS`, measure the PSNR of the UNet's output against fp, then give each layer
  the smallest width whose single-layer PSNR clears a threshold; the threshold is searched so that the average
  width meets the recipe's target. Applied in Core ML as per-op ``OpPalettizerConfig``s.
* ``w8a8``: int8 weights and int8 activations at every conv/linear input. coremltools' own
  ``linear_quantize_activations`` calibrates by running the package through Core ML (macOS only); here the
  activation ranges are calibrated in torch (forward hooks on the same modules) and handed to coremltools'
  ``insert_prefix_quantize_dequantize_pair`` pass, which is what that function runs after calibration.

Core ML weight constants are matched to torch modules by value (shape + fp16 bytes), as Apple's apply script
does, so wrappers and chunks that rename parameters need no name mapping.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

#: Palettization widths the Neural Engine accelerates (Apple's mixed-bit analysis uses the same set).
NBITS = (1, 2, 4, 6, 8)
#: Smallest weight tensor coremltools compresses (``weight_threshold``); smaller ones stay fp16.
WEIGHT_THRESHOLD = 2048
#: Layers a mixed-bit analysis measures one by one (Apple's analysis skips tensors under 1e5 elements to save
#: time); smaller compressible layers get the uniform width at or above the target (:func:`fixed_width`).
ANALYSE_MIN_PARAMS = 65536


# ---- torch simulation ------------------------------------------------------------------------------------------
def kmeans_lut(values: torch.Tensor, bits: int, iters: int = 20, fit_on: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of ``values`` into 2**bits levels (quantile start, Lloyd steps): (lut, indices).

    Exact 1-D assignment by bucketising against the midpoints of the sorted centres; the centres are fitted on
    an evenly strided subset of at most ``fit_on`` sorted values (the distribution's quantiles), so one layer at
    one width costs milliseconds and a sensitivity analysis can afford every layer and width."""
    x = values.detach().reshape(-1).to(torch.float16).float()
    k = 2 ** bits
    uniq = torch.unique(x)
    if uniq.numel() <= k:
        return uniq, torch.bucketize(x, uniq)
    xs = x.sort().values
    if xs.numel() > fit_on:
        xs = xs[torch.linspace(0, xs.numel() - 1, fit_on).long()]
    centres = xs[((torch.arange(k, dtype=torch.float32) + 0.5) / k * (xs.numel() - 1)).long()].unique()
    if centres.numel() < k:  # repeated quantiles: spread the start over the range
        centres = torch.linspace(float(xs[0]), float(xs[-1]), k)
    for _ in range(iters):
        idx = torch.bucketize(xs, (centres[1:] + centres[:-1]) / 2)
        sums = torch.zeros(k).scatter_add_(0, idx, xs)
        counts = torch.bincount(idx, minlength=k).float()
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centres).sort().values
        if torch.allclose(new, centres, rtol=0, atol=1e-7):
            break
        centres = new
    idx = torch.bucketize(x, (centres[1:] + centres[:-1]) / 2)
    return centres, idx


def palettized(weight: torch.Tensor, bits: int, group_size: int = 0) -> torch.Tensor:
    """``weight`` as a ``bits``-bit palettized package holds it (one LUT per tensor, or per ``group_size``
    output channels), in the weight's dtype."""
    w = weight.detach()
    groups = [w] if not group_size else list(w.split(group_size, dim=0))
    out = []
    for g in groups:
        lut, idx = kmeans_lut(g, bits)
        out.append(lut.to(torch.float16)[idx].reshape(g.shape))
    return torch.cat(out, 0).to(w.dtype)


def int8_weights(weight: torch.Tensor) -> torch.Tensor:
    """Linear symmetric int8 per output channel (coremltools' ``linear_symmetric``), dequantized."""
    w = weight.detach().float()
    amax = w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-12).reshape(-1, *([1] * (w.dim() - 1)))
    scale = amax / 127.0
    return ((w / scale).round().clamp(-127, 127) * scale).to(weight.dtype)


def quantizable(module: nn.Module, min_params: int = WEIGHT_THRESHOLD) -> list[tuple[str, nn.Module]]:
    """Conv/Linear layers whose weight coremltools would compress (at least ``min_params`` elements)."""
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.numel() >= min_params]


def simulate(module: nn.Module, scheme: dict[str, Any], act_scales: dict[str, float] | None = None) -> nn.Module:
    """A copy of ``module`` whose weights are what ``scheme`` stores (and, for w8a8 with ``act_scales``, whose
    conv/linear inputs are fake-quantized to int8 with those scales)."""
    sim = copy.deepcopy(module).eval()
    name = scheme["scheme"]
    layers = dict(quantizable(sim))
    with torch.no_grad():
        for lname, m in layers.items():
            if name in ("int8", "w8a8"):
                m.weight.copy_(int8_weights(m.weight))
            elif name.startswith("palettize"):
                m.weight.copy_(palettized(m.weight, int(scheme["bits"]), scheme.get("group_size", 0)))
            elif name == "mixed":
                bits = scheme["recipe"].get(lname)
                if bits is not None and bits < 16:
                    m.weight.copy_(palettized(m.weight, int(bits)))
            elif name == "fp16":
                m.weight.copy_(m.weight.half().to(m.weight.dtype))
            else:
                raise ValueError(f"unknown compression scheme '{name}'")
    if name == "w8a8" and act_scales:
        for lname, m in layers.items():
            if lname in act_scales:
                m.register_forward_pre_hook(_fake_quant_hook(act_scales[lname]))
    return sim


def _fake_quant_hook(scale: float):
    def hook(_m, args):
        x = args[0]
        return ((x / scale).round().clamp(-127, 127) * scale,) + tuple(args[1:])
    return hook


def psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal integrity as Apple's analysis measures it: peak |ref| over the RMS error, in dB."""
    ref, out = ref.double(), out.double()
    mse = float(((ref - out) ** 2).mean())
    peak = float(ref.abs().max())
    return float("inf") if mse == 0 else 20 * math.log10(peak / math.sqrt(mse))


# ---- the UNet probe every scheme is measured on ------------------------------------------------------------------
@dataclass
class UnetProbe:
    """Seeded UNet inputs (real prompts through the text encoder when there is one, timesteps across the
    schedule) and the fp outputs: what each scheme's PSNR is measured against."""

    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    reference: torch.Tensor

    @classmethod
    def prepare(cls, pipe, latent: int, prompts: int = 2, timesteps: tuple[int, ...] = (999, 500, 100), seed: int = 0):
        from snapopt.quality import TeacherDistance

        td = TeacherDistance.prepare(pipe, latent=latent, prompts=prompts, timesteps=timesteps, seed=seed)
        return cls(td.inputs, td.teacher_output)

    def run(self, unet: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return unet(*self.inputs, return_dict=False)[0].float()

    def psnr(self, unet: nn.Module) -> float:
        return psnr(self.reference, self.run(unet))


# ---- mixed-bit: sensitivity analysis and bit allocation ---------------------------------------------------------
@dataclass
class Sensitivity:
    """Single-layer PSNR (dB) of the UNet output with only that layer palettized, per width, for the analysed
    layers; ``fixed`` holds the sizes of compressible layers too small to analyse."""

    psnr: dict[str, dict[int, float]]
    sizes: dict[str, int]
    fixed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"psnr_db": {n: {str(b): round(v, 2) for b, v in d.items()} for n, d in self.psnr.items()},
                "sizes": self.sizes, "fixed_layers": self.fixed, "seconds": round(self.seconds, 1)}


def sensitivity(unet: nn.Module, probe: UnetProbe, nbits: Iterable[int] = NBITS, *, min_params: int = ANALYSE_MIN_PARAMS,
                progress: Callable[[str], None] | None = None) -> Sensitivity:
    """Palettize each layer alone at each width and measure the output PSNR (weights restored after)."""
    import time

    t0 = time.perf_counter()
    layers = quantizable(unet, min_params)
    table: dict[str, dict[int, float]] = {n: {} for n, _ in layers}
    for i, (name, m) in enumerate(layers):
        original = m.weight.detach().clone()
        for b in nbits:
            with torch.no_grad():
                m.weight.copy_(palettized(original, b))
            table[name][b] = probe.psnr(unet)
        with torch.no_grad():
            m.weight.copy_(original)
        if progress and (i + 1) % 10 == 0:
            progress(f"sensitivity: {i + 1}/{len(layers)} layers, {time.perf_counter() - t0:.0f} s")
    fixed = {n: m.weight.numel() for n, m in quantizable(unet) if n not in table}
    return Sensitivity(table, {n: m.weight.numel() for n, m in layers}, fixed, time.perf_counter() - t0)


def fixed_width(target_bits: float) -> int:
    """Width of layers too small to analyse: the smallest accelerated width at or above the target."""
    return next((b for b in NBITS if b >= target_bits), 8)


def recipe_at(sens: Sensitivity, threshold: float, target_bits: float = 8.0) -> dict[str, int]:
    """Each analysed layer's smallest width whose single-layer PSNR exceeds ``threshold`` (16: keep fp16); the
    small layers at :func:`fixed_width`."""
    out = {n: fixed_width(target_bits) for n in sens.fixed}
    for name, d in sens.psnr.items():
        out[name] = next((b for b in sorted(d) if d[b] > threshold), 16)
    return out


def average_bits(recipe: dict[str, int], sizes: dict[str, int]) -> float:
    total = sum(sizes[n] for n in recipe)
    return sum(recipe[n] * sizes[n] for n in recipe) / max(total, 1)


def allocate(sens: Sensitivity, target_bits: float) -> tuple[dict[str, int], float]:
    """The recipe with the highest PSNR threshold whose average width over all compressible layers is at most
    ``target_bits`` (a higher threshold spends bits on more layers). Returns (recipe, threshold)."""
    sizes = {**sens.sizes, **sens.fixed}
    candidates = sorted({v for d in sens.psnr.values() for v in d.values() if math.isfinite(v)}, reverse=True)
    best = recipe_at(sens, math.inf if not candidates else -math.inf, target_bits), -math.inf
    lo, hi = 0, len(candidates) - 1
    while lo <= hi:  # average bits fall as the threshold falls: binary search the first feasible threshold
        mid = (lo + hi) // 2
        rec = recipe_at(sens, candidates[mid] - 1e-9, target_bits)
        if average_bits(rec, sizes) <= target_bits:
            best, hi = (rec, candidates[mid] - 1e-9), mid - 1
        else:
            lo = mid + 1
    return best


# ---- Core ML: map program weights to torch modules ---------------------------------------------------------------
def _key(arr: np.ndarray) -> tuple:
    a = np.ascontiguousarray(arr.astype(np.float16))
    return a.shape, hashlib.sha1(a.tobytes()).hexdigest()


def weight_names(model, module: nn.Module, min_params: int = WEIGHT_THRESHOLD) -> dict[str, list[str]]:
    """torch layer name → the Core ML const op names holding its weight (matched by shape and fp16 value)."""
    import coremltools.optimize.coreml as cto

    from snapopt.lowering.coreml import _silenced

    with _silenced():
        meta = cto.get_weights_metadata(model, weight_threshold=min_params)
    by_value: dict[tuple, list[str]] = {}
    for name, md in meta.items():
        by_value.setdefault(_key(np.asarray(md.val)), []).append(name)
    out: dict[str, list[str]] = {}
    for lname, m in quantizable(module, min_params):
        w = m.weight.detach().float().numpy()
        names = by_value.get(_key(w))
        if names is None and isinstance(m, nn.Linear):  # a Linear lowered as a 1×1 conv
            names = by_value.get(_key(w[:, :, None, None]))
        if names:
            out[lname] = names
    return out


def palettize_mixed(model, module: nn.Module, recipe: dict[str, int], min_params: int = WEIGHT_THRESHOLD):
    """Palettize each weight at its recipe width (per-op configs); fp16 where the recipe says 16."""
    import coremltools.optimize.coreml as cto

    names = weight_names(model, module, min_params)
    configs = {}
    for lname, bits in recipe.items():
        if bits >= 16:
            continue
        for op in names.get(lname, []):
            configs[op] = cto.OpPalettizerConfig(nbits=int(bits), mode="kmeans", weight_threshold=min_params)
    if not configs:
        return model
    return cto.palettize_weights(model, cto.OptimizationConfig(op_name_configs=configs))


# ---- W8A8: activation ranges calibrated in torch ------------------------------------------------------------------
def calibrate_activations(module: nn.Module, batches: Iterable[tuple], min_params: int = WEIGHT_THRESHOLD) -> dict[str, float]:
    """Symmetric int8 scale (max |x| / 127) of every conv/linear layer's input over the calibration batches."""
    amax: dict[str, float] = {}
    hooks = []
    for lname, m in quantizable(module, min_params):
        def hook(_m, args, lname=lname):
            amax[lname] = max(amax.get(lname, 0.0), float(args[0].detach().abs().max()))
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                module(*b)
    finally:
        for h in hooks:
            h.remove()
    return {k: max(v, 1e-8) / 127.0 for k, v in amax.items()}


def quantize_w8a8(model, module: nn.Module, act_scales: dict[str, float], min_params: int = WEIGHT_THRESHOLD):
    """int8 activations at each calibrated conv/linear input (coremltools' prefix quantize/dequantize pass, fed
    torch-calibrated ranges), then int8 weights per channel. Needs iOS 17."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models import utils as model_utils

    weight_ops = weight_names(model, module, min_params)
    const_to_layer = {c: l for l, cs in weight_ops.items() for c in cs}
    stats, configs = {}, {}
    prog = model._mil_program
    for op in prog.functions["main"].operations:
        if op.op_type not in ("conv", "linear"):
            continue
        w = op.inputs.get("weight")
        layer = const_to_layer.get(w.op.name if w is not None and w.op is not None else None)
        if layer is None or layer not in act_scales:
            continue
        x = op.inputs["x"]
        if x.op is not None and x.op.op_type == "const":
            continue
        a = act_scales[layer] * 127.0
        stats[x.name] = {"rmin": -a, "rmax": a}
        configs[op.name] = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
    if configs:
        config = cto.OptimizationConfig(op_name_configs=configs)
        insert = PASS_REGISTRY["compression::insert_prefix_quantize_dequantize_pair"]
        insert.set_options([PassOption("config", config), PassOption("activation_stats", stats)])
        dedup = PASS_REGISTRY["common::dequantize_quantize_pair_elimination"]
        from coremltools.converters.mil._deployment_compatibility import AvailableTarget

        model = model_utils._apply_graph_pass(model, [insert, dedup], spec_version=AvailableTarget.iOS17,
                                              pymil_load_func=milproto_load.load, skip_model_load=True)
    op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                     weight_threshold=min_params)
    model = cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op))
    model._snapopt_quantized_inputs = len(configs)
    return model


def count_ops(model, op_type: str) -> int:
    """How many ``op_type`` ops a converted model's main function holds (e.g. ``quantize`` after W8A8)."""
    spec = model.get_spec()
    return sum(1 for op in spec.mlProgram.functions["main"].block_specializations[next(iter(
        spec.mlProgram.functions["main"].block_specializations))].operations if op.type == op_type)


# ---- what a scheme stores ----------------------------------------------------------------------------------------
def stored_bits(module: nn.Module, scheme: dict[str, Any]) -> float:
    """Average bits per weight the scheme stores over the module's compressible layers (fp16 = 16)."""
    layers = quantizable(module)
    total = sum(m.weight.numel() for _, m in layers)
    if not total:
        return 16.0
    name = scheme["scheme"]
    if name == "mixed":
        return sum(scheme["recipe"].get(n, 16) * m.weight.numel() for n, m in layers) / total
    return float({"fp16": 16, "int8": 8, "w8a8": 8}.get(name, scheme.get("bits", 16)))


@dataclass
class SchemeResult:
    """One scheme measured: what the report's compression table shows."""

    scheme: str
    bits: float
    psnr_db: float | None = None
    package_mb: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    quality: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe: an exact PSNR (identical outputs) is the string "inf"."""
        out = {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}
        if isinstance(out.get("psnr_db"), float) and math.isinf(out["psnr_db"]):
            out["psnr_db"] = "inf"
        return out
