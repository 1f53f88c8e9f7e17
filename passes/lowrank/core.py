"""lowrank: factorize Gemm / MatMul / Conv weights into cheaper products (approximate).

Forms, all in float64 and cast back to the weight's dtype:

* **svd** (Gemm, MatMul, 1x1 Conv): ``W ≈ F2 F1`` from a truncated SVD, as two products (two
  1x1 Convs): ``r (C + N)`` MACs per output pixel instead of ``C N``.
* **tucker2** (kxk Conv): 1x1 Conv to ``r1`` channels -> kxk core ``r1 -> r2`` (the original
  stride, padding, dilation) -> 1x1 Conv to ``N`` with the bias. From a higher-order SVD: the
  leading singular vectors of the weight's input- and output-channel unfoldings.
* **spatial** (kxk Conv): a kx1 Conv to ``r`` channels, then a 1xk Conv to ``N``: the SVD of
  the weight seen as a (C*kh) x (N*kw) matrix (separable in height and width).

Each layer takes the form with the fewest MACs at its ranks. A rank keeps ``energy`` of the
spectrum (squared singular values), rounded up to ``multiple``; ``mac_reduction`` instead finds
one energy threshold for the whole model that removes that share of its MACs. Layers whose best
form does not cut their MACs by ``min_saving`` are left alone, and ``detc explain`` says so.

With ``calib`` images the spectra are those of the data: the output side keeps the principal
directions of the layer's *output* covariance (so ``W ≈ U U^T W`` with the bias absorbing the
mean: the best rank-r approximation of the layer's response on that data), the input side
is whitened by the input covariance before the SVD, and the last factor and bias are then refit
by least squares to reproduce the original output on the calibration patches.

This module is the pass; :mod:`.plan` decides what each layer becomes (statistics, spectra,
ranks), :mod:`.factors` builds and emits the factors, :mod:`.options` holds options and report.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from detc.compiler.ir.pass_base import Candidate, DetcPass, NoMatch, PassResult, node_label
from detc.passes.calibration import calibration_feeds, static_facts
from detc.passes.lowrank.factors import factorize
from detc.passes.lowrank.options import LayerDecision, LowRankOptions, LowRankReport
from detc.passes.lowrank.plan import best_plan, candidate_layers, energy_threshold, gather_moments

logger = logging.getLogger(__name__)


class LowRankPass(DetcPass):
    """Low-rank factorization of Gemm/MatMul/Conv weights (SVD, Tucker-2, spatial SVD).

    Per layer the form that cuts most MACs at ranks keeping ``energy`` of the spectrum (or one
    global threshold meeting ``mac_reduction``), ranks rounded up to ``multiple``; with ``calib``
    the spectra are the data's (output principal components, whitened inputs) and the last
    factor and bias are refit by least squares. Layers whose MACs would not fall by
    ``min_saving`` are left alone.
    """

    name = "lowrank"
    exact = False
    Options = LowRankOptions
    calibration_option = "calib"
    sweep_option = "mac_reduction"

    options: LowRankOptions

    def __init__(self, options: LowRankOptions | None = None) -> None:
        super().__init__(options)
        self.report: LowRankReport | None = None

    def explain(self, model: ir.Model) -> list[Candidate]:
        """Weight-only decisions (calibration statistics are not gathered to explain)."""
        layers, rejected = candidate_layers(model, self.options)
        energy = self.options.energy if self.options.mac_reduction is None else None
        threshold = energy if energy is not None else energy_threshold(layers, self.options)
        lines = [Candidate(node_label(n), n.op_type, False, r.reason) for n, r in rejected]
        for layer in layers:
            plan = best_plan(layer, threshold, self.options)
            if isinstance(plan, NoMatch):
                lines.append(
                    Candidate(node_label(layer.node), layer.node.op_type, False, plan.reason)
                )
            else:
                lines.append(Candidate(node_label(layer.node), layer.node.op_type, True))
        return lines

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        layers, rejected = candidate_layers(model, opts)
        total = sum(static_facts(model)[1].values())
        report = LowRankReport(str(opts), total, total, opts.energy)
        self.report = report
        if opts.calib is not None and layers:
            feeds = calibration_feeds(
                model, opts.calib, max_images=opts.calib_images, seed=opts.seed, spec_path=opts.spec
            )
            gather_moments(model, layers, feeds, opts)
            report.calib_images = len(feeds)
        threshold = opts.energy if opts.mac_reduction is None else energy_threshold(layers, opts)
        report.energy = threshold
        report.layers = [
            LayerDecision(node_label(n), "", (), 0, 0, reason=r.reason) for n, r in rejected
        ]
        saved = 0
        for layer in layers:
            plan = best_plan(layer, threshold, opts)
            label = node_label(layer.node)
            if isinstance(plan, NoMatch):
                report.layers.append(
                    LayerDecision(label, "", (), layer.macs, layer.macs, reason=plan.reason)
                )
                continue
            error = factorize(model.graph, layer, plan)
            saved += layer.macs - plan.macs
            report.layers.append(
                LayerDecision(label, plan.form, plan.ranks, layer.macs, plan.macs, error)
            )
        report.macs_after = total - saved
        logger.info("%s", report.table())
        return PassResult(model, saved != 0 or any(d.form for d in report.layers))
