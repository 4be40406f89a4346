"""A target = an iPhone's spec + a deployment profile + calibration coefficients.

Chip differences come from the spec (Neural Engine throughput, memory bandwidth …); the calibration
coefficients are shared across chips wherever physics allows, so a model fit on one phone generalises to
the others. Targets are data (YAML); see docs/adding-an-iphone.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from snapopt.errors import TargetError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChipSpec(_Strict):
    name: str = Field(description="SoC name, e.g. A16")
    ane_tops: float = Field(gt=0, description="Apple-stated Neural Engine peak, trillion ops/s (int8 on A17 Pro and later)")
    ane_tops_precision: Literal["fp16", "int8"] = Field("fp16", description="precision Apple's TOPS figure is quoted at")
    gpu_tflops_fp16: float = Field(gt=0, description="GPU fp16 peak, TFLOP/s")
    cpu_gflops_fp16: float = Field(gt=0, description="CPU (performance cores, NEON) fp16 peak, GFLOP/s")
    memory_bandwidth_gbs: float = Field(gt=0, description="DRAM bandwidth, GB/s")
    memory_type: str = ""
    ram_gb: float = Field(gt=0)
    system_cache_mb: float = Field(gt=0, description="on-chip system-level cache shared by ANE/GPU, MB")


class DeviceSpec(_Strict):
    name: str = Field(description="marketing name, e.g. iPhone 14 Pro")
    chip: ChipSpec
    ios: str = Field(description="iOS version the deployment assumes; sets the Core ML minimum deployment target")
    max_weights_per_model_mb: float = Field(1024, gt=0, description="iOS refuses larger single models unless palettized (chunk above it)")


class DeploymentProfile(_Strict):
    """How the model is deployed: published latencies differ by attention form, weight bits and runtime,
    so each profile carries its own calibration."""

    name: str = "fp16"
    attention: Literal["original", "split_einsum", "split_einsum_v2", "sdpa"] = Field(
        "split_einsum", description="attention form on device; split_einsum_v2 also chunks the query sequence (Apple's SPLIT_EINSUM_V2)")
    weight_bits: int = Field(16, description="16 (fp16) or palettization bits 1-8")
    activation_bits: Literal[8, 16] = Field(16, description="8: W8A8 (int8 activations); the Neural Engine computes "
                                                         "int8 at twice the fp16 rate only where the chip's TOPS are int8 (A17 Pro+)")
    compute_units: Literal["CPU_AND_NE", "ALL", "CPU_AND_GPU", "CPU_ONLY"] = "CPU_AND_NE"
    era: str | None = Field(None, description="runtime era whose fitted factor prices this deployment (see "
                                              "docs/cost-model.md: snapfusion, 2022-11, 2023-02, 2023-06, 2023-08); default the latest")


class Calibration(_Strict):
    """Coefficients of the latency cost model (see snapopt.devices.cost_model); empty means defaults."""

    coefficients: dict[str, float] = Field(default_factory=dict)
    fitted_on: list[str] = Field(default_factory=list)


class ProfileVariant(_Strict):
    """Another deployment of the same phone, with its own calibration (select it as ``<id>@<profile name>``)."""

    profile: DeploymentProfile
    calibration: Calibration = Field(default_factory=Calibration)


class Target(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="registry id, e.g. iphone-14-pro")
    device: DeviceSpec
    profile: DeploymentProfile = Field(default_factory=DeploymentProfile)
    calibration: Calibration = Field(default_factory=Calibration)
    other_profiles: list[ProfileVariant] = Field(default_factory=list, description="further calibrated deployments")

    @property
    def calibrated(self) -> bool:
        """True when published or measured rows on this chip and profile went into its coefficients; an
        uncalibrated target is priced from the shared coefficients and its spec alone (flag it when printing)."""
        return bool(self.calibration.fitted_on)

    @property
    def calibrated_profiles(self) -> list[str]:
        """Profiles of this phone with calibration rows (what `snapopt targets` shows as calibrated)."""
        return [p for p in self.profile_names() if self.with_profile(p).calibrated]

    def profile_names(self) -> list[str]:
        return [self.profile.name, *(v.profile.name for v in self.other_profiles)]

    def with_profile(self, name: str) -> "Target":
        """This phone under another of its deployment profiles (the profile's calibration comes with it)."""
        if name == self.profile.name:
            return self
        for v in self.other_profiles:
            if v.profile.name == name:
                return self.model_copy(update={"profile": v.profile, "calibration": v.calibration})
        raise TargetError(f"target '{self.id}' has no profile '{name}'; profiles: {', '.join(self.profile_names())}")

    @property
    def ios_major(self) -> int:
        return int(self.device.ios.split(".")[0])

    def coreml_deployment_target(self):
        """The coremltools ``minimum_deployment_target`` for this target's iOS (ML programs need iOS 15+)."""
        from snapopt.lowering.coreml import import_coremltools

        ct = import_coremltools()
        major = max(15, self.ios_major)
        for candidate in range(major, 14, -1):
            t = getattr(ct.target, f"iOS{candidate}", None)
            if t is not None:
                return t
        raise TargetError(f"target '{self.id}': no Core ML deployment target for iOS {self.device.ios}")


def load_target_file(path: str | Path) -> Target:
    """Parse and validate a target YAML file; one line naming file and field on error."""
    path = Path(path)
    if not path.is_file():
        raise TargetError(f"target file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TargetError(f"target file '{path}': invalid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise TargetError(f"target file '{path}': expected a mapping at the top level")
    try:
        return Target.model_validate(data)
    except ValidationError as exc:
        raise TargetError(f"target file '{path}': {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    errors = exc.errors()
    # a misspelt key also makes the intended one "missing": name the misspelling first
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    value = err.get("input")
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(value, (dict, list)) else f" (got {value!r})"
    return f"{loc or '<root>'}: {msg}{shown}"
