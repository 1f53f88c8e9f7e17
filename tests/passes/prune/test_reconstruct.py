"""Least-squares refit and mean-shift bias of pruned Convs, on tiny seeded samples."""

from __future__ import annotations

import numpy as np

from detc.passes.prune.reconstruct import (
    RIDGE_GRID,
    NormalEquations,
    choose_ridge,
    mean_shift_bias,
    patch_mask,
)


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


def _equations(patches: np.ndarray, targets: np.ndarray) -> NormalEquations:
    equations = NormalEquations.zeros(patches.shape[1], targets.shape[1])
    equations.add(patches, targets)
    return equations


def test_ridge_zero_with_a_prior_is_plain_least_squares(rng: np.random.Generator) -> None:
    patches = _samples(rng, 80, 5)
    targets = patches @ rng.normal(0.0, 1.0, (6, 2)) + rng.normal(0.0, 0.3, (80, 2))
    prior = rng.normal(0.0, 1.0, (6, 2))

    theta = _equations(patches, targets).solve(ridge=0.0, prior=prior)

    least_squares = np.linalg.lstsq(patches, targets, rcond=None)[0]
    np.testing.assert_allclose(theta, least_squares, rtol=1e-6, atol=1e-8)


def test_infinite_ridge_keeps_the_prior_weights_and_refits_the_bias(
    rng: np.random.Generator,
) -> None:
    patches = _samples(rng, 60, 4)
    targets = patches @ rng.normal(0.0, 1.0, (5, 3))
    prior = rng.normal(0.0, 1.0, (5, 3))

    theta = _equations(patches, targets).solve(ridge=np.inf, prior=prior)

    np.testing.assert_array_equal(theta[:-1], prior[:-1])
    residual = targets - patches[:, :-1] @ prior[:-1]
    np.testing.assert_allclose(theta[-1], residual.mean(axis=0), rtol=1e-9, atol=1e-9)


def test_merged_equations_are_those_of_all_samples(rng: np.random.Generator) -> None:
    patches = _samples(rng, 40, 3)
    targets = rng.normal(0.0, 1.0, (40, 2))

    merged = _equations(patches[:25], targets[:25]).merged(_equations(patches[25:], targets[25:]))

    whole = _equations(patches, targets)
    for name in ("gram", "cross", "y_squared", "y_sum"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-12)
    assert merged.count == whole.count == 40


def test_choose_ridge_trusts_plentiful_data_and_distrusts_scarce_noisy_data(
    rng: np.random.Generator,
) -> None:
    dim = 12
    prior = rng.normal(0.0, 1.0, (dim + 1, 2))
    truth = prior + rng.normal(0.0, 1.0, prior.shape)  # the data really moved away from prior

    def noisy(count: int, noise: float, weights: np.ndarray) -> NormalEquations:
        patches = _samples(rng, count, dim)
        return _equations(patches, patches @ weights + rng.normal(0.0, noise, (count, 2)))

    plenty, plenty_errors = choose_ridge(noisy(2000, 0.01, truth), noisy(500, 0.01, truth), prior)
    # few noisy samples of a target the prior already explains: fitting them fits the noise
    scarce, scarce_errors = choose_ridge(noisy(16, 3.0, prior), noisy(500, 3.0, prior), prior)

    assert plenty == RIDGE_GRID[0]
    assert plenty_errors[0] == min(plenty_errors)
    assert scarce >= 1.0
    assert scarce_errors[RIDGE_GRID.index(scarce)] < scarce_errors[0]
