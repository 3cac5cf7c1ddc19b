"""Ridge maps of the `translate` objective against a float64 NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from expertsteer.method.translate import (
    TranslateConfig,
    _halves,
    fit_pair,
    r2_matrix,
    r2_score,
    ridge_map,
)


def _linear_pair(n: int = 600, d_x: int = 12, d_y: int = 8, noise: float = 0.1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_x, generator=generator, dtype=torch.float64)
    a = torch.randn(d_x, d_y, generator=generator, dtype=torch.float64)
    y = x @ a + noise * torch.randn(n, d_y, generator=generator, dtype=torch.float64)
    return x - x.mean(0), y - y.mean(0), a


def test_ridge_map_equals_numpy_closed_form():
    x, y, _ = _linear_pair()
    lam = 0.05
    n, d = x.shape
    xn, yn = x.numpy(), y.numpy()
    reference = np.linalg.solve(xn.T @ xn + lam * n * np.eye(d), xn.T @ yn).T
    np.testing.assert_allclose(ridge_map(x, y, lam).numpy(), reference, rtol=1e-9, atol=1e-10)
    least_squares = np.linalg.lstsq(xn, yn, rcond=None)[0].T
    np.testing.assert_allclose(ridge_map(x, y, 1e-12).numpy(), least_squares, atol=1e-8)


def test_reduced_rank_keeps_the_leading_fitted_directions():
    x, y, _ = _linear_pair()
    full, low = ridge_map(x, y, 1e-3), ridge_map(x, y, 1e-3, rank=2)
    assert torch.linalg.matrix_rank(low) == 2
    fitted = x @ full.T
    _, _, right = torch.linalg.svd(fitted, full_matrices=False)
    torch.testing.assert_close(x @ low.T, fitted @ right[:2].T @ right[:2])


def test_fit_pair_recovers_a_linear_map_and_shuffling_destroys_it():
    x, y, a = _linear_pair(n=1200)
    fit = fit_pair(x[:900], y[:900], x[900:], y[900:], TranslateConfig(lambdas=[1e-4, 1e-1, 10]))
    assert fit.heldout_r2 > 0.95
    assert fit.shuffled_r2 < 0.02
    assert fit.lam == 1e-4
    torch.testing.assert_close(fit.encoder, a.T, atol=0.03, rtol=0.03)
    # the back-map reconstructs x from y as well as a linear map can
    assert r2_score(y[900:] @ fit.decoder.T, x[900:]) > 0.5


def test_r2_matrix_ranks_the_related_layer_first():
    x, y, _ = _linear_pair(n=800)
    noise = torch.randn_like(y, dtype=torch.float64)
    states_x = torch.stack([x, torch.randn_like(x)], dim=1)
    states_y = torch.stack([noise, y, noise], dim=1)
    result = r2_matrix(
        states_x[:600],
        states_y[:600],
        states_x[600:],
        states_y[600:],
        [1e-3, 1e-1],
        columns=torch.tensor([True, True, False]),
    )
    assert result.r2[0, 1] > 0.9
    assert result.r2[0, 0] < 0.05 and result.r2[1, 1] < 0.05
    assert math.isnan(result.r2[0, 2]) and math.isnan(result.lambdas[1, 2])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="lambdas"):
        TranslateConfig(lambdas=[0.0])
    with pytest.raises(ValueError, match="rank"):
        TranslateConfig(rank=0)


def test_r2_matrix_from_moments_equals_explicit_predictions():
    x, y, _ = _linear_pair(n=500, noise=1.0)
    states_x = torch.stack([x, x.flip(1)], dim=1).float()
    states_y = torch.stack([y, y.roll(1, 1)], dim=1).float()
    lambdas = [1e-3, 1e-1, 3.0]
    result = r2_matrix(states_x[:350], states_y[:350], states_x[350:], states_y[350:], lambdas)
    select, report = _halves(150, 0)
    for i in range(2):
        for j in range(2):
            xf, yf = states_x[:350, i].double(), states_y[:350, j].double()
            xm, ym = xf.mean(0), yf.mean(0)
            xh, yh = states_x[350:, i].double() - xm, states_y[350:, j].double() - ym
            scores = []
            for lam in lambdas:
                w = ridge_map(xf - xm, yf - ym, lam)
                scores.append(
                    (r2_score(xh[select] @ w.T, yh[select]), r2_score(xh[report] @ w.T, yh[report]))
                )
            best = max(range(3), key=lambda k: scores[k][0])
            assert result.lambdas[i, j] == lambdas[best]
            assert float(result.r2[i, j]) == pytest.approx(scores[best][1], abs=1e-4)
