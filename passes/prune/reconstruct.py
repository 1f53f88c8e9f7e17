"""Least squares that put a pruned Conv back on its original output, and the mean-shift bias.

A Conv is a linear map of its im2col patch: ``y = W x + b``. After pruning it sees fewer
input channels (and, in a sequential refit, inputs that drifted), so its new weights solve

    min_theta  sum_samples ||y - theta^T [x', 1]||^2 + ridge * ||theta_w - prior_w||^2

from normal equations accumulated over sampled output pixels of calibration images. The ridge
pulls the weights towards ``prior`` (the original weights sliced to the surviving inputs), not
towards zero: with few calibration images the fit then only moves the original where the data
say so, instead of shrinking every weight. The bias is never shrunk; an infinite ridge keeps the
prior weights and fits the bias alone (a bias correction).

How strong the ridge should be depends on how many samples a Conv's inputs really span, which
the calibration set cannot say about itself: :func:`choose_ridge` fits on some calibration
images and keeps the strength whose error is least on the others.

Without a refit, :func:`mean_shift_bias` keeps only the cheapest part of it: the removed
inputs' mean contribution moves into the bias, so the output keeps its mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

#: ridge of the normal equations, relative to their mean diagonal: enough to tame inputs that
#: are (nearly) dead on the calibration images, far below any real signal
DEFAULT_RIDGE = 1e-4
#: relative ridge strengths :func:`choose_ridge` tries, from a plain least squares to none at all
#: (``inf``: the prior weights with a refit bias)
RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)


def patch_mask(keep_in: np.ndarray, taps: int) -> np.ndarray:
    """Columns of ``[patch, 1]`` that survive when the input channels ``keep_in`` are kept.

    A patch holds ``taps`` (kernel height x width) columns per input channel, channel-major,
    then the constant 1 of the bias.
    """
    return np.append(np.repeat(np.asarray(keep_in, dtype=bool), taps), True)


@dataclass
class NormalEquations:
    """``y ~ theta^T [x, 1]`` for one Conv, summed over samples, in float64."""

    gram: np.ndarray  # sum of x x^T over samples (x with the constant 1 last)
    cross: np.ndarray  # sum of x y^T
    y_squared: np.ndarray  # per output: sum of y^2
    y_sum: np.ndarray  # per output: sum of y
    count: float

    @classmethod
    def zeros(cls, dim: int, outputs: int) -> NormalEquations:
        return cls(
            np.zeros((dim, dim)), np.zeros((dim, outputs)), np.zeros(outputs), np.zeros(outputs), 0
        )

    @classmethod
    def from_second_moment(
        cls, second_moment: np.ndarray, columns: np.ndarray, weight: np.ndarray
    ) -> NormalEquations:
        """Regress ``weight @ [x, 1]`` (the original output) on the ``columns`` of ``[x, 1]``.

        ``second_moment`` is the sum of ``[x, 1][x, 1]^T`` over the samples, ``weight`` the
        original ``[W | b]`` (outputs x dim).
        """
        return cls(
            gram=second_moment[np.ix_(columns, columns)],
            cross=second_moment[columns] @ weight.T,
            y_squared=np.einsum("ij,jk,ik->i", weight, second_moment, weight, optimize=True),
            y_sum=weight @ second_moment[:, -1],
            count=float(second_moment[-1, -1]),
        )

    def add(self, patches: np.ndarray, targets: np.ndarray) -> None:
        """Accumulate samples: ``patches`` (P, dim), constant 1 last; ``targets`` (P, out)."""
        self.gram += patches.T @ patches
        self.cross += patches.T @ targets
        self.y_squared += (targets**2).sum(axis=0)
        self.y_sum += targets.sum(axis=0)
        self.count += patches.shape[0]

    def merged(self, other: NormalEquations) -> NormalEquations:
        """The equations of both sample sets together."""
        return NormalEquations(
            self.gram + other.gram,
            self.cross + other.cross,
            self.y_squared + other.y_squared,
            self.y_sum + other.y_sum,
            self.count + other.count,
        )

    def ridge_strength(self, ridge: float) -> float:
        dim = self.gram.shape[0]
        return ridge * max(float(np.trace(self.gram[:-1, :-1])) / max(dim - 1, 1), 1e-12)

    def regularized_gram(self, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
        regularized = self.gram + self.ridge_strength(ridge) * np.eye(self.gram.shape[0])
        regularized[-1, -1] = self.gram[-1, -1]  # the bias is not shrunk
        return regularized

    def solve(self, ridge: float = DEFAULT_RIDGE, prior: np.ndarray | None = None) -> np.ndarray:
        """``theta`` (dim x outputs); the ridge pulls it towards ``prior`` (same shape) if given.

        ``ridge=inf`` keeps the prior's weights (zeros without one) and fits only the bias.
        """
        if math.isinf(ridge):
            return self.solve_bias(np.zeros_like(self.cross) if prior is None else prior)
        regularized = self.regularized_gram(ridge)
        right = self.cross
        if prior is not None:
            pull = self.ridge_strength(ridge) * prior
            pull[-1] = 0.0
            right = right + pull
        try:
            return scipy.linalg.solve(regularized, right, assume_a="pos")
        except (np.linalg.LinAlgError, ValueError):
            return np.linalg.lstsq(regularized, right, rcond=None)[0]

    def solve_bias(self, theta: np.ndarray) -> np.ndarray:
        """``theta`` with its weights kept and the bias (last row) that fits them best."""
        fitted = np.array(theta, dtype=np.float64)
        if self.count <= 0:
            return fitted
        weights = fitted[:-1]
        fitted[-1] = (self.cross[-1] - self.gram[-1, :-1] @ weights) / self.gram[-1, -1]
        return fitted

    def channel_errors(self, theta: np.ndarray) -> np.ndarray:
        """Per output: sum over samples of (y - theta^T x)^2."""
        value = (
            self.y_squared
            - 2.0 * np.einsum("ij,ij->j", theta, self.cross)
            + np.einsum("ij,ik,kj->j", theta, self.gram, theta, optimize=True)
        )
        return np.maximum(value, 0.0)

    def channel_scales(self) -> np.ndarray:
        """Per output: the variance errors are measured against.

        Each output counts alike, whatever its spread: a detection head's box logits vary ten
        times less than its objectness logits but matter as much. A floor keeps (nearly)
        constant outputs from dominating.
        """
        variance = np.maximum(self.y_squared - self.y_sum**2 / max(self.count, 1.0), 0.0)
        return variance + 1e-3 * float(variance.mean()) + 1e-30

    def relative_error(self, theta: np.ndarray) -> float:
        """Mean over outputs of the squared error relative to the output's variance."""
        return float((self.channel_errors(theta) / self.channel_scales()).mean())


def mean_shift_bias(
    augmented_weight: np.ndarray, second_moment: np.ndarray, columns: np.ndarray
) -> np.ndarray:
    """The bias that keeps the output's mean when only ``columns`` of ``[x, 1]`` remain.

    ``augmented_weight`` is ``[W | b]`` (outputs x dim) and ``second_moment`` the sum of
    ``[x, 1][x, 1]^T`` over calibration samples (its last row holds the sums of ``x``): each
    removed input is replaced by its mean, ``b' = b + W_removed @ mean(x_removed)``.
    """
    mean = second_moment[-1] / max(float(second_moment[-1, -1]), 1.0)
    removed = ~np.asarray(columns, dtype=bool)
    return augmented_weight[:, -1] + augmented_weight[:, removed] @ mean[removed]


def choose_ridge(
    fit: NormalEquations,
    held: NormalEquations,
    prior: np.ndarray,
    grid: tuple[float, ...] = RIDGE_GRID,
) -> tuple[float, list[float]]:
    """The ridge of ``grid`` whose solution on ``fit`` has the least error on ``held``.

    Both are normal equations of the same regression on different images, ``prior`` the weights
    the ridge pulls towards. Returns the chosen strength and the held-out relative error of each
    strength of ``grid`` (a tie goes to the stronger ridge: the prior is the safer guess).
    """
    errors = [held.relative_error(fit.solve(ridge, prior=prior)) for ridge in grid]
    best = min(range(len(grid)), key=lambda i: (errors[i], -i))
    return grid[best], errors
