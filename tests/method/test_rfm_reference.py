"""The vectorised NumPy RFM that benchmarks/rfm_fit.py times against must itself compute our
algorithm: checked against the torch functions of expertsteer.method.rfm over several
iterations, and
against the loop-based one-step reference of tests/method/test_rfm.py."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from expertsteer.method.rfm import (
    RFMConfig,
    agop,
    fit_rfm,
    laplace_kernel,
    median_distance,
    predictor_gradients,
    solve_krr,
)
from tests.method.test_rfm import numpy_rfm_step

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "rfm_numpy_reference.py"
_SPEC = importlib.util.spec_from_file_location("rfm_numpy_reference", _PATH)
reference = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = reference  # dataclasses look their module up there
_SPEC.loader.exec_module(reference)


def assert_relative(actual, expected, tolerance=1e-6):
    """Norm-wise relative error: both sides take the square root of a cancelling expansion for
    the zero self-distance, so single small entries differ at ~sqrt(machine eps)."""
    error = np.linalg.norm(np.asarray(actual) - np.asarray(expected))
    assert error <= tolerance * np.linalg.norm(expected), error / np.linalg.norm(expected)


def _data(n=60, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x - x.mean(0), (x[:, 0] * x[:, 1] > 0).astype(float)


def test_reference_matches_torch_iterates_float64():
    x, y = _data()
    bandwidth, ridge, iterations = 2.0, 1e-3, 4
    fitted = reference.fit(x, y, bandwidth, ridge, iterations)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    metric = torch.eye(x.shape[1], dtype=torch.float64)
    for t in range(iterations + 1):
        assert_relative(fitted.metrics[t], metric.numpy())
        alpha = solve_krr(laplace_kernel(tx, tx, metric, bandwidth), ty, ridge)
        assert_relative(fitted.alphas[t], alpha.numpy())
        if t < iterations:
            metric = agop(predictor_gradients(tx, alpha, metric, bandwidth, tx))
    # The iterates must move away from the identity, or the comparison above says little.
    assert np.abs(fitted.metrics[-1] - np.eye(x.shape[1])).max() > 0.1


def test_reference_step_matches_loop_reference():
    x, y = _data(40, 6, seed=1)
    fitted = reference.fit(x, y, 1.5, 1e-3, 1)
    alpha, metric = numpy_rfm_step(x, y, np.eye(6), 1.5, 1e-3)
    assert_relative(fitted.alphas[0], alpha)
    assert_relative(fitted.metrics[1], metric)


def test_reference_selection_matches_fit_rfm():
    x, y = _data(80, 5, seed=2)
    x_val, y_val = _data(40, 5, seed=3)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y).long()
    tv, tyv = torch.from_numpy(x_val), torch.from_numpy(y_val).long()
    result = fit_rfm(tx, ty, tv, tyv, RFMConfig(iterations=3, bandwidth_scales=(1.0,)))
    fitted = reference.fit(x, y, median_distance(tx), 1e-3, 3, x_val, y_val)
    np.testing.assert_allclose(fitted.val_auroc, result.val_auroc, atol=1e-12)
    assert fitted.best_iteration == result.best_iteration
    # Directions come from the AGOP of the selected predictor, never from the identity M_0.
    assert_relative(fitted.agops[fitted.best_iteration], result.metric.numpy())
