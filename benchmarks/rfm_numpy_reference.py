"""A vectorised float64 NumPy Recursive Feature Machine at one fixed bandwidth: the reference
that `benchmarks/rfm_fit.py` times against `expertsteer.method.rfm` (and that
`tests/method/test_rfm_reference.py` checks against it). Written from the algorithm, not from
the torch
code, and importing nothing from `expertsteer`.

Per iteration t = 0..T (M_0 = I), with D_ij = ||x_i - x_j||_M and K = exp(-D / L):
    alpha = (K + lambda I)^-1 y              (Cholesky, growing diagonal jitter if not PD)
    grad f(x_j) = -(1/L) M sum_i alpha_i K_ji / D_ji (x_j - x_i)   (pairs with D_ji ~ 0 dropped)
    M_{t+1} = G^T G / n divided by its largest absolute entry (t < T only).
With validation data each iteration's M is also scored by the validation AUROC of its predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ZERO_DISTANCE = 1e-10
"""A pair counts as coincident (no gradient term) below this fraction of the largest distance."""


@dataclass
class ReferenceFit:
    """Every iterate of a reference fit."""

    metrics: list[np.ndarray]
    """M_0 (identity) to M_T, each [d, d]."""
    alphas: list[np.ndarray]
    """KRR coefficients fitted with each metric, each [n]."""
    agops: list[np.ndarray] = field(default_factory=list)
    """Normalised AGOP of each iterate's predictor (agops[t] = M_{t+1}; the last one too)."""
    val_auroc: list[float] = field(default_factory=list)
    """Validation AUROC of each iterate's predictor (empty without validation data)."""

    @property
    def best_iteration(self) -> int:
        """First iteration with the highest validation AUROC (the last one without validation)."""
        if not self.val_auroc:
            return len(self.metrics) - 1
        return int(np.argmax(self.val_auroc))


def distances(x: np.ndarray, z: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """||x_i - z_j||_M for all pairs [n, m], from ||x||^2 + ||z||^2 - 2 <x, z> in the metric."""
    xm, zm = x @ metric, z @ metric
    squared = np.sum(xm * x, axis=1)[:, None] + np.sum(zm * z, axis=1)[None, :] - 2 * (xm @ z.T)
    if z is x:
        np.fill_diagonal(squared, 0.0)  # a point's distance to itself is exactly 0
    return np.sqrt(np.maximum(squared, 0.0))


def ridge_solve(
    kernel: np.ndarray, y: np.ndarray, ridge: float, jitter: float = 1e-6
) -> np.ndarray:
    """(K + ridge I)^-1 y. The Cholesky factorisation decides positive definiteness (with the
    same jitter schedule as the torch code); NumPy has no triangular solver, so the system
    itself is solved by `numpy.linalg.solve` (LU) rather than two triangular solves."""
    identity = np.eye(len(kernel))
    extra = 0.0
    for _ in range(8):
        system = kernel + (ridge + extra) * identity
        try:
            np.linalg.cholesky(system)
        except np.linalg.LinAlgError:
            extra = jitter if extra == 0.0 else extra * 10
            continue
        return np.linalg.solve(system, y)
    raise np.linalg.LinAlgError(f"kernel not positive definite even with jitter {extra:g}")


def gradients(x: np.ndarray, alpha: np.ndarray, metric: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gradient of the KRR predictor at every training row [n, d]."""
    dist = distances(x, x, metric)
    coincident = dist <= ZERO_DISTANCE * max(dist.max(), 1e-30)
    weights = alpha[None, :] * np.exp(-dist / bandwidth) / np.where(coincident, 1.0, dist)
    weights[coincident] = 0.0
    # sum_i w_ji (x_j - x_i) = x_j sum_i w_ji - (W x)_j
    offsets = x * weights.sum(axis=1, keepdims=True) - weights @ x
    return -(offsets @ metric) / bandwidth


def normalised_agop(grads: np.ndarray) -> np.ndarray:
    matrix = grads.T @ grads / len(grads)
    return matrix / np.abs(matrix).max()


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC, ties counting half."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def fit(
    x: np.ndarray,
    y: np.ndarray,
    bandwidth: float,
    ridge: float,
    iterations: int,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
) -> ReferenceFit:
    """T = `iterations` AGOP updates at a fixed bandwidth, in float64 (no centring: pass
    centred data to match a centring fit)."""
    x = np.asarray(x, dtype=np.float64)
    targets = np.asarray(y, dtype=np.float64)
    metric = np.eye(x.shape[1])
    result = ReferenceFit(metrics=[], alphas=[])
    for _ in range(iterations + 1):
        alpha = ridge_solve(np.exp(-distances(x, x, metric) / bandwidth), targets, ridge)
        result.metrics.append(metric)
        result.alphas.append(alpha)
        if x_val is not None and y_val is not None:
            x_val = np.asarray(x_val, dtype=np.float64)
            scores = np.exp(-distances(x_val, x, metric) / bandwidth) @ alpha
            result.val_auroc.append(auroc(scores, np.asarray(y_val)))
        result.agops.append(normalised_agop(gradients(x, alpha, metric, bandwidth)))
        metric = result.agops[-1]
    return result
