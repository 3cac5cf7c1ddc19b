"""Recursive Feature Machine: Laplace-kernel ridge regression with a learned Mahalanobis
metric, updated by the average gradient outer product (AGOP). Pure torch, differentiable.

Per iteration t (M_0 = I):
    K_M(x, z) = exp(-||x - z||_M / L),  ||v||_M = sqrt(v^T M v)
    alpha = (K_M(X, X) + lambda I)^-1 y                      (Cholesky, jitter fallback)
    grad f(x_j) = -(1/L) sum_i alpha_i K_ji / d_ji M (x_j - x_i)   (i with d_ji = 0 excluded)
    M <- mean_j grad f(x_j) grad f(x_j)^T, divided by its largest absolute entry.
The iteration with the best validation AUROC is kept; the steering direction is the top
eigenvector of its M, unit norm, signed so that label-1 training rows project higher.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from expertsteer.errors import ExpertSteerError
from expertsteer.method.vectors import orient
from expertsteer.settings import (
    check_bool,
    check_choices,
    check_integer,
    check_number,
    check_numbers,
)

log = logging.getLogger(__name__)


class RFMError(ExpertSteerError):
    """Data or settings the RFM cannot fit."""


@dataclass(frozen=True)
class RFMConfig:
    """Settings of an RFM fit (defaults of the paper's RFM step, arXiv 2505.12313)."""

    iterations: int = 8
    """Number of AGOP updates T."""
    ridge: float = 1e-3
    """KRR regulariser lambda."""
    bandwidth_scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    """Bandwidth grid as multiples of the median pairwise distance of the training data."""
    num_directions: int = 4
    """Leading eigenvectors of M kept (the first is the steering direction)."""
    jitter: float = 1e-6
    """First diagonal jitter tried when the Cholesky factorisation fails (then x10 steps)."""
    center: bool = True
    """Subtract the training mean before fitting (directions are unaffected)."""

    def __post_init__(self) -> None:
        check_integer("iterations", self.iterations, 1)
        check_number("ridge", self.ridge)
        check_numbers("bandwidth_scales", self.bandwidth_scales)
        object.__setattr__(self, "bandwidth_scales", tuple(self.bandwidth_scales))
        check_integer("num_directions", self.num_directions, 1)
        check_number("jitter", self.jitter)
        check_bool("center", self.center)


Space = Literal["encoded", "raw"]
"""Expert states as the extractor sees them: encoded by the alignment, or raw."""
FitDtype = Literal["float64", "float32"]


@dataclass(frozen=True)
class VectorsConfig(RFMConfig):
    """Settings of the vectors stage (`lightning_modules.vectors.VectorsModule`, an
    experiment's `rfm:`): the RFM's, the space and precision every extractor fits in, and the
    RFM's optional hyperparameter tuning."""

    space: Space = "encoded"
    """Expert methods: fit on the encoded states f_i(h^E) (the paper) or on raw h^E, then map
    the direction by the encoder's linear part."""
    fit_dtype: FitDtype = "float64"
    """Precision of the kernel algebra (and of every extractor's states)."""
    tune_steps: int = 0
    """Adam steps tuning the log bandwidths and log ridge on the validation loss before
    iteration 0 (`tune_hyperparameters`; 0: keep the grid as given)."""
    tune_lr: float = 0.05
    """Learning rate of that tuning."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices(self)
        check_integer("tune_steps", self.tune_steps, 0)
        check_number("tune_lr", self.tune_lr)


@dataclass
class RFMResult:
    """Outcome of a fit."""

    direction: torch.Tensor
    """Unit steering direction [d]."""
    directions: torch.Tensor
    """Leading eigenvectors of M as rows [k, d], sign-fixed, unit norm."""
    eigenvalues: torch.Tensor
    """Their eigenvalues [k]."""
    metric: torch.Tensor
    """AGOP of the selected predictor [d, d] (normalised; the directions are its top
    eigenvectors). For best iteration t it is M_{t+1}, the metric iteration t+1 would use."""
    bandwidth: float
    """Selected kernel bandwidth L."""
    best_iteration: int
    """Iteration whose M was kept (0 = identity metric)."""
    val_auroc: list[float] = field(default_factory=list)
    """Validation AUROC per iteration, for the selected bandwidth."""
    grid_auroc: dict[float, list[float]] = field(default_factory=dict)
    """Validation AUROC per iteration for every bandwidth tried."""


def mahalanobis_distances(x: torch.Tensor, z: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """Pairwise ||x_i - z_j||_M, [n, m]; clamped at zero before the square root."""
    xm = x @ metric
    x_norms = (xm * x).sum(-1)
    # The kernel and the AGOP take distances of the training set to itself: one product.
    z_norms = x_norms if z is x else ((z @ metric) * z).sum(-1)
    squared = x_norms[:, None] + z_norms[None, :] - 2 * xm @ z.T
    if z is x:
        # Self-distances come out of the expansion as rounding noise (up to ~1e-3 of the
        # median distance in float32); make them exact so the self term is excluded.
        squared.fill_diagonal_(0)
    return squared.clamp_min(0).sqrt()


def laplace_kernel(
    x: torch.Tensor, z: torch.Tensor, metric: torch.Tensor, bandwidth: torch.Tensor | float
) -> torch.Tensor:
    return torch.exp(-mahalanobis_distances(x, z, metric) / bandwidth)


def solve_krr(
    kernel: torch.Tensor, y: torch.Tensor, ridge: torch.Tensor | float, jitter: float = 1e-6
) -> torch.Tensor:
    """alpha = (K + ridge I)^-1 y by Cholesky; retries with growing jitter if not PD."""
    eye = torch.eye(kernel.shape[0], dtype=kernel.dtype, device=kernel.device)
    extra = 0.0
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(kernel + (ridge + extra) * eye)
        if int(info) == 0:
            return torch.cholesky_solve(y.reshape(-1, 1).to(kernel.dtype), factor).reshape(-1)
        extra = jitter if extra == 0.0 else extra * 10
    raise RFMError(
        "kernel matrix is not positive definite even with jitter "
        f"{extra:g}; the data may contain duplicated or non-finite rows"
    )


def predict(
    x_train: torch.Tensor,
    alpha: torch.Tensor,
    metric: torch.Tensor,
    bandwidth: torch.Tensor | float,
    x: torch.Tensor,
) -> torch.Tensor:
    """KRR predictor f(x) = K_M(x, X) alpha."""
    return laplace_kernel(x, x_train, metric, bandwidth) @ alpha


def predictor_gradients(
    x_train: torch.Tensor,
    alpha: torch.Tensor,
    metric: torch.Tensor,
    bandwidth: torch.Tensor | float,
    x: torch.Tensor,
    distances: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form grad f at each row of `x` [m, d]; terms at zero distance are excluded.

    `distances` may pass ||x - x_train||_M when the caller already has it (the fit does).
    """
    if distances is None:
        distances = mahalanobis_distances(x, x_train, metric)
    kernel = torch.exp(-distances / bandwidth)
    safe = distances > 1e-10 * distances.max().clamp_min(1e-30)
    weights = torch.where(
        safe, alpha[None, :] * kernel / distances.clamp_min(1e-30), torch.zeros_like(kernel)
    )
    differences = x * weights.sum(-1, keepdim=True) - weights @ x_train
    return -(differences @ metric) / bandwidth


def agop(gradients: torch.Tensor) -> torch.Tensor:
    """Average gradient outer product, normalised by its largest absolute entry."""
    matrix = gradients.T @ gradients / gradients.shape[0]
    scale = matrix.abs().max()
    if not torch.isfinite(scale) or scale <= 0:
        raise RFMError(
            "AGOP is zero or non-finite (kernel underflow or constant predictor); "
            "try a larger bandwidth or check the inputs"
        )
    return matrix / scale


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Binary AUROC (ties count half), by the Mann-Whitney statistic."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    if len(positive) == 0 or len(negative) == 0:
        raise RFMError("AUROC needs both classes in the validation labels")
    greater = (positive[:, None] > negative[None, :]).double().mean()
    ties = (positive[:, None] == negative[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def median_distance(x: torch.Tensor, max_points: int = 2000) -> float:
    sample = x[:max_points]
    distances = torch.cdist(sample, sample)
    upper = distances[torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)]
    value = float(upper.median()) if upper.numel() else 0.0
    if not math.isfinite(value) or value <= 0:
        raise RFMError("median pairwise distance is zero: the training rows are identical")
    return value


def check_data(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise RFMError(
            f"{name}: expected x [n, d] and y [n], got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) < 2:
        raise RFMError(f"{name}: need at least 2 examples, got {len(x)}")
    if not torch.isfinite(x).all():
        raise RFMError(f"{name}: activations contain NaN or inf")
    classes = set(torch.unique(y).tolist())
    if classes != {0, 1}:
        raise RFMError(f"{name}: labels must contain both 0 and 1, found {sorted(classes)}")


def top_directions(
    metric: torch.Tensor, x: torch.Tensor, y: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading eigenvectors of `metric` [k, d] with their eigenvalues [k], signed by `orient`
    (label-1 rows of x project higher)."""
    values, vectors = torch.linalg.eigh(metric)
    order = torch.argsort(values, descending=True)[:count]
    return orient(vectors[:, order].T, x, y), values[order]


class RFMFitter:
    """An RFM fit over a bandwidth grid, advanced one iteration at a time.

    `solve()` fits the KRR weights for the current metrics, `evaluate()` scores them on the
    validation data, `update()` replaces each metric by its AGOP; `result()` picks the best
    (bandwidth, iteration). The Lightning module calls these once per epoch; `fit_rfm` loops.
    Selection: highest validation AUROC; ties go to the earlier bandwidth in the grid, then to
    the earlier iteration.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        config: RFMConfig | None = None,
    ) -> None:
        self.config = config or RFMConfig()
        check_data(x, y, "training data")
        check_data(x_val, y_val, "validation data")
        if x.shape[1] != x_val.shape[1]:
            raise RFMError(
                f"training and validation widths differ: {x.shape[1]} vs {x_val.shape[1]}"
            )
        self.mean = x.mean(0) if self.config.center else torch.zeros_like(x[0])
        self.x, self.x_val = x - self.mean, x_val - self.mean
        self.y, self.y_val = y, y_val
        self.targets = y.to(x.dtype)
        self.median = median_distance(self.x)
        self.bandwidths = [factor * self.median for factor in self.config.bandwidth_scales]
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        self.metrics = [eye for _ in self.bandwidths]
        self.alphas: list[torch.Tensor | None] = [None for _ in self.bandwidths]
        self.agops: list[torch.Tensor | None] = [None for _ in self.bandwidths]
        self.distances: list[torch.Tensor] = []
        self.iteration = 0
        self.history: list[list[float]] = [[] for _ in self.bandwidths]
        self.best: list[tuple[float, int, torch.Tensor] | None] = [None for _ in self.bandwidths]

    def solve(self) -> None:
        """KRR weights for every bandwidth at the current iteration."""
        self.distances = []
        for k, (bandwidth, metric) in enumerate(zip(self.bandwidths, self.metrics, strict=True)):
            # Kept for the AGOP of this iteration (same metric, same points): saves recomputing
            # the n x n Mahalanobis distances, the costliest product after the solve.
            distances = mahalanobis_distances(self.x, self.x, metric)
            self.distances.append(distances)
            kernel = torch.exp(-distances / bandwidth)
            self.alphas[k] = solve_krr(kernel, self.targets, self.config.ridge, self.config.jitter)

    def predictions(self) -> list[torch.Tensor]:
        """Validation predictions of every bandwidth's current predictor."""
        if any(alpha is None for alpha in self.alphas):
            raise RuntimeError("call solve() before predictions()")
        return [
            predict(self.x, alpha, metric, bandwidth, self.x_val)
            for alpha, metric, bandwidth in zip(
                self.alphas, self.metrics, self.bandwidths, strict=True
            )
        ]

    def agop_of(self, k: int) -> torch.Tensor:
        """Normalised AGOP of bandwidth k's current predictor (computed once per iteration:
        it is both the next metric and, if this predictor is the best, the source of the
        steering directions)."""
        if self.alphas[k] is None:
            raise RuntimeError("call solve() before agop_of()")
        if self.agops[k] is None:
            gradients = predictor_gradients(
                self.x,
                self.alphas[k],
                self.metrics[k],
                self.bandwidths[k],
                self.x,
                self.distances[k],
            )
            self.agops[k] = agop(gradients)
        return self.agops[k]

    def evaluate(self) -> list[float]:
        """Validation AUROC per bandwidth at the current iteration; records the best predictor
        with its AGOP (the features it uses — at iteration 0 the metric is the identity, whose
        eigenvectors say nothing, so directions always come from the predictor's AGOP)."""
        scores = [auroc(prediction, self.y_val) for prediction in self.predictions()]
        for k, score in enumerate(scores):
            self.history[k].append(score)
            if self.best[k] is None or score > self.best[k][0]:
                self.best[k] = (score, self.iteration, self.agop_of(k))
        return scores

    def update(self) -> None:
        """Replace every metric by the normalised AGOP of its predictor."""
        self.metrics = [self.agop_of(k) for k in range(len(self.bandwidths))]
        self.agops = [None for _ in self.bandwidths]
        self.alphas = [None for _ in self.bandwidths]
        self.distances = []
        self.iteration += 1

    def result(self) -> RFMResult:
        if any(best is None for best in self.best):
            raise RuntimeError("call evaluate() at least once before result()")
        chosen = max(range(len(self.best)), key=lambda k: (self.best[k][0], -k))
        _, iteration, metric = self.best[chosen]
        count = min(self.config.num_directions, self.x.shape[1])
        directions, values = top_directions(metric, self.x, self.y, count)
        return RFMResult(
            direction=directions[0],
            directions=directions,
            eigenvalues=values,
            metric=metric,
            bandwidth=self.bandwidths[chosen],
            best_iteration=iteration,
            val_auroc=self.history[chosen],
            grid_auroc=dict(zip(self.bandwidths, self.history, strict=True)),
        )


def fit_rfm(
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    config: RFMConfig | None = None,
) -> RFMResult:
    """Fit an RFM on (x, y), select bandwidth and iteration by validation AUROC."""
    fitter = RFMFitter(x, y, x_val, y_val, config)
    for iteration in range(fitter.config.iterations + 1):
        fitter.solve()
        fitter.evaluate()
        if iteration < fitter.config.iterations:
            fitter.update()
    for bandwidth, history in zip(fitter.bandwidths, fitter.history, strict=True):
        log.debug("bandwidth %.4g: val AUROC per iteration %s", bandwidth, history)
    return fitter.result()


def validation_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    metric: torch.Tensor,
    log_bandwidth: torch.Tensor,
    log_ridge: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error of the KRR predictor on validation data; differentiable in the
    log-bandwidth and log-ridge (and in the data and metric)."""
    bandwidth, ridge = log_bandwidth.exp(), log_ridge.exp()
    alpha = solve_krr(laplace_kernel(x, x, metric, bandwidth), y.to(x.dtype), ridge)
    return ((predict(x, alpha, metric, bandwidth, x_val) - y_val.to(x.dtype)) ** 2).mean()


def tune_hyperparameters(
    problems: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    log_bandwidth_scales: torch.Tensor,
    log_ridge: torch.Tensor,
    steps: int = 50,
    lr: float = 0.05,
    center: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tune the bandwidth grid and the ridge by gradient descent (Adam on their logs) on the
    validation loss at M = I, summed over every problem (x, y, x_val, y_val) and grid point.

    `log_bandwidth_scales` [g] are logs of multiples of each problem's median pairwise
    distance (`RFMConfig.bandwidth_scales`), `log_ridge` the log of lambda (0-d); both are
    left as given, and the tuned values come back as new tensors of their dtype. With
    `center`, each problem is shifted by its training mean first, as the fit does.
    """
    log_bandwidth_scales = log_bandwidth_scales.detach().clone().requires_grad_(True)
    log_ridge = log_ridge.detach().clone().requires_grad_(True)
    prepared = []
    for x, y, x_val, y_val in problems:
        mean = x.mean(0) if center else torch.zeros_like(x[0])
        x, x_val = x - mean, x_val - mean
        prepared.append((x, y, x_val, y_val, math.log(median_distance(x))))
    optimizer = torch.optim.Adam([log_bandwidth_scales, log_ridge], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = sum(
                validation_loss(
                    x,
                    y,
                    x_val,
                    y_val,
                    torch.eye(x.shape[1], dtype=x.dtype, device=x.device),
                    (log_median + log_scale).to(x.dtype),
                    log_ridge.to(x.dtype),
                )
                for x, y, x_val, y_val, log_median in prepared
                for log_scale in log_bandwidth_scales
            )
            loss.backward()
            optimizer.step()
    return log_bandwidth_scales.detach(), log_ridge.detach()
