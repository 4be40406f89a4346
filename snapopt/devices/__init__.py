"""Targets (iPhones + deployment profiles) and their registry."""

from snapopt.devices.registry import TARGETS, TargetRegistry
from snapopt.devices.target import Calibration, ChipSpec, DeploymentProfile, DeviceSpec, Target, load_target_file

__all__ = ["Calibration", "ChipSpec", "DeploymentProfile", "DeviceSpec", "TARGETS", "Target", "TargetRegistry", "load_target_file"]
