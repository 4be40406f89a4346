"""Fit cost-model coefficients to measured latencies, one deployment profile at a time.

Published (and user-measured) latencies vary with iOS version, attention form and weight bits far more
than a FLOP count says, so every profile in the CSV gets its own coefficients. Chips never get their own:
a row measured on a registered phone is priced with that phone's spec, any other row with the spec of
``--target`` when the chip names match. The profile with the most rows is fitted first; profiles with
fewer rows than free coefficients start from its fit (bandwidth and cache physics are shared).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from snapopt.devices.cost_model import shared_coefficients
from snapopt.devices.latency import build_table
from snapopt.devices.target import Calibration, DeploymentProfile, ProfileVariant, Target
from snapopt.errors import TargetError, UsageError

REQUIRED_COLUMNS = ("device", "chip", "profile", "model", "component", "resolution", "batch", "weight_bits", "latency_ms")
COMPONENTS = {"unet_step": "unet", "unet": "unet", "vae_decoder": "vae_decoder", "vae_encoder": "vae_encoder",
              "text_encoder": "text_encoder"}
#: coefficients freed in this order as rows allow (one row fits a deployment-level scale only)
FIT_ORDER = ("scale", "score_spill_eff", "vector_ratio", "ane_eff_conv", "cache_eff", "dram_eff")
BOUNDS = {"scale": (0.05, 20.0), "dram_eff": (0.05, 1.0), "score_spill_eff": (0.01, 1.0), "cache_eff": (0.05, 1.0), "vector_ratio": (1e-4, 1.0)}
_EFF_BOUNDS = (1e-3, 1.0)


@dataclass
class Row:
    line: int
    device: str
    chip: str
    profile: str
    model: str
    component: str
    resolution: int
    batch: int
    weight_bits: int
    latency_ms: float
    source: str = ""
    attention: str | None = None
    compute_units: str | None = None

    @property
    def label(self) -> str:
        return f"{self.device}/{self.profile}/{self.model}/{self.component}"


@dataclass
class RowFit:
    row: Row
    target: Target
    predicted_ms: float = 0.0
    before_ms: float = 0.0

    @property
    def error(self) -> float:
        return self.predicted_ms / self.row.latency_ms - 1.0


@dataclass
class ProfileFit:
    profile: DeploymentProfile
    coefficients: dict[str, float]
    free: list[str]
    rows: list[RowFit] = field(default_factory=list)


def read_rows(path: str | Path) -> list[Row]:
    """Parse a latency CSV (columns of the shared calibration file; ``attention``/``compute_units`` optional)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--csv: file '{path}' not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UsageError(f"{path}: missing column '{missing[0]}' (need {', '.join(REQUIRED_COLUMNS)})")
        rows = []
        for i, rec in enumerate(reader, start=2):
            try:
                row = Row(line=i, device=rec["device"].strip(), chip=rec["chip"].strip(), profile=rec["profile"].strip(),
                          model=rec["model"].strip(), component=rec["component"].strip(), resolution=int(rec["resolution"]),
                          batch=int(rec["batch"]), weight_bits=int(rec["weight_bits"]), latency_ms=float(rec["latency_ms"]),
                          source=(rec.get("source") or "").strip(), attention=(rec.get("attention") or "").strip() or None,
                          compute_units=(rec.get("compute_units") or "").strip() or None)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"{path}:{i}: bad number ({exc})") from None
            if row.component not in COMPONENTS:
                raise UsageError(f"{path}:{i}: component '{row.component}' not one of {', '.join(COMPONENTS)}")
            if row.latency_ms <= 0:
                raise UsageError(f"{path}:{i}: latency_ms must be positive (got {row.latency_ms})")
            rows.append(row)
    if not rows:
        raise UsageError(f"{path}: no rows")
    return rows


def row_target(row: Row, base: Target, registry) -> Target | None:
    """The phone spec + profile a row was measured with, or None when its chip is unknown."""
    phone = None
    try:
        phone = registry.resolve(row.device)
    except TargetError:
        pass
    if phone is None or phone.device.chip.name != row.chip:
        phone = base if base.device.chip.name == row.chip else None
    if phone is None:
        return None
    known = {v.profile.name: v.profile for v in base.other_profiles} | {base.profile.name: base.profile}
    prof = known.get(row.profile) or DeploymentProfile(name=row.profile, attention=row.attention or base.profile.attention,
                                                       compute_units=row.compute_units or base.profile.compute_units)
    prof = prof.model_copy(update={"weight_bits": row.weight_bits, **({"attention": row.attention} if row.attention else {}),
                                   **({"compute_units": row.compute_units} if row.compute_units else {})})
    return phone.model_copy(update={"profile": prof, "calibration": Calibration()})


# ---- models named in CSV rows --------------------------------------------------------------------------
_VAE_VARIANT = re.compile(r"^(?P<base>.+)-vae-decoder-(?P<pct>\d+)pct-channels$")


def load_row_model(name: str):
    """An arch preset (``sd-v1.5``), ``<preset>-vae-decoder-<p>pct-channels`` (every VAE conv at p% width), or
    any model reference snapopt accepts (folder, zoo:, arch:)."""
    from snapopt.models.loading import load_model
    from snapopt.models.presets import PRESETS

    m = _VAE_VARIANT.match(name)
    if m and m["base"] in PRESETS:
        from diffusers import AutoencoderKL
        import torch

        pipe = load_model("arch:" + m["base"], components=("vae",), structure_only=True)
        spec = dict(PRESETS[m["base"]].vae)
        spec["block_out_channels"] = tuple(max(spec["norm_num_groups"], c * int(m["pct"]) // 100) for c in spec["block_out_channels"])
        with torch.device("meta"):
            pipe.vae = AutoencoderKL(**spec).eval()
        pipe.source = name
        return pipe
    if name in PRESETS:
        return load_model("arch:" + name, structure_only=True)
    return load_model(name, structure_only=name.startswith("arch:"))


class GraphCache:
    """Captures each (model, component, shapes) once; fitting re-prices the same graphs many times."""

    def __init__(self) -> None:
        self._pipes: dict[str, Any] = {}
        self._graphs: dict[tuple, Any] = {}

    def graph(self, row: Row):
        from snapopt.capture import block_graph
        from snapopt.lowering.interfaces import Shapes

        comp = COMPONENTS[row.component]
        key = (row.model, comp, row.resolution, row.batch)
        if key not in self._graphs:
            if row.model not in self._pipes:
                self._pipes[row.model] = load_row_model(row.model)
            pipe = self._pipes[row.model]
            shapes = (Shapes(resolution=pipe.resolution, batch=row.batch, text_len=row.resolution) if comp == "text_encoder"
                      else Shapes(resolution=row.resolution, batch=row.batch))
            self._graphs[key] = block_graph(pipe, comp, shapes)
        return self._graphs[key]


# ---- fitting ---------------------------------------------------------------------------------------------
def predict_ms(fit: RowFit, cache: GraphCache, coefficients: dict[str, float]) -> float:
    return build_table(cache.graph(fit.row), fit.target, coefficients).total_ms


def fit_profile(rows: list[RowFit], cache: GraphCache, start: dict[str, float], free: list[str]) -> dict[str, float]:
    """Least squares on log(predicted/measured) over the free coefficients (log-parametrised, bounded)."""
    import numpy as np
    from scipy.optimize import least_squares

    def coeffs(x) -> dict[str, float]:
        return start | {k: float(math.exp(v)) for k, v in zip(free, x)}

    def residuals(x):
        c = coeffs(x)
        return np.array([math.log(predict_ms(r, cache, c) / r.row.latency_ms) for r in rows])

    lo = [math.log(BOUNDS.get(k, _EFF_BOUNDS)[0]) for k in free]
    hi = [math.log(BOUNDS.get(k, _EFF_BOUNDS)[1]) for k in free]
    x0 = [min(max(math.log(start[k]), l + 1e-9), h - 1e-9) for k, l, h in zip(free, lo, hi)]
    result = least_squares(residuals, x0, bounds=(lo, hi), x_scale=1.0, diff_step=1e-3, max_nfev=400)
    return coeffs(result.x)


def calibrate(rows: list[Row], base: Target, registry, progress: Callable[[str], None] = lambda m: None,
              cache: GraphCache | None = None) -> tuple[list[ProfileFit], list[Row]]:
    """Fit every profile present in ``rows``; returns the fits and the rows skipped (unknown chip)."""
    cache = cache or GraphCache()
    groups: dict[str, list[RowFit]] = {}
    skipped = []
    for row in rows:
        t = row_target(row, base, registry)
        if t is None:
            skipped.append(row)
            continue
        groups.setdefault(row.profile, []).append(RowFit(row, t))
    if not groups:
        raise UsageError(f"no CSV row was measured on a registered phone or on chip {base.device.chip.name} (--target {base.id})")
    fits: list[ProfileFit] = []
    shared = shared_coefficients()  # start from the shared fit on every published number (snapopt.devices.fit)
    for name, group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        progress(f"capturing {len(group)} rows of profile {name}")
        for r in group:
            cache.graph(r.row)
        free = list(FIT_ORDER[: min(len(group), len(FIT_ORDER))])
        start = dict(shared) if fits else shared_coefficients()
        if fits:
            start["scale"] = 1.0
        for r in group:
            r.before_ms = predict_ms(r, cache, start)
        progress(f"fitting {', '.join(free)} for profile {name}")
        fitted = fit_profile(group, cache, start, free)
        for r in group:
            r.predicted_ms = predict_ms(r, cache, fitted)
        if not fits:
            shared = fitted
        fits.append(ProfileFit(group[0].target.profile.model_copy(update={"weight_bits": group[0].row.weight_bits}), fitted, free, group))
    return fits, skipped


def calibrated_target(base: Target, fits: list[ProfileFit]) -> Target:
    """``base`` with each fitted profile's coefficients (new profiles are added as other profiles)."""
    target = base
    for fit in fits:
        cal = Calibration(coefficients={k: round(v, 6) for k, v in fit.coefficients.items()},
                          fitted_on=[f"{r.row.label} = {r.row.latency_ms:g} ms ({r.row.source})" if r.row.source else
                                     f"{r.row.label} = {r.row.latency_ms:g} ms" for r in fit.rows])
        if fit.profile.name == target.profile.name:
            target = target.model_copy(update={"calibration": cal})
            continue
        others = [v for v in target.other_profiles if v.profile.name != fit.profile.name]
        prev = next((v.profile for v in target.other_profiles if v.profile.name == fit.profile.name), fit.profile)
        target = target.model_copy(update={"other_profiles": [*others, ProfileVariant(profile=prev, calibration=cal)]})
    return target


def write_target(target: Target, path: str | Path, header: str = "") -> Path:
    """Write a target YAML file (the format :func:`snapopt.devices.target.load_target_file` reads)."""
    path = Path(path)
    data = target.model_dump(mode="json", exclude_defaults=False)
    if not data.get("other_profiles"):
        data.pop("other_profiles", None)
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(data, sort_keys=False)
    path.write_text(text)
    return path


def fit_table(fits: list[ProfileFit]) -> list[dict[str, Any]]:
    return [{"profile": f.profile.name, "row": r.row.label, "line": r.row.line, "measured_ms": r.row.latency_ms,
             "before_ms": round(r.before_ms, 2), "predicted_ms": round(r.predicted_ms, 2), "error_pct": round(100 * r.error, 2),
             "free": f.free} for f in fits for r in f.rows]
