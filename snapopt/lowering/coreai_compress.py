"""Core AI weight compression through coreai-opt: the recipe's compression plan (the one the Core ML packages
get, :func:`snapopt.lowering.export.compression_plan`) mapped onto coreai-opt configs.

Core ML compresses a converted program (coremltools.optimize.coreml); coreai-opt compresses the torch module
before export instead: ``prepare`` puts fake-palettize/fake-quantize ops on the chosen layers (the torch model of
the scheme's weights, used as the simulation), ``finalize(backend=CoreAI)`` swaps them for custom ops that
coreai-torch lowers to Core AI's ``lut_to_dense`` / ``blockwise_shift_scale`` (and int8 quantize ops for W8A8).
The compressed asset is fp16 (weights and compute, as Core ML's FLOAT16 compute precision) with fp32 inputs and
outputs, so it keeps the interface of the uncompressed ``.aimodel``.

Scheme → coreai-opt (the layers Core ML's weight_threshold picks: conv/linear/embedding weights of at least
:data:`snapopt.lowering.compression.WEIGHT_THRESHOLD` elements; palettization leaves embeddings fp16, because
coreai-opt 0.4.0's KMeansPalettizer registers conv/linear/attention ops only):

* ``palettize`` 4/6/8 bits: ``KMeansPalettizerConfig.presets.w4/w6/w8`` (4/6: one LUT per 16 output channels;
  8: per tensor); a recipe ``group_size`` gives one LUT per that many channels; 1/2/3 bits: per tensor.
* ``mixed``: per-layer palettization at the sensitivity recipe's widths (UNet); other components at the uniform width.
* ``int8``: ``QuantizerConfig.presets.w8()`` (int8 weights per output channel).
* ``int4``: ``QuantizerConfig.presets.w4_per_block()`` (int4 weights, blocks of 32 input channels).
* ``w8a8``: ``QuantizerConfig()`` (int8 weights per channel, int8 activations per tensor, calibrated) on the UNet,
  int8 weights elsewhere; the plan already fell back to ``int8`` where a target's Neural Engine lacks int8 compute.
"""

from __future__ import annotations

import contextlib
import copy
import io as _io
import logging
import re
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from snapopt.errors import UsageError
from snapopt.lowering.compression import WEIGHT_THRESHOLD

#: Palettization widths coreai-opt (and Core AI's lut_to_dense) accept.
PALETTE_BITS = (1, 2, 3, 4, 6, 8)
#: Schemes this module lowers (the Core ML plan's names, plus int4 per block).
SCHEMES = ("fp16", "palettize", "mixed", "int8", "int4", "w8a8")
INT4_BLOCK = 32


@contextlib.contextmanager
def quiet():
    """coreai-opt draws a tqdm bar per k-means run and logs each layer it skips; torchao logs the C++ extensions
    it cannot load for this torch. snapopt reports its own progress, so keep the terminal to that."""
    for name in ("coreai_opt", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stderr(_io.StringIO()), contextlib.redirect_stdout(_io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def import_coreai_opt():
    from snapopt.errors import LoweringError
    from snapopt.lowering.coreai import PINS

    try:
        with quiet():
            import coreai_opt
    except ImportError as exc:
        raise LoweringError(f"Core AI compression needs coreai-opt: pip install --pre {PINS.split(' (')[0]} ({exc})") from None
    return coreai_opt


def scheme_name(plan: dict[str, Any]) -> str:
    s = plan["scheme"]
    return "palettize" if s.startswith("palettize") else s


def check_plan(plan: dict[str, Any]) -> None:
    """One line (exit 2) for a plan coreai-opt cannot apply."""
    s = scheme_name(plan)
    if s not in SCHEMES:
        raise UsageError(f"export.compression: '{plan['scheme']}' has no Core AI lowering; expected one of {', '.join(SCHEMES)}")
    if s == "palettize" and int(plan["bits"]) not in PALETTE_BITS:
        raise UsageError(f"export.compression: Core AI palettizes at {', '.join(map(str, PALETTE_BITS))} bits "
                         f"(coreai-opt / lut_to_dense), not {plan['bits']:g}")
    if s == "mixed" and "recipe" in plan:
        bad = sorted({b for b in plan["recipe"].values() if b < 16 and b not in PALETTE_BITS})
        if bad:
            raise UsageError(f"export.compression: mixed recipe uses {bad} bits, which Core AI cannot palettize")


def component_plan(plan: dict[str, Any], component: str) -> dict[str, Any]:
    """What one component gets: per-layer schemes (mixed recipe, W8A8 activations) act on the UNet only, as in the
    Core ML packages; the other components get the scheme's uniform weight part."""
    from snapopt.lowering.coreml import uniform_bits

    s = scheme_name(plan)
    if s == "mixed" and (component != "unet" or "recipe" not in plan):
        return {"scheme": "palettize", "bits": uniform_bits(plan["bits"]), "group_size": 0}
    if s == "w8a8" and component != "unet":
        return {"scheme": "int8", "bits": 8}
    return plan


def weight_layers(module: nn.Module, threshold: int = WEIGHT_THRESHOLD) -> dict[str, nn.Module]:
    """Layers whose weight Core ML's ``weight_threshold`` would compress: conv, linear and embedding tables."""
    return {n: m for n, m in module.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)) and m.weight.numel() >= threshold}


def _palette_config(bits: int, group_size: int = 0):
    """Module palettization config: coreai-opt's preset for 4/6/8 bits, else an explicit spec."""
    from coreai_opt.palettization import ModuleKMeansPalettizerConfig, PalettizationSpec
    from coreai_opt.palettization.config.palettization_config import OpKMeansPalettizerConfig
    from coreai_opt.palettization.spec import PerGroupedChannelGranularity, PerTensorGranularity

    if not group_size and bits in (4, 6):
        return getattr(ModuleKMeansPalettizerConfig.presets, f"w{bits}")()
    if not group_size and bits == 8:
        return ModuleKMeansPalettizerConfig.presets.w8()
    gran = PerGroupedChannelGranularity(axis=0, group_size=group_size) if group_size else PerTensorGranularity()
    spec = PalettizationSpec(n_bits=int(bits), granularity=gran)
    return ModuleKMeansPalettizerConfig(op_input_spec=None, op_output_spec=None,
                                        op_state_spec={k: spec for k in OpKMeansPalettizerConfig.get_default_state_spec()})


def _only(config, names: Iterable[str]):
    return config.only_for([re.escape(n) for n in names])


def build_compressor(module: nn.Module, plan: dict[str, Any], names: list[str], *, recipe_names: dict[str, str] | None = None):
    """(compressor, needs_calibration, description) for ``plan`` on ``module``'s ``names`` layers."""
    from coreai_opt.palettization import KMeansPalettizer, KMeansPalettizerConfig
    from coreai_opt.quantization import ExecutionMode, Quantizer, QuantizerConfig

    eager = ExecutionMode.EAGER  # an nn.Module, not an exported graph with fp32 asserts: it can go to fp16 after finalize
    s = scheme_name(plan)
    if s == "palettize":
        bits, g = int(plan["bits"]), int(plan.get("group_size") or 0)
        cfg = KMeansPalettizerConfig(global_config=None)
        group = g or (16 if bits in (4, 6) else 0)
        for n in names:
            cfg.set_module_name(re.escape(n), _palette_config(bits, g))
        gran = f"one LUT per {group} output channels" if group else "one LUT per tensor"
        undivided = sum(1 for n in names if group and dict(module.named_modules())[n].weight.shape[0] % group)
        # coreai-opt skips a layer whose output channels the LUT group does not divide (a UNet's 4-channel conv_out):
        # it stays fp16, which keeps the sensitive output layers exact (one LUT per tensor there cost the snapshapes
        # UNet 9 dB of PSNR for 7% of its size)
        gran += f"; {undivided} layers whose output channels {group} does not divide stay fp16" if undivided else ""
        how = f"KMeansPalettizerConfig.presets.w{bits}()" if not g and bits in (4, 6, 8) else f"PalettizationSpec(n_bits={bits})"
        return KMeansPalettizer(module, cfg), False, f"{bits}-bit k-means palettization, {gran} ({how})"
    if s == "mixed":
        cfg = KMeansPalettizerConfig(global_config=None)
        widths: dict[int, int] = {}
        for lname, bits in plan["recipe"].items():
            name = (recipe_names or {}).get(lname)
            if name is None or bits >= 16:
                continue
            cfg.set_module_name(re.escape(name), _palette_config(int(bits), 0))
            widths[int(bits)] = widths.get(int(bits), 0) + 1
        return KMeansPalettizer(module, cfg), False, (f"mixed-bit palettization, {plan['bits']:g} bits average "
                                                      f"(layers per width {dict(sorted(widths.items()))})")
    if s == "int8":
        return (Quantizer(module, _only(QuantizerConfig.presets.w8(execution_mode=eager), names)), False,
                "int8 weights per output channel (QuantizerConfig.presets.w8())")
    if s == "int4":
        block = int(plan.get("block_size") or INT4_BLOCK)
        return (Quantizer(module, _only(QuantizerConfig.presets.w4_per_block(block_size=block, execution_mode=eager), names)), False,
                f"int4 weights per block of {block} input channels (QuantizerConfig.presets.w4_per_block())")
    if s == "w8a8":
        return (Quantizer(module, _only(QuantizerConfig(execution_mode=eager), names)), True,
                "int8 weights per channel + int8 activations per tensor, calibrated (QuantizerConfig())")
    raise UsageError(f"export.compression: '{plan['scheme']}' has no Core AI lowering")


class HalfIO(nn.Module):
    """The compressed module in fp16 behind fp32 inputs and outputs (token ids stay fp32: fp16 cannot hold ids past
    2048 exactly)."""

    def __init__(self, inner: nn.Module, keep_fp32: Iterable[int]):
        super().__init__()
        self.inner = inner.half()
        self.keep = frozenset(keep_fp32)

    def forward(self, *xs):
        xs = [x if (i in self.keep or not x.is_floating_point()) else x.half() for i, x in enumerate(xs)]
        out = self.inner(*xs)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def compress_io(io, plan: dict[str, Any], component: str, *, recipe_module: nn.Module | None = None,
                calibration: list[tuple] | None = None) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """Compress a copy of ``io.module`` (the pipeline is not touched).

    Returns (module to export: finalized for Core AI, fp16 behind fp32 I/O; the prepared fake-compressed fp32 module,
    i.e. the scheme simulated in torch; info: scheme, layers, stored bits)."""
    opt = import_coreai_opt()
    plan = component_plan(plan, component)
    check_plan(plan)
    keep = [i for i, n in enumerate(io.input_names) if n == "input_ids"]
    module = copy.deepcopy(io.module).eval()
    if scheme_name(plan) == "fp16":
        info = {"scheme": "fp16", "description": "fp16 weights and compute", "layers": 0, "weight_bits": 16.0}
        return HalfIO(copy.deepcopy(module), keep).eval(), HalfIO(module, keep).eval(), info
    layers = weight_layers(module)
    kept = []
    if scheme_name(plan) in ("palettize", "mixed"):  # coreai-opt 0.4.0's KMeansPalettizer registers conv/linear ops only
        kept = [n for n, m in layers.items() if isinstance(m, nn.Embedding)]
        layers = {n: m for n, m in layers.items() if n not in kept}
    recipe_names = None
    if scheme_name(plan) == "mixed" and recipe_module is not None:
        by_id = {id(m): n for n, m in io.module.named_modules()}
        recipe_names = {ln: by_id[id(m)] for ln, m in recipe_module.named_modules() if id(m) in by_id}
    compressor, calibrate, description = build_compressor(module, plan, list(layers), recipe_names=recipe_names)
    with quiet(), torch.no_grad():
        prepared = compressor.prepare(io.example_inputs)
        if calibrate:
            with compressor.calibration_mode():
                for batch in calibration or [io.example_inputs]:
                    prepared(*batch)
        sim = copy.deepcopy(prepared)
        final = compressor.finalize(backend=opt.ExportBackend.CoreAI)
    if kept:
        description += f"; {len(kept)} embedding tables stay fp16 (coreai-opt's palettizer handles conv/linear only)"
    measured = measured_bits(sim, layers)
    info = {"scheme": plan["scheme"], "description": description, "layers": len(layers),
            "weight_bits": stored_bits(plan, layers, recipe_names, measured.pop("fp16_layers", ())), **measured}
    if calibrate:
        info["calibration_batches"] = len(calibration or [io.example_inputs])
    return HalfIO(final, keep).eval(), sim.eval(), info


def stored_bits(plan: dict[str, Any], layers: dict[str, nn.Module], recipe_names: dict[str, str] | None = None,
                fp16_layers: Iterable[str] = ()) -> float:
    """Average stored bits per weight over the compressible layers: the scheme's width, 16 where it leaves a layer
    fp16 (a mixed recipe's 16, or a layer coreai-opt skipped)."""
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    total = sum(sizes.values())
    if not total:
        return 16.0
    s = scheme_name(plan)
    if s == "mixed":
        width = {recipe_names.get(ln, ln) if recipe_names else ln: b for ln, b in plan["recipe"].items()}
    else:
        width = dict.fromkeys(sizes, {"int8": 8, "w8a8": 8, "int4": 4}.get(s, plan.get("bits", 16)))
    width.update(dict.fromkeys(fp16_layers, 16))
    return round(sum(min(width.get(n, 16), 16) * k for n, k in sizes.items()) / total, 3)


def measured_bits(prepared: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
    """coreai-opt's own count (``inspection.bits_per_weight``) over the chosen layers: bits per weight with the
    LUT / scale overhead (and the bias, counted at fp32), and how many layers it really compressed (it skips, e.g., a
    layer whose channels a LUT group does not divide)."""
    from coreai_opt.inspection import bits_per_weight

    try:
        per = bits_per_weight(prepared).per_module_map
    except NotImplementedError:
        return {}
    sizes = {n: m.weight.numel() for n, m in layers.items() if n in per}
    if not sizes:
        return {}
    stored = {n: per[n] if per[n] < 16 else 16.0 for n in sizes}  # an uncompressed layer is fp16 in the asset (fp32 here)
    return {"measured_bits": round(sum(stored[n] * k for n, k in sizes.items()) / sum(sizes.values()), 3),
            "layers_compressed": sum(1 for n in sizes if per[n] < 16), "fp16_layers": [n for n in sizes if per[n] >= 16]}


def unet_calibration(pipe, io, shapes) -> list[tuple]:
    """W8A8 calibration batches in the UNet interface's layout: the compression probe's inputs (real prompts
    through the text encoder, timesteps across the schedule), cut to the interface's batch."""
    from snapopt.lowering.schemes import probe_for

    sample, t, ctx = probe_for(pipe, shapes).inputs
    b = io.example_inputs[0].shape[0]
    ehs = ctx.transpose(1, 2).unsqueeze(2).to(io.example_inputs[2].dtype)
    t = t.to(io.example_inputs[1].dtype).expand(sample.shape[0]) if t.dim() == 0 else t.to(io.example_inputs[1].dtype)
    batches = [(sample[i:i + b], t[i:i + b], ehs[i:i + b]) for i in range(0, sample.shape[0] - b + 1, b)]
    return batches or [io.example_inputs]
