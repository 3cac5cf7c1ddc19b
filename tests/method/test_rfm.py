"""RFM numerics against an independent float64 NumPy implementation, autograd and finite
differences, and a synthetic task whose label depends non-linearly on a hidden subspace."""

import numpy as np
import pytest
import torch

from expertsteer.method.rfm import (
    RFMConfig,
    RFMError,
    RFMFitter,
    agop,
    fit_rfm,
    laplace_kernel,
    predict,
    predictor_gradients,
    solve_krr,
    validation_loss,
)


def numpy_rfm_step(x, y, metric, bandwidth, ridge):
    """One RFM step written with explicit loops: returns alpha and the normalised AGOP."""
    n, d = x.shape
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            v = x[i] - x[j]
            dist[i, j] = np.sqrt(max(v @ metric @ v, 0.0))
    kernel = np.exp(-dist / bandwidth)
    alpha = np.linalg.solve(kernel + ridge * np.eye(n), y)
    grads = np.zeros((n, d))
    for j in range(n):
        for i in range(n):
            if dist[j, i] > 0:
                grads[j] -= (
                    alpha[i] * kernel[j, i] / dist[j, i] * metric @ (x[j] - x[i]) / bandwidth
                )
    matrix = grads.T @ grads / n
    return alpha, matrix / np.abs(matrix).max()


def _data(n=40, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (x[:, 0] * x[:, 1] > 0).astype(float)
    return x, y


def test_one_step_matches_numpy_reference_float64():
    x, y = _data()
    metric = np.eye(6)
    for _ in range(2):
        alpha_ref, metric_ref = numpy_rfm_step(x, y, metric, 2.0, 1e-3)
        tx, tm = torch.from_numpy(x), torch.from_numpy(metric)
        alpha = solve_krr(laplace_kernel(tx, tx, tm, 2.0), torch.from_numpy(y), 1e-3)
        new = agop(predictor_gradients(tx, alpha, tm, 2.0, tx))
        np.testing.assert_allclose(alpha.numpy(), alpha_ref, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(new.numpy(), metric_ref, rtol=1e-6, atol=1e-9)
        metric = metric_ref


def test_closed_form_gradient_equals_autograd():
    x, y = _data()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    rng = np.random.default_rng(1)
    metric = torch.from_numpy(np.cov(rng.normal(size=(6, 20))))  # a non-trivial PD metric
    alpha = solve_krr(laplace_kernel(tx, tx, metric, 1.5), ty, 1e-3)
    points = torch.from_numpy(rng.normal(size=(5, 6))).requires_grad_(True)
    (auto,) = torch.autograd.grad(predict(tx, alpha, metric, 1.5, points).sum(), points)
    closed = predictor_gradients(tx, alpha, metric, 1.5, points.detach())
    relative = (closed - auto).norm() / auto.norm()
    assert relative < 1e-6


def test_validation_loss_gradient_matches_finite_differences():
    x, y = _data(30)
    xv, yv = _data(20, seed=3)
    tx, ty, txv, tyv = map(torch.from_numpy, (x, y, xv, yv))
    metric = torch.eye(6, dtype=torch.float64)
    logs = torch.tensor([np.log(2.0), np.log(1e-2)], dtype=torch.float64, requires_grad=True)
    loss = validation_loss(tx, ty, txv, tyv, metric, logs[0], logs[1])
    (grad,) = torch.autograd.grad(loss, logs)
    eps = 1e-6
    for k in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[k] = eps
        up = validation_loss(tx, ty, txv, tyv, metric, *(logs.detach() + step))
        down = validation_loss(tx, ty, txv, tyv, metric, *(logs.detach() - step))
        numeric = (up - down) / (2 * eps)
        assert abs(float(grad[k]) - float(numeric)) < 1e-6 * max(1.0, abs(float(numeric)))


def _hidden_xor(n, d=256, seed=0, noise=0.25):
    """Label = XOR of the signs of two latent coordinates living in a hidden 2-d subspace
    (fixed basis); the other d - 2 directions carry isotropic noise of std `noise`."""
    basis, _ = torch.linalg.qr(
        torch.randn(d, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    generator = torch.Generator().manual_seed(seed + 1)
    latent = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    rest = torch.randn(n, d, generator=generator, dtype=torch.float64) * noise
    x = latent @ basis.T + rest - (rest @ basis) @ basis.T
    return x, ((latent[:, 0] * latent[:, 1]) > 0).long(), basis


def test_rfm_recovers_a_hidden_xor_subspace_that_mean_difference_misses():
    x, y, basis = _hidden_xor(800)
    xv, yv, _ = _hidden_xor(400, seed=1)
    result = fit_rfm(x, y, xv, yv, RFMConfig(iterations=8))
    # Norm of each top eigenvector's projection onto the hidden plane (1 = inside it).
    captured = (result.directions[:2] @ basis).norm(dim=1)
    assert (captured > 0.9).all(), captured
    assert result.val_auroc[result.best_iteration] > 0.95
    assert result.val_auroc[0] < 0.85, "the identity metric alone must not solve it"
    mean_diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    assert float((mean_diff / mean_diff.norm() @ basis).norm()) < 0.3


def test_direction_sign_follows_labels_and_is_unit_norm():
    x, y, _ = _hidden_xor(300, d=16)
    shift = torch.zeros(16, dtype=torch.float64)
    shift[3] = 3.0
    x = x + y[:, None] * shift
    result = fit_rfm(x, y, x[:100], y[:100], RFMConfig(iterations=2))
    assert torch.isclose(result.direction.norm(), torch.tensor(1.0, dtype=torch.float64))
    assert float((x @ result.direction)[y == 1].mean()) > float(
        (x @ result.direction)[y == 0].mean()
    )


def test_bad_inputs_are_named():
    x = torch.randn(10, 4)
    with pytest.raises(RFMError, match="both 0 and 1"):
        fit_rfm(x, torch.ones(10, dtype=torch.long), x, torch.tensor([0, 1] * 5))
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(RFMError, match="NaN or inf"):
        fit_rfm(bad, torch.tensor([0, 1] * 5), x, torch.tensor([0, 1] * 5))
    with pytest.raises(RFMError, match="identical"):
        fit_rfm(torch.ones(10, 4), torch.tensor([0, 1] * 5), x, torch.tensor([0, 1] * 5))
    with pytest.raises(RFMError, match="AGOP is zero"):
        agop(torch.zeros(5, 3))


def test_float32_kernel_underflow_does_not_produce_nan():
    # exp(-d / L) underflows to exactly 0 in float32 for points far beyond the median distance
    # (the known failure of the reference code); the fit must stay finite.
    x, y, _ = _hidden_xor(200, d=32)
    x = x.float()
    x[:6] += 1e4 * torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    kernel = laplace_kernel(x, x, torch.eye(32), 1.0)
    assert (kernel == 0).any(), "the setup must actually underflow"
    result = fit_rfm(x, y, x[:80], y[:80], RFMConfig(iterations=2))
    assert torch.isfinite(result.metric).all() and torch.isfinite(result.direction).all()


def test_direction_of_an_identity_metric_fit_comes_from_its_agop():
    """With T = 0 (or when iteration 0 is the best) M is the identity, whose eigenvectors are
    arbitrary; the direction must come from the AGOP of the predictor (the label's axis)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=generator, dtype=torch.float64)
    x_val = torch.randn(150, 8, generator=generator, dtype=torch.float64)
    y, y_val = (x[:, 3] > 0).long(), (x_val[:, 3] > 0).long()
    fitter = RFMFitter(x, y, x_val, y_val, RFMConfig())
    fitter.solve()
    fitter.evaluate()  # iteration 0 only: the identity metric
    result = fitter.result()
    assert result.best_iteration == 0
    assert abs(float(result.direction[3])) > 0.9
    assert float((x_val @ result.direction)[y_val == 1].mean()) > 0  # signed towards label 1
