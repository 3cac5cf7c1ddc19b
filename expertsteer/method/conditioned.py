"""Input-dependent steering: the push on each input is set by a model's own reading of it.

A `Reading` is a linear read-out of one model's last-prompt-token state at one block, fitted
on the steer split's *class items* (each item's prompt, labelled with its own gold class;
`expertsteer.data.prompts.class_items`):

* two classes: u, the reader's mean-difference direction (class 1 minus class 0), and m, s,
  the midpoint and half-distance of the two classes' mean projections on u; the coefficient
  of input x is c(x) = clip((<h(x), u> - m) / s, -c_max, c_max), one column;
* K > 2 classes: a multinomial probe (L2-regularised softmax regression on standardised
  states) gives p_k(x); the coefficients are c_k(x) = clip(p_k(x) - mean_steer p_k, -c_max,
  c_max), one column per class, so the push sum_k c_k(x) v_k is the probability-weighted sum
  of the class directions minus its steer-split mean.

The target then gets alpha * s_j * c(x) @ V_j at block j (`Intervention.coefficients`), with
V_j the push directions (`class_labels`: the class-1 direction, or one-vs-rest per class).
The reader is the expert at its paired block (`expert_conditioned*`) or, as the control of
what the target already knows, the target at block j (`target_conditioned`); with
`reader_block: best` each reads at the block of its own model whose reading classifies the
steer split best in cross-validation (`reader_block_accuracies`). The content-free
calibration prompts are steered with `Reading.reference`, the steer split's mean coefficient,
so calibration removes the average push and leaves the per-input part.

`reader.safetensors` (`save_reading` / `load_reading`) holds the read-out folded onto the
model's raw states (`weight [K, d]`, `bias [K]`), the steer split's scores and the
midpoint / half-distance or mean probabilities: everything needed to read a new input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertsteer.artifacts import ArtifactError, load_artifact, save_artifact
from expertsteer.method.extractors import mean_difference
from expertsteer.method.steer import Intervention
from expertsteer.method.vectors import SteeringVectors

READER_FILE = "reader.safetensors"
KIND = "reader"
READERS = ("expert", "target")
"""Whose states a conditioned method reads: the expert's (at the pair's expert block) or the
target's own (at the steered block: the `target_conditioned` control)."""
PROBES = {reader: f"{reader}_probe" for reader in READERS}
"""Reader -> name of its own answers' row in the evaluation (the ceiling of what its reading
can pass on)."""
SHUFFLED = "shuffled"
"""The control of a conditioned method: its test coefficients permuted across items."""
TARGET_READING = "target_conditioned"
"""The control method in which the target reads itself (what it already knows)."""
DEFAULT_C_MAX = (1.0, 2.0)
"""Clip bounds of the coefficients tried on dev (1: at most the class means' push)."""
READER_BLOCKS = ("paired", "best")
"""Where a reader reads: `paired` (the expert at the pair's expert block i, the target at its
block j) or `best` (the block of the reader's model whose reading classifies the steer split
best in stratified cross-validation: `reader_block_accuracies`; dev and test are not used)."""
READER_FOLDS = 5
"""Folds of that cross-validation."""


def class_labels(y: torch.Tensor, classes: int) -> list[torch.Tensor]:
    """0/1 labels of each push direction: class 1 vs class 0 for two classes, else each class
    against the rest (one-vs-rest)."""
    if classes < 2:
        raise ValueError(f"conditioned steering needs at least two classes, got {classes}")
    if classes == 2:
        return [y.long()]
    return [(y == k).long() for k in range(classes)]


def check_classes(y: torch.Tensor, classes: int, what: str) -> None:
    """Every class 0..classes-1 must occur in `y` (a direction needs both sides)."""
    missing = sorted(set(range(classes)) - set(y.long().tolist()))
    if missing:
        raise ValueError(
            f"{what} has no item of class(es) {missing}; every class needs items in the steer "
            "split: enlarge it"
        )


@dataclass
class Reading:
    """A linear read-out of a model's states at one block and the coefficients it gives."""

    weight: torch.Tensor
    """`[K, d]` read-out on the raw states (two classes: K = 1, the direction u)."""
    bias: torch.Tensor
    """`[K]` offsets of the read-out (zero for two classes)."""
    steer_scores: torch.Tensor
    """`[n, K]` scores of the steer split's items (for `reference`)."""
    midpoint: float | None = None
    """m: midpoint of the two classes' mean projections (two classes)."""
    half: float | None = None
    """s: half their distance (two classes)."""
    mean_probs: torch.Tensor | None = None
    """`[K]` mean probe probabilities on the steer split (more than two classes)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Reader model and block, classes, how it was fitted."""

    @property
    def classes(self) -> int:
        return 2 if self.weight.shape[0] == 1 else int(self.weight.shape[0])

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        """`[n, K]` read-out of raw states `[n, d]` (projections, or the probe's logits)."""
        weight = self.weight.double().to(states.device)
        return states.double() @ weight.T + self.bias.double().to(states.device)

    def coefficients(self, scores: torch.Tensor, c_max: float) -> torch.Tensor:
        """`[n, K]` push coefficients of scores `[n, K]`, clipped at +-`c_max`."""
        if c_max <= 0:
            raise ValueError(f"c_max must be positive, got {c_max}")
        scores = scores.double()
        if self.classes == 2:
            raw = (scores - self.midpoint) / self.half
        else:
            raw = torch.softmax(scores, dim=-1) - self.mean_probs.double().to(scores.device)
        return raw.clamp(-c_max, c_max)

    def distinct_bounds(self, c_max: Sequence[float]) -> list[float]:
        """The clip bounds of `c_max` that give different coefficients. More than two classes:
        a coefficient is a probability minus its steer mean, inside [-1, 1], so every bound
        >= 1 clips nothing and only the smallest of them is kept."""
        if self.classes == 2:
            return list(c_max)
        inside = sorted({float(c) for c in c_max if c < 1})
        above = [float(c) for c in c_max if c >= 1]
        return inside + ([min(above)] if above else [])

    def reference(self, c_max: float) -> torch.Tensor:
        """`[K]` the steer split's mean coefficient (what calibration prompts are steered with)."""
        return self.coefficients(self.steer_scores, c_max).mean(0)

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        """`[n]` the class the reader gives each input (the probe's own answer)."""
        if self.classes == 2:
            return (scores[:, 0] > self.midpoint).long()
        return scores.argmax(dim=-1)


def fit_reading(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    l2: float = 1e-2,
    steps: int = 200,
    metadata: dict[str, Any] | None = None,
) -> Reading:
    """The reading of class-labelled raw states `x [n, d]`, `y [n]` in 0..classes-1 (see the
    module docstring), fitted in float64."""
    check_classes(y, classes, "the reader's fitting data")
    x = x.double()
    y = y.long()
    if classes == 2:
        u = mean_difference(x, y)
        projections = x @ u
        high, low = projections[y == 1].mean(), projections[y == 0].mean()
        half = float(high - low) / 2
        if not half > 0:
            raise ValueError("the two classes' states project to the same mean: nothing to read")
        scores = projections[:, None]
        return Reading(
            u[None],
            torch.zeros(1, dtype=torch.float64),
            scores,
            midpoint=float(high + low) / 2,
            half=half,
            metadata=dict(metadata or {}),
        )
    weight, bias = _softmax_probe(x, y, classes, l2, steps)
    scores = x @ weight.T + bias
    return Reading(
        weight,
        bias,
        scores,
        mean_probs=torch.softmax(scores, dim=-1).mean(0),
        metadata=dict(metadata or {}),
    )


def stratified_folds(y: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """`[n]` fold index of each item: each class's items, in a seeded order, dealt round-robin
    over `folds` folds (every fold gets each class's share, up to one item)."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    for k in sorted(set(y.long().tolist())):
        members = torch.nonzero(y.long() == k).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = torch.arange(len(members)) % folds
    return fold


def reader_block_accuracies(
    states: dict[int, torch.Tensor],
    y: torch.Tensor,
    classes: int,
    folds: int = READER_FOLDS,
    seed: int = 0,
) -> dict[int, float]:
    """Cross-validated accuracy of a reading at each block: `states` maps block -> `[n, d]`
    states of the steer split's class items, `y [n]` their classes. Each fold is read by a
    `fit_reading` of the other folds (the same folds at every block)."""
    check_classes(y, classes, "the reader's fitting data")
    smallest = min(int((y.long() == k).sum()) for k in range(classes))
    if smallest < folds:
        raise ValueError(
            f"choosing the reader's block by {folds}-fold cross-validation needs at least "
            f"{folds} steer items of every class, got {smallest}; enlarge the steer split or "
            "use reader_block: paired"
        )
    fold = stratified_folds(y, folds, seed)
    accuracies = {}
    for block, x in sorted(states.items()):
        correct = 0
        try:
            for k in range(folds):
                held = fold == k
                reading = fit_reading(x[~held], y[~held], classes)
                correct += int((reading.predict(reading.scores(x[held])) == y[held].long()).sum())
        except ValueError:  # the classes' states coincide at this block: nothing to read
            correct = 0
        accuracies[block] = correct / len(y)
    if not any(accuracies.values()):
        raise ValueError("no block's states separate the classes of the steer split")
    return accuracies


def best_block(accuracies: dict[int, float]) -> int:
    """The block of the highest accuracy; ties go to the shallowest (the cheapest to read)."""
    return min(accuracies, key=lambda block: (-accuracies[block], block))


def _softmax_probe(
    x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised states (L-BFGS, L2 on the weights),
    folded back onto the raw states: (weight [K, d], bias [K])."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    weight = torch.zeros(classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight.T + bias, y)
        loss = loss + l2 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    folded = weight.detach() / std
    return folded, bias.detach() - folded @ mean


def save_reading(path: str | Path, reading: Reading) -> Path:
    """Write `reader.safetensors`."""
    tensors = {
        "weight": reading.weight.double(),
        "bias": reading.bias.double(),
        "steer_scores": reading.steer_scores.double(),
    }
    if reading.mean_probs is not None:
        tensors["mean_probs"] = reading.mean_probs.double()
    metadata = {
        **reading.metadata,
        "classes": reading.classes,
        "midpoint": reading.midpoint,
        "half": reading.half,
    }
    return save_artifact(path, KIND, tensors, metadata)


def load_reading(path: str | Path, expect: dict[str, Any] | None = None) -> Reading:
    """Read and check `reader.safetensors` (`expect`: metadata values that must match)."""
    tensors, metadata = load_artifact(path, KIND, expect)
    try:
        reading = Reading(
            tensors["weight"],
            tensors["bias"],
            tensors["steer_scores"],
            midpoint=metadata.get("midpoint"),
            half=metadata.get("half"),
            mean_probs=tensors.get("mean_probs"),
            metadata={k: v for k, v in metadata.items() if k not in ("midpoint", "half")},
        )
    except KeyError as error:
        raise ArtifactError(f"{path}: malformed reader artifact (missing {error})") from error
    two = reading.classes == 2
    if (two and not (reading.half or 0) > 0) or (not two and reading.mean_probs is None):
        raise ArtifactError(f"{path}: malformed reader artifact (no midpoint / probabilities)")
    return reading


def shuffled_orders(count: int, k: int, seed: int) -> list[torch.Tensor]:
    """`k` permutations of `count` items from a generator seeded by `seed` alone: the
    `shuffled` control gives item n the coefficients of item order[n]."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(count, generator=generator) for _ in range(k)]


def conditioned_intervention(
    steering: SteeringVectors,
    reading: Reading,
    coefficients: torch.Tensor,
    alpha: float,
    positions: str,
    layers: list[int] | tuple[int, ...],
    c_max: float,
) -> Intervention:
    """The per-row intervention of a conditioned method's vectors: row n of `coefficients`
    (`[N, K]`, from `Reading.coefficients` at `c_max`) weighs the K push directions of each
    steered layer; calibration prompts get the steer split's mean coefficient."""
    return Intervention(
        vectors={layer: steering.directions[layer] for layer in layers},
        scales={layer: float(steering.norm_scale[layer]) for layer in layers},
        alpha=alpha,
        positions=positions,
        coefficients=coefficients,
        reference=reading.reference(c_max),
    )
