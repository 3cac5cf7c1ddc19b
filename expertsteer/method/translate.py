"""Target-tied alignment: ridge maps from standardised expert states to target states.

For expert layer i and target layer j, with x the expert state standardised per feature and
y = (h^T_j - mean_j) / scale_j the target state centred and divided by one scalar (so that
directions keep the target's raw geometry), the encoder is the ridge solution

    W = argmin_W  sum_k || W x_k - y_k ||^2 + lambda n || W ||_F^2  =  Y^T X (X^T X + lambda n I)^-1

(lambda is relative to the row count n: with standardised inputs, X^T X / n has unit
diagonal, so one grid fits every layer and corpus size). The decoder is the ridge back-map
from y to x with the same lambda. Optional reduced rank r keeps W's action on the r leading
principal directions of its fitted values: W_r = P_r P_r^T W.

Why not the paper's reconstruction loss: it is unchanged under (W, V) -> (R W, V R^-1) for any
invertible R, so it leaves the code basis — and with it every mapped expert direction —
arbitrary. The ridge map is unique and tied to the target's coordinates.

Lambda is chosen per pair by R^2 on one half of the held-out texts and R^2 is reported on the
other half, so the reported figure is not the one the choice maximised. All held-out figures
are pooled over features: R^2 = 1 - SSE / SST, SST about the held-out rows' own mean.

A direction v in RAW expert coordinates maps through the linear part: f(h + v) - f(h) =
W (v / sigma), sigma the expert standard deviations (`AffineAutoencoders.encode_direction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from expertsteer.errors import ExpertSteerError
from expertsteer.settings import check_bool, check_integer, check_numbers


class TranslationError(ExpertSteerError):
    """Paired states from which no map can be fitted."""


@dataclass(frozen=True)
class TranslateConfig:
    """Ridge settings of the `translate` objective."""

    lambdas: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0])
    """Ridge grid, as multiples of the row count (inputs are standardised)."""
    rank: int | None = None
    """Reduced rank of the map (None: full rank)."""
    matrix_rows: int = 4000
    """Fit rows (drawn, seeded) for the all-pairs R^2 matrix; the final maps use every row."""
    heldout_rows: int = 3000
    """Held-out rows (drawn, seeded) for the R^2 matrix and the MI estimate."""
    seed: int = 0
    """Seed of those draws and of the shuffled-pairs control."""
    matrix: bool = True
    """Compute the all-pairs R^2 matrix (translatability; `select: translatable` needs it).
    Without it, an expert layer outside the configured pairs maps into the target layer at
    the same relative depth."""

    def __post_init__(self) -> None:
        check_numbers("translate.lambdas", self.lambdas)
        object.__setattr__(self, "lambdas", [float(v) for v in self.lambdas])
        if self.rank is not None:
            check_integer("translate.rank", self.rank, 1)
        check_integer("translate.matrix_rows", self.matrix_rows, 4)
        check_integer("translate.heldout_rows", self.heldout_rows, 4)
        check_integer("translate.seed", self.seed, 0)
        check_bool("translate.matrix", self.matrix)


def target_moments(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [d_T] and one scalar scale (RMS deviation per feature) of target states [n, d_T],
    in float64: the mean_j and scale_j of y = (h^T_j - mean_j) / scale_j."""
    states = states.double()
    mean = states.mean(0)
    return mean, (states - mean).pow(2).mean().sqrt()


def token_rows(pairs: dict[str, Any], config: TranslateConfig) -> dict[str, torch.Tensor]:
    """A token corpus (`expertsteer.data.token_pairs`) split by held-out text, with seeded
    draws of rows for the R^2 matrix and the held-out MI (the same on every rank: same data,
    same seed)."""
    generator = torch.Generator().manual_seed(config.seed)
    fit = torch.nonzero(~pairs["heldout"]).flatten()
    heldout = torch.nonzero(pairs["heldout"]).flatten()
    if len(fit) < 2 or len(heldout) < 4:
        raise ValueError(
            f"the token corpus has {len(fit)} fit and {len(heldout)} held-out positions; "
            "it needs at least 2 and 4 (raise corpus.size)"
        )

    def draw(rows: torch.Tensor, count: int) -> torch.Tensor:
        order = torch.randperm(len(rows), generator=generator)[:count]
        return rows[order.sort().values]

    return {
        "expert": pairs["expert"],
        "target": pairs["target"],
        "fit": fit,
        "heldout": heldout,
        "matrix_fit": draw(fit, config.matrix_rows),
        "matrix_heldout": draw(heldout, config.heldout_rows),
        "steer_heldout": heldout[pairs["source"][heldout] == 1],
        "positions": torch.tensor(int(pairs["positions"])),
    }


def r2_score(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Pooled R^2 = 1 - SSE / SST of predictions [n, d], SST about the targets' own mean."""
    target = target.double()
    sse = (prediction.double() - target).pow(2).sum()
    sst = (target - target.mean(0)).pow(2).sum().clamp_min(1e-30)
    return float(1.0 - sse / sst)


@dataclass
class RidgeBasis:
    """Eigendecomposition of X^T X for one input matrix: solves every lambda and output."""

    x: torch.Tensor
    """Inputs [n, d] (centred)."""
    eigenvalues: torch.Tensor
    """[d], ascending, clamped at 0."""
    eigenvectors: torch.Tensor
    """[d, d] columns."""

    @classmethod
    def of(cls, x: torch.Tensor) -> RidgeBasis:
        if x.ndim != 2 or x.shape[0] < 2:
            raise TranslationError(f"ridge inputs must be [n >= 2, d], got {tuple(x.shape)}")
        values, vectors = torch.linalg.eigh(x.T @ x)
        return cls(x, values.clamp_min(0), vectors)

    def projected(self, y: torch.Tensor) -> torch.Tensor:
        """Q^T X^T Y [d, d_y]: everything of the outputs a ridge solution needs."""
        return self.eigenvectors.T @ (self.x.T @ y)

    def weights(self, projected: torch.Tensor, lam: float) -> torch.Tensor:
        """Ridge coefficients B [d, d_y] (prediction X B) for `lam` relative to n."""
        shrink = 1.0 / (self.eigenvalues + lam * self.x.shape[0])
        return self.eigenvectors @ (shrink[:, None] * projected)


def ridge_map(
    x: torch.Tensor, y: torch.Tensor, lam: float, rank: int | None = None
) -> torch.Tensor:
    """Ridge map [d_y, d_x] from centred inputs x [n, d_x] to centred outputs y [n, d_y]
    (prediction: x @ W.T), optionally restricted to `rank` principal output directions."""
    basis = RidgeBasis.of(x)
    coefficients = basis.weights(basis.projected(y), lam)
    if rank is not None and rank < min(coefficients.shape):
        fitted = x @ coefficients
        _, _, right = torch.linalg.svd(fitted, full_matrices=False)
        keep = right[:rank].T
        coefficients = coefficients @ keep @ keep.T
    return coefficients.T.contiguous()


@dataclass
class R2Matrix:
    """Held-out R^2 of the ridge map of every (expert layer, target layer) pair."""

    r2: torch.Tensor
    """[L_E, L_T] R^2 on the report half of the held-out rows (NaN outside `columns`)."""
    lambdas: torch.Tensor
    """[L_E, L_T] lambda chosen on the select half."""


def _halves(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    half = count // 2
    return order[:half], order[half:]


def _r2_from_moments(
    shrink: torch.Tensor,
    projected: torch.Tensor,
    outer: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    y: torch.Tensor,
) -> float:
    """R^2 of the prediction A diag(shrink) B against y, from moments only:
    SSE = ||y||^2 - 2 sum_k s_k <(A^T y)_k, B_k> + s^T (A^T A o B B^T) s."""
    y = y.double()
    sse = (
        y.pow(2).sum()
        - 2 * (shrink * (cross * projected).sum(-1)).sum()
        + shrink @ (gram * outer) @ shrink
    )
    sst = (y - y.mean(0)).pow(2).sum().clamp_min(1e-30)
    return float(1.0 - sse / sst)


def r2_matrix(
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    x_heldout: torch.Tensor,
    y_heldout: torch.Tensor,
    lambdas: list[float],
    columns: torch.Tensor | None = None,
    seed: int = 0,
) -> R2Matrix:
    """R^2 [L_E, L_T] of ridge maps from x [n, L_E, d_E] (standardised) to y [n, L_T, d_T].

    Each expert layer's Gram matrix is decomposed once and serves every target layer and
    lambda; held-out errors come from moments (`_r2_from_moments`), so a lambda costs O(d^2)
    instead of a prediction. `columns` (bool [L_T]) limits the target layers computed (the
    pairing window).
    """
    if x_fit.shape[0] != y_fit.shape[0] or x_heldout.shape[0] != y_heldout.shape[0]:
        raise TranslationError("expert and target rows differ in count")
    if x_heldout.shape[0] < 4:
        raise TranslationError(f"at least 4 held-out rows are needed, got {x_heldout.shape[0]}")
    layers_e, layers_t = x_fit.shape[1], y_fit.shape[1]
    columns = torch.ones(layers_t, dtype=torch.bool) if columns is None else columns
    halves = _halves(x_heldout.shape[0], seed)
    r2 = torch.full((layers_e, layers_t), math.nan, dtype=torch.float64)
    chosen = torch.full((layers_e, layers_t), math.nan, dtype=torch.float64)
    y_mean = y_fit.float().mean(0)
    n = x_fit.shape[0]
    for i in range(layers_e):
        x_mean = x_fit[:, i].float().mean(0)
        basis = RidgeBasis.of(x_fit[:, i].float() - x_mean)
        rotated = (x_heldout[:, i].float() - x_mean) @ basis.eigenvectors  # A = X_ho Q
        parts = [rotated[half] for half in halves]
        grams = [(a.T @ a).double() for a in parts]
        for j in torch.nonzero(columns).flatten().tolist():
            projected = basis.projected(y_fit[:, j].float() - y_mean[j])  # B = Q^T X^T Y
            outer = (projected @ projected.T).double()
            y_ho = y_heldout[:, j].float() - y_mean[j]
            targets = [y_ho[half] for half in halves]
            cross = [(a.T @ y).double() for a, y in zip(parts, targets, strict=True)]
            scores = [
                [
                    _r2_from_moments(
                        1.0 / (basis.eigenvalues.double() + lam * n),
                        projected.double(),
                        outer,
                        gram,
                        c,
                        y,
                    )
                    for lam in lambdas
                ]
                for gram, c, y in zip(grams, cross, targets, strict=True)
            ]
            best = max(range(len(lambdas)), key=lambda k: scores[0][k])
            r2[i, j], chosen[i, j] = scores[1][best], lambdas[best]
    return R2Matrix(r2, chosen)


@dataclass
class PairFit:
    """One fitted map and its held-out figures."""

    encoder: torch.Tensor
    """[d_T, d_E] standardised expert -> scaled target."""
    decoder: torch.Tensor
    """[d_E, d_T] back-map."""
    lam: float
    """Lambda used (chosen on the select half of the held-out rows)."""
    heldout_r2: float
    """R^2 on the report half of the held-out rows."""
    shuffled_r2: float
    """The same, for a map fitted with the fit rows' pairing shuffled."""


def fit_pair(
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    x_heldout: torch.Tensor,
    y_heldout: torch.Tensor,
    config: TranslateConfig,
) -> PairFit:
    """Ridge map (float64) of one pair: x standardised expert states [n, d_E], y scaled
    target states [n, d_T], both already centred by the fit rows' means."""
    x, y = x_fit.double(), y_fit.double()
    x_ho, y_ho = x_heldout.double(), y_heldout.double()
    select, report = _halves(x_ho.shape[0], config.seed)
    basis = RidgeBasis.of(x)
    projected = basis.projected(y)
    scores = [
        r2_score(x_ho[select] @ basis.weights(projected, lam), y_ho[select])
        for lam in config.lambdas
    ]
    lam = config.lambdas[max(range(len(scores)), key=scores.__getitem__)]
    coefficients = basis.weights(projected, lam)
    if config.rank is not None and config.rank < min(coefficients.shape):
        _, _, right = torch.linalg.svd(x @ coefficients, full_matrices=False)
        keep = right[: config.rank].T
        coefficients = coefficients @ keep @ keep.T
    permutation = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed))
    shuffled = basis.weights(basis.projected(y[permutation]), lam)
    return PairFit(
        encoder=coefficients.T.contiguous(),
        decoder=ridge_map(y, x, lam),
        lam=lam,
        heldout_r2=r2_score(x_ho[report] @ coefficients, y_ho[report]),
        shuffled_r2=r2_score(x_ho[report] @ shuffled, y_ho[report]),
    )
