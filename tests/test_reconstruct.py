"""Least-squares refit and mean-shift bias of pruned Convs, on tiny seeded samples."""

from __future__ import annotations

import numpy as np

from detc.passes._reconstruct import NormalEquations, mean_shift_bias, patch_mask


def _samples(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """``count`` patches of ``dim`` correlated, non-zero-mean inputs, with the constant 1 last."""
    mixing = rng.normal(0.0, 1.0, (dim, dim))
    x = rng.normal(0.0, 1.0, (count, dim)) @ mixing + rng.uniform(0.5, 2.0, dim)
    return np.hstack([x, np.ones((count, 1))])


def test_patch_mask_repeats_each_channel_over_its_taps_and_keeps_the_bias() -> None:
    mask = patch_mask(np.array([True, False, True]), 2)
    assert mask.tolist() == [True, True, False, False, True, True, True]


def test_from_second_moment_equals_accumulated_samples(rng: np.random.Generator) -> None:
    patches = _samples(rng, 200, 5)
    weight = rng.normal(0.0, 1.0, (3, 6))  # [W | b]
    columns = np.array([True, False, True, True, False, True])
    accumulated = NormalEquations.zeros(int(columns.sum()), 3)
    accumulated.add(patches[:, columns], patches @ weight.T)

    derived = NormalEquations.from_second_moment(patches.T @ patches, columns, weight)

    for name in ("gram", "cross", "y_squared", "y_sum"):
        np.testing.assert_allclose(
            getattr(derived, name), getattr(accumulated, name), rtol=1e-10, err_msg=name
        )
    assert derived.count == accumulated.count == 200


def test_refit_is_exact_when_the_removed_input_is_a_combination_of_the_kept(
    rng: np.random.Generator,
) -> None:
    patches = _samples(rng, 300, 4)
    patches[:, 3] = 2.0 * patches[:, 0] - patches[:, 1] + 0.5  # input 3 is redundant
    weight = rng.normal(0.0, 1.0, (2, 5))
    columns = np.array([True, True, True, False, True])
    equations = NormalEquations.zeros(4, 2)
    equations.add(patches[:, columns], patches @ weight.T)

    theta = equations.solve(ridge=0.0)

    assert equations.relative_error(theta) < 1e-12
    sliced = weight[:, columns].T
    assert equations.relative_error(sliced) > 1e-2  # slicing alone loses the redundant input


def test_ridge_pulls_towards_the_prior_not_towards_zero(rng: np.random.Generator) -> None:
    patches = _samples(rng, 50, 6)
    weight = rng.normal(0.0, 1.0, (3, 7))
    targets = patches @ weight.T + rng.normal(0.0, 0.5, (50, 3))
    equations = NormalEquations.zeros(7, 3)
    equations.add(patches, targets)
    prior = weight.T

    fitted = equations.solve(ridge=1e-8)
    pulled = equations.solve(ridge=1e6, prior=prior)
    shrunk = equations.solve(ridge=1e6)

    least_squares = np.linalg.lstsq(patches, targets, rcond=None)[0]
    np.testing.assert_allclose(fitted, least_squares, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pulled[:-1], prior[:-1], rtol=1e-4, atol=1e-4)
    assert np.abs(shrunk[:-1]).max() < 1e-4  # without a prior the weights go to zero
    assert not np.allclose(pulled[-1], 0.0)  # the bias is never shrunk


def test_mean_shift_bias_keeps_the_output_mean(rng: np.random.Generator) -> None:
    patches = _samples(rng, 400, 5)
    weight = rng.normal(0.0, 1.0, (4, 6))
    columns = np.array([True, False, True, False, True, True])
    original = patches @ weight.T

    bias = mean_shift_bias(weight, patches.T @ patches, columns)

    shifted = patches[:, columns[:-1].nonzero()[0]] @ weight[:, :-1][:, columns[:-1]].T + bias
    sliced = shifted - bias + weight[:, -1]
    np.testing.assert_allclose(shifted.mean(axis=0), original.mean(axis=0), rtol=1e-9, atol=1e-9)
    assert np.abs(sliced.mean(axis=0) - original.mean(axis=0)).min() > 1e-2


def test_mean_shift_bias_does_nothing_when_nothing_is_removed(rng: np.random.Generator) -> None:
    patches = _samples(rng, 30, 3)
    weight = rng.normal(0.0, 1.0, (2, 4))
    bias = mean_shift_bias(weight, patches.T @ patches, np.ones(4, bool))
    np.testing.assert_array_equal(bias, weight[:, -1])
