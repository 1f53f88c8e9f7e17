"""recover: distil an approximated model back towards the original on unlabeled images."""

from __future__ import annotations

from detc.passes.recover.core import RecoverPass
from detc.passes.recover.options import RecoverOptions
from detc.passes.recover.report import RecoverReport, StepRecord

__all__ = ["RecoverOptions", "RecoverPass", "RecoverReport", "StepRecord"]
