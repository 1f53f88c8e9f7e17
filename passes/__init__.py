"""Built-in passes, one per file. Each module defines one :class:`detc.compiler.DetcPass`."""

from __future__ import annotations

from detc.passes.eliminate_dead_code import EliminateDeadCodePass
from detc.passes.fold_constants import FoldConstantsPass
from detc.passes.fold_conv_bn import FoldConvBatchNormPass
from detc.passes.fold_conv_mul_add import FoldConvMulAddPass
from detc.passes.lowrank.core import LowRankPass
from detc.passes.prune.core import PrunePass
from detc.passes.quantize.core import QuantizePass
from detc.passes.recover.core import RecoverPass
from detc.passes.remove_identity import RemoveIdentityPass

#: every built-in pass; the registry adds plugins from the entry-point group ``detc.passes``
BUILTIN_PASSES = (
    EliminateDeadCodePass,
    FoldConstantsPass,
    FoldConvBatchNormPass,
    FoldConvMulAddPass,
    LowRankPass,
    PrunePass,
    QuantizePass,
    RecoverPass,
    RemoveIdentityPass,
)

__all__ = [
    "BUILTIN_PASSES",
    "EliminateDeadCodePass",
    "FoldConstantsPass",
    "FoldConvBatchNormPass",
    "FoldConvMulAddPass",
    "LowRankPass",
    "PrunePass",
    "QuantizePass",
    "RecoverPass",
    "RemoveIdentityPass",
]
