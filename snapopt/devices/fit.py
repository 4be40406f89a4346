"""One shared fit of the latency cost model on every published on-device number (docs/cost-model.md).

The published rows (``data/published_latency_*.csv``, copied from shared/data) are per-step UNet times,
end-to-end image times and single components, on seven chips, four OS/runtime eras and five models. They are
all priced by one structure:

* a component = the roofline cost model (:mod:`snapopt.devices.cost_model`) on the chip's *spec* (ANE TOPS
  and generation — M1/M2 carry the A14/A15 Neural Engine —, DRAM bandwidth, system cache), with a handful of
  physics coefficients shared by every chip;
* × the era factor of the runtime that measured it (iOS 16.2 betas in Nov 2022, macOS 13 in Feb 2023, iOS 17
  betas in June 2023, the August 2023 table, and SnapFusion's own harness) = an overall level (free, no prior)
  × the era's deviation from it (prior: 1, spread ``ERA_SIGMA``), so an unseen runtime is priced at the level;
* end to end = 2 text-encoder calls (prompt + negative) + ``steps`` UNet calls + one decoder call, plus a
  fixed app overhead, plus reduceMemory's just-in-time model loading on 4 GB phones (per GB of weights).

The fit is maximum a posteriori: a robust (soft-L1) least squares on log(predicted/measured) plus a physics
prior on every free coefficient (``PRIORS``), so a coefficient the rows do not identify stays physical instead
of running to a bound. Physics the rows do not identify at all is held (``FIXED``). Free: ``FREE`` (6) + the
level + one factor per era (5) = 12 for 31 rows; chips never get their own.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from snapopt.devices.cost_model import DEFAULT_COEFFICIENTS
from snapopt.devices.target import ChipSpec, DeploymentProfile, DeviceSpec, Target
from snapopt.errors import UsageError

DATA = Path(__file__).resolve().parent / "data"
CSV_FILES = (DATA / "published_latency_calibration.csv", DATA / "published_latency_public.csv")
#: the era built-in Apple profiles are priced at (the latest published runtime: Apple's August 2023 table)
LATEST_ERA = "2023-08"

#: coefficients the fit frees (log-parametrised, bounded), each with its physics prior (value, σ of its log):
#: where the published rows do not identify a coefficient well, the fit stays near what the hardware suggests
FREE = ("ane_eff_conv", "ane_eff_linear", "ane_eff_attention", "score_spill_eff", "e2e_overhead_ms", "reduce_memory_ms_per_gb")
PRIORS = {
    "ane_eff_conv": (0.6, 0.5),            # dense convolutions reach about half to two thirds of the ANE's fp16 peak
    "ane_eff_linear": (0.45, 0.5),         # matmuls with weights: a little less (layout changes around them)
    "ane_eff_attention": (0.3, 0.7),       # activation x activation matmuls (QKᵀ, AV): least
    "score_spill_eff": (0.4, 0.7),         # DRAM bandwidth reached by spilled attention scores (strided, tiled)
    "e2e_overhead_ms": (500.0, 1.0),       # app, scheduler and image conversion per image: about half a second
    "reduce_memory_ms_per_gb": (2000.0, 0.7),  # Apple: reduceMemory "adds up to 2 s" (about 1 GB of 6-bit weights)
}
#: physics the published rows do not identify (freed, each stayed at its prior): held at these values
FIXED = {
    "vector_ratio": 0.05,                  # element-wise ops/s on the ANE as a fraction of its MAC peak
    "cache_eff": 0.1,                      # one op's activations keep ~10% of the system cache (a few MB)
    "overlap": 1.0,                        # compute and DRAM traffic overlap (roofline max; the fit went to 1)
}
#: typical |log error| of one published row (it/s to two digits, end to end in whole seconds, harness noise)
ROW_SIGMA = 0.08
#: prior spread of a runtime era's factor around 1 (the same phone moved 15% between June and August 2023)
ERA_SIGMA = 0.15
#: robust loss (scipy least_squares): a row no shared structure explains pulls the fit linearly, not quadratically
LOSS = "soft_l1"
BOUNDS = {"e2e_overhead_ms": (1.0, 5000.0), "reduce_memory_ms_per_gb": (1.0, 5000.0), "score_spill_eff": (0.01, 1.0)}
ERA_BOUNDS = (0.2, 5.0)
_EFF_BOUNDS = (1e-3, 1.0)

#: public chip specs of the non-iPhone machines in the data (iPhones come from the built-in targets).
#: M1's 16-core Neural Engine is the A14 generation (11 TOPS), M2's the A15 generation (15.8 TOPS).
MAC_CHIPS = {
    "M1": ChipSpec(name="M1", ane_tops=11.0, gpu_tflops_fp16=5.2, cpu_gflops_fp16=400.0, memory_bandwidth_gbs=68.25,
                   memory_type="LPDDR4X", ram_gb=8.0, system_cache_mb=16.0),
    "M2": ChipSpec(name="M2", ane_tops=15.8, gpu_tflops_fp16=7.1, cpu_gflops_fp16=450.0, memory_bandwidth_gbs=100.0,
                   memory_type="LPDDR5", ram_gb=8.0, system_cache_mb=8.0),
}
#: model names in the published rows → how to build them (arch preset, optional UNet/VAE overrides)
MODELS = {
    "sd-1.4": ("sd-v1.5", {}), "sd-1.5": ("sd-v1.5", {}), "sd-v1.5": ("sd-v1.5", {}),
    "sd-2-base": ("sd-2.1-base", {}), "sd-2.1-base": ("sd-2.1-base", {}),
    # OFA-Sys small-stable-diffusion-v0: SD-v1's UNet with layers_per_block=1 (its authors' description)
    "small-stable-diffusion-v0": ("sd-v1.5", {"unet": {"layers_per_block": 1}}),
    "sd-v1.5-vae-decoder-50pct-channels": ("sd-v1.5", {"vae_pct": 50}),
}
METRIC_COMPONENT = {"unet_step": "unet", "vae_decoder": "vae_decoder", "text_encoder": "text_encoder"}


@dataclass
class PubRow:
    """One published latency, normalised across both CSV schemas."""

    index: int
    device: str
    chip: str
    ram_gb: float
    era: str
    compute_units: str
    attention: str
    model: str
    metric: str
    steps: int
    resolution: int
    batch: int
    weight_bits: int
    latency_ms: float
    source: str

    @property
    def label(self) -> str:
        steps = f"×{self.steps}" if self.metric == "e2e" else ""
        return f"{self.device}/{self.model}/{self.metric}{steps}/{self.era}/{self.attention}-{self.weight_bits}b"

    @property
    def arch(self) -> str:
        """The network actually built (sd-1.4/sd-1.5/sd-v1.5 are one UNet; sd-2-base/sd-2.1-base another)."""
        preset, over = MODELS[self.model]
        return preset + ("+" + ",".join(f"{k}={v}" for k, v in sorted(over.items())) if over else "")

    @property
    def reduce_memory(self) -> bool:
        return self.metric == "e2e" and self.ram_gb <= 4 and self.device.startswith("iphone")


def _era(date: str, source: str) -> str:
    if "SnapFusion" in source:
        return "snapfusion"
    return date.strip()[:7]


def read_published(paths: Iterable[Path] = CSV_FILES) -> tuple[list[PubRow], list[dict]]:
    """All usable rows (duplicates across the two files dropped) and the rows left out, with why."""
    rows: list[PubRow] = []
    skipped: list[dict] = []
    seen = set()
    for path in paths:
        with Path(path).open(newline="") as f:
            for rec in csv.DictReader(f):
                public = "metric" in rec
                metric = rec["metric"] if public else rec["component"]
                model = rec["model"].strip()
                source = rec.get("source", "")
                if public:
                    era = _era(rec["date"], source)
                elif "SnapFusion" in source:
                    era = "snapfusion"
                else:
                    era = "2023-08" if "Aug 2023" in source else "unknown"
                prof = rec.get("profile", "")
                attention = (rec.get("attention") or "").strip() or ("split_einsum_v2" if "v2" in prof else "split_einsum")
                row = PubRow(len(rows), rec["device"].strip(), rec["chip"].strip(), float(rec.get("ram_gb") or 6), era,
                             (rec.get("compute_units") or "CPU_AND_NE").strip(), attention, model, metric,
                             int(rec.get("steps") or 0), int(rec["resolution"]), int(rec["batch"]), int(rec["weight_bits"]),
                             float(rec["latency_ms"]), source)
                if model not in MODELS or metric not in (*METRIC_COMPONENT, "e2e"):
                    skipped.append({"row": f"{row.device}/{model}/{metric}", "why": "model not buildable here (non-diffusion)"})
                    continue
                key = (row.device, row.model, row.metric, row.era, row.latency_ms)
                if key in seen:
                    continue
                seen.add(key)
                rows.append(row)
    for i, r in enumerate(rows):
        r.index = i
    return rows, skipped


# ---- row → target ----------------------------------------------------------------------------------------
def row_target(row: PubRow, registry=None) -> Target:
    """The machine a row was measured on (built-in iPhone spec, or a Mac/iPad chip) under the row's deployment."""
    if registry is None:
        from snapopt.devices.registry import TARGETS as registry
    prof = DeploymentProfile(name=f"{row.attention}-{row.weight_bits}bit", attention=row.attention,
                             weight_bits=row.weight_bits, compute_units=row.compute_units)
    base = None
    try:
        base = registry.resolve(row.device)
    except Exception:  # not a built-in iPhone
        base = None
    if base is not None and base.device.chip.name == row.chip:
        dev = base.device
    elif row.chip in MAC_CHIPS:
        dev = DeviceSpec(name=row.device, chip=MAC_CHIPS[row.chip].model_copy(update={"ram_gb": row.ram_gb}), ios="17.0",
                         max_weights_per_model_mb=1e6)
    else:
        raise UsageError(f"published row {row.label}: no spec for chip {row.chip}")
    return Target(id=row.device, device=dev, profile=prof)


# ---- graphs ------------------------------------------------------------------------------------------------
class Graphs:
    """Captures each (model, component, resolution, batch) once on the meta device."""

    def __init__(self, progress: Callable[[str], None] = lambda m: None) -> None:
        self._g: dict[tuple, Any] = {}
        self.progress = progress

    def get(self, model: str, component: str, resolution: int = 512, batch: int = 1):
        preset, over = MODELS.get(model, (model, {}))
        if component == "text_encoder":
            resolution, batch = 77, 1
        owner_over = {k: v for k, v in over.items() if (k == "unet") == (component == "unet") and (k == "vae_pct") == component.startswith("vae")}
        key = (preset, repr(sorted(owner_over.items())), component, resolution, batch)
        if key not in self._g:
            from snapopt.capture import block_graph
            from snapopt.lowering.interfaces import Shapes

            self.progress(f"capturing {model} {component} at {resolution}, batch {batch}")
            pipe = build_model(model, component)
            pipe.source = preset if not owner_over else model
            shapes = Shapes(resolution=resolution if component != "text_encoder" else pipe.resolution, batch=batch)
            self._g[key] = block_graph(pipe, component, shapes)
        return self._g[key]


def build_model(name: str, component: str):
    """A published model's structure (meta device) from its arch preset plus the overrides in MODELS."""
    import torch

    from snapopt.models.loading import load_model
    from snapopt.models.presets import PRESETS

    preset, over = MODELS.get(name, (name, {}))
    owner = "vae" if component.startswith("vae") else component
    pipe = load_model("arch:" + preset, components=(owner,), structure_only=True)
    if "unet" in over and owner == "unet":
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            pipe.unet = UNet2DConditionModel(**(dict(PRESETS[preset].unet) | over["unet"])).eval()
    if "vae_pct" in over and owner == "vae":
        from diffusers import AutoencoderKL

        spec = dict(PRESETS[preset].vae)
        spec["block_out_channels"] = tuple(max(spec["norm_num_groups"], c * over["vae_pct"] // 100) for c in spec["block_out_channels"])
        with torch.device("meta"):
            pipe.vae = AutoencoderKL(**spec).eval()
    pipe.source = name
    return pipe


# ---- the model of a row ------------------------------------------------------------------------------------
def component_ms(graph, target: Target, coeffs: dict[str, float]) -> float:
    from snapopt.devices.latency import total_us

    return total_us(graph, target, coeffs) / 1e3


def weights_gb(graphs: list, target: Target) -> float:
    from snapopt.devices.latency import graph_arrays

    bpp = (16 if target.profile.weight_bits >= 16 else target.profile.weight_bits) / 8
    return sum(float(graph_arrays(g)[1].weight_params.sum()) for g in graphs) * bpp / 1e9


def pipeline_ms(unet, text_encoder, decoder, target: Target, coeffs: dict[str, float], steps: int,
                reduce_memory: bool = False) -> dict[str, float]:
    """End-to-end image time: 2 text-encoder calls + ``steps`` UNet calls + 1 decoder call + app overhead
    (+ reduceMemory's just-in-time loading). The one formula the fit, ``snapopt latency --pipeline`` and the
    run report use."""
    te = component_ms(text_encoder, target, coeffs)
    un = component_ms(unet, target, coeffs)
    de = component_ms(decoder, target, coeffs)
    compute = 2 * te + steps * un + de
    overhead = coeffs["e2e_overhead_ms"] + coeffs["e2e_overhead_frac"] * compute
    load = coeffs["reduce_memory_ms_per_gb"] * weights_gb([unet, text_encoder, decoder], target) if reduce_memory else 0.0
    return {"text_encoder_ms": te, "unet_step_ms": un, "decoder_ms": de, "steps": steps, "overhead_ms": overhead + load,
            "total_ms": compute + overhead + load}


def predict_row(row: PubRow, graphs: Graphs, coeffs: dict[str, float], target: Target | None = None) -> float:
    target = target or row_target(row)
    if row.metric == "e2e":
        return pipeline_ms(graphs.get(row.model, "unet", row.resolution, row.batch), graphs.get(row.model, "text_encoder"),
                           graphs.get(row.model, "vae_decoder", row.resolution, 1), target, coeffs, row.steps,
                           row.reduce_memory)["total_ms"]
    comp = METRIC_COMPONENT[row.metric]
    return component_ms(graphs.get(row.model, comp, row.resolution, row.batch if comp == "unet" else 1), target, coeffs)


# ---- fitting -----------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    coefficients: dict[str, float]
    eras: dict[str, float]
    rows: list[PubRow]
    #: the factor of a runtime the fit never saw: the overall level, about which the era factors scatter
    unseen_era: float = 1.0
    predicted_ms: list[float] = field(default_factory=list)

    def coeffs_for(self, era: str) -> dict[str, float]:
        """Coefficients with ``scale`` = the era's factor (an era the fit never saw gets ``unseen_era``)."""
        return self.coefficients | {"scale": self.eras.get(era, self.unseen_era)}

    @property
    def n_free(self) -> int:
        return len(FREE) + 1 + len(self.eras)


def fit(rows: list[PubRow], graphs: Graphs, start: FitResult | None = None, max_nfev: int = 200) -> FitResult:
    """Maximum a posteriori fit: least squares on log(predicted/measured) over ``rows``, plus the physics priors
    (``PRIORS``) of the shared coefficients and a prior of 1 on every era factor (``ERA_SIGMA``), each in units
    of one row's typical error (``ROW_SIGMA``). A coefficient the rows identify follows the rows; one they
    do not stays at its physics prior instead of wandering to a bound. The era factors are the overall level
    (no prior) times a deviation pulled to 1, so an era the fit never saw is priced at the level
    (``FitResult.unseen_era``). Robust loss: one row no shared structure explains pulls linearly."""
    from scipy.optimize import least_squares

    eras = sorted({r.era for r in rows})
    free = [*FREE, "scale"]
    base = dict(DEFAULT_COEFFICIENTS) | FIXED | {k: v[0] for k, v in PRIORS.items()}
    if start:
        base |= {k: v for k, v in start.coefficients.items() if k in free}
    targets = [row_target(r) for r in rows]
    bounds = [BOUNDS.get(k, _EFF_BOUNDS) for k in FREE] + [ERA_BOUNDS] * (1 + len(eras))
    level = start.unseen_era if start else 1.0
    x0 = [math.log(base[k]) for k in FREE] + [math.log(level)] + [math.log((start.eras if start else {}).get(e, level) / level) for e in eras]
    lo, hi = [math.log(b[0]) for b in bounds], [math.log(b[1]) for b in bounds]
    x0 = [min(max(v, l + 1e-6), h - 1e-6) for v, l, h in zip(x0, lo, hi)]
    prior_mu = np.array([math.log(PRIORS[k][0]) for k in FREE] + [0.0] * (1 + len(eras)))
    # the overall level ("scale") has no prior: the rows set it; eras are deviations from it, pulled to 1
    prior_w = np.array([ROW_SIGMA / PRIORS[k][1] for k in FREE] + [0.0] + [ROW_SIGMA / ERA_SIGMA] * len(eras))

    def unpack(x):
        c = base | {k: float(math.exp(v)) for k, v in zip(free, x)}
        return c, {era: c["scale"] * float(math.exp(v)) for era, v in zip(eras, x[len(free):])}

    def residuals(x):
        c, e = unpack(x)
        data = [math.log(predict_row(r, graphs, c | {"scale": e.get(r.era, 1.0)}, t) / r.latency_ms) for r, t in zip(rows, targets)]
        return np.concatenate([np.array(data), prior_w * (np.asarray(x) - prior_mu)])

    res = least_squares(residuals, x0, bounds=(lo, hi), diff_step=1e-3, max_nfev=max_nfev, x_scale=1.0, loss=LOSS,
                        f_scale=ROW_SIGMA)
    c, e = unpack(res.x)
    out = FitResult(coefficients={k: c[k] for k in DEFAULT_COEFFICIENTS if k != "scale"}, eras=e, rows=rows,
                    unseen_era=c["scale"])
    out.predicted_ms = [predict_row(r, graphs, out.coeffs_for(r.era), t) for r, t in zip(rows, targets)]
    return out


def sole_evidence(rows: list[PubRow], metrics: Iterable[str] = ("unet_step", "e2e")) -> set[int]:
    """Rows that are the only UNet-timing (unet_step / e2e) evidence of their era: held out, their era's factor
    has nothing left to come from, so they are predicted at the typical runtime's factor whatever the model —
    their error measures how far that runtime sat from the others, not the model's physics."""
    counts: dict[str, int] = {}
    for r in rows:
        if r.metric in metrics:
            counts[r.era] = counts.get(r.era, 0) + 1
    return {r.index for r in rows if r.metric in metrics and counts[r.era] == 1}


def cross_validate(rows: list[PubRow], graphs: Graphs, full: FitResult, progress: Callable[[str], None] = lambda m: None,
                   max_nfev: int = 60) -> list[dict]:
    """Refit leaving out one device, one chip (every device on it: a new phone priced from its spec alone), one
    model (as published), one architecture (models that build the same network) and one era at a time; every
    left-out row's error."""
    out = []
    sole = sole_evidence(rows)
    folds = ([("device", d) for d in sorted({r.device for r in rows})] + [("chip", c) for c in sorted({r.chip for r in rows})]
             + [("model", m) for m in sorted({r.model for r in rows})]
             + [("arch", a) for a in sorted({r.arch for r in rows}) if len({r.model for r in rows if r.arch == a}) > 1]
             + [("era", e) for e in sorted({r.era for r in rows})])
    for kind, value in folds:
        held = [r for r in rows if getattr(r, kind) == value]
        train = [r for r in rows if getattr(r, kind) != value]
        progress(f"fold: without {kind} {value} ({len(held)} rows)")
        f = fit(train, graphs, start=full, max_nfev=max_nfev)
        for r in held:
            pred = predict_row(r, graphs, f.coeffs_for(r.era))
            out.append({"fold": f"{kind}={value}", "row": r.label, "metric": r.metric, "measured_ms": r.latency_ms,
                        "predicted_ms": round(pred, 2), "error_pct": round(100 * (pred / r.latency_ms - 1), 2),
                        "era_seen": r.era in f.eras, "sole_era_evidence": r.index in sole})
    return out


def summarize(cv: list[dict], metrics: Iterable[str] = ("unet_step", "e2e")) -> dict[str, Any]:
    errs = [abs(r["error_pct"]) for r in cv if r["metric"] in metrics]
    signed = [math.log(1 + r["error_pct"] / 100) for r in cv if r["metric"] in metrics]
    return {"rows": len(errs), "median_abs_error_pct": round(float(np.median(errs)), 2) if errs else None,
            "max_abs_error_pct": round(float(np.max(errs)), 2) if errs else None,
            "log_residual_p10_p90": [round(float(np.percentile(signed, 10)), 4), round(float(np.percentile(signed, 90)), 4)] if signed else None}
