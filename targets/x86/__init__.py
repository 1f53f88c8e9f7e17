"""The x86-64 target: host CPU detection, the blocked NCHW[x]c layout, AVX-512/VNNI int8."""

from __future__ import annotations

from detc.targets.x86.target import X86Target

__all__ = ["X86Target"]
