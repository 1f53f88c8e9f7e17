"""int8 QDQ quantization and float16 conversion, with the mixed-precision search."""

from __future__ import annotations

from detc.passes.quantize.core import QuantizeOptions, QuantizePass, QuantizeReport

__all__ = ["QuantizeOptions", "QuantizePass", "QuantizeReport"]
