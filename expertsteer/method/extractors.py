"""Steering-vector extractors behind one interface: RFM and the baselines.

Every extractor takes training states `x [n, d]` with labels `y [n]` in {0, 1} (and validation
data, used by the RFM for selection) and returns a unit direction whose projections are larger
for label 1 on the training data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from expertsteer.method.rfm import RFMConfig, check_data, fit_rfm
from expertsteer.method.vectors import orient


def mean_difference(x, y, x_val=None, y_val=None, seed=0) -> torch.Tensor:
    """CAA: mean of the positive states minus mean of the negative states."""
    difference = x[y == 1].mean(0) - x[y == 0].mean(0)
    return orient(difference / difference.norm(), x, y)


def pca_of_differences(x, y, x_val=None, y_val=None, seed=0) -> torch.Tensor:
    """Top principal direction of positive-minus-negative differences.

    Rows are paired in order (the i-th positive with the i-th negative), as steering items are
    written: prompt + correct answer, then the same prompt + a wrong answer.
    """
    positive, negative = x[y == 1], x[y == 0]
    count = min(len(positive), len(negative))
    differences = positive[:count] - negative[:count]
    # Uncentred: the shared offset is the signal, not a nuisance.
    _, _, vectors = torch.linalg.svd(differences, full_matrices=False)
    return orient(vectors[0] / vectors[0].norm(), x, y)


def logistic_probe(
    x, y, x_val=None, y_val=None, seed=0, l2: float = 1e-2, steps: int = 200
) -> torch.Tensor:
    """Weight vector of an L2-regularised logistic regression on standardised states."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")
    targets = y.to(x.dtype)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, targets)
        loss = loss + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight = weight.detach() / std  # back to the unstandardised space
    return orient(weight / weight.norm(), x, y)


def random_unit_vectors(count: int, dim: int, seed: int) -> torch.Tensor:
    """`[count, dim]` float64 unit rows, isotropic, from a generator seeded by `seed` alone.

    Nothing but (count, dim, seed) enters, so the vectors cannot depend on any labels; the
    first `n` rows do not depend on `count` (the same null draws for any larger K).
    """
    if count < 1 or dim < 1:
        raise ValueError(f"count and dim must be >= 1, got {count} and {dim}")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    return rows / rows.norm(dim=1, keepdim=True)


def random_direction(x, y, x_val=None, y_val=None, seed=0) -> torch.Tensor:
    """A seeded random unit vector (a control; not oriented by the labels), drawn on the CPU
    (the same vector on every device) and put where x is."""
    return random_unit_vectors(1, x.shape[1], seed)[0].to(x.device, x.dtype)


def rfm_direction(x, y, x_val, y_val, seed=0, config: RFMConfig | None = None) -> torch.Tensor:
    """Top AGOP eigenvector of a Recursive Feature Machine (see `expertsteer.method.rfm`)."""
    return fit_rfm(x, y, x_val, y_val, config).direction


EXTRACTORS: dict[str, Callable[..., torch.Tensor]] = {
    "rfm": rfm_direction,
    "mean_diff": mean_difference,
    "pca_diff": pca_of_differences,
    "logistic": logistic_probe,
    "random": random_direction,
}


def extract(
    method: str,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Unit steering direction [d] by `method` (one of `EXTRACTORS`)."""
    if method not in EXTRACTORS:
        raise ValueError(f"unknown extractor '{method}'; choose one of {sorted(EXTRACTORS)}")
    check_data(x, y, "training data")
    if method == "rfm" and (x_val is None or y_val is None):
        raise ValueError("the rfm extractor needs validation data for model selection")
    return EXTRACTORS[method](x, y, x_val, y_val, seed=seed)
