"""The aarch64 target: presets per core, cross-compilation, NEON/dotprod int8."""

from __future__ import annotations

from detc.targets.arm.target import ARM_PRESETS, ArmPreset, ArmTarget, arm_target, get_arm_preset

__all__ = ["ARM_PRESETS", "ArmPreset", "ArmTarget", "arm_target", "get_arm_preset"]
