"""Accuracy, macro-F1, habit rate, bootstrap intervals and the share of the gap closed.

Every reported number gets a 95% percentile-bootstrap interval over items. Differences between
two methods evaluated on the same items use the paired bootstrap (the same resampled item indices
for both), which removes the item-difficulty variance the two share; an unpaired interval on the
difference would be far too wide for methods that get the same easy items right.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

# Resampled index matrices are drawn in chunks of at most this many entries (memory bound).
_CHUNK_ENTRIES = 1 << 22


def _as_predictions(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Unanswered predictions (-1) become an extra class `num_classes` that is never correct."""
    if preds.shape != target.shape or preds.dim() != 1:
        raise ValueError(
            f"preds and target must be 1-D of equal length, got {tuple(preds.shape)} and "
            f"{tuple(target.shape)}"
        )
    if preds.numel() == 0:
        raise ValueError("no items to score")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if target.min() < 0 or target.max() >= num_classes:
        raise ValueError(f"target labels must lie in 0..{num_classes - 1}")
    if preds.max() >= num_classes or preds.min() < -1:
        raise ValueError(f"predictions must lie in 0..{num_classes - 1} (or -1 for unanswered)")
    return torch.where(preds < 0, num_classes, preds).long()


def accuracy(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Share of items with `preds == target`; `preds` may hold -1 for unanswered items."""
    mapped = _as_predictions(preds, target, num_classes)
    return float(
        multiclass_accuracy(mapped, target.long(), num_classes=num_classes + 1, average="micro")
    )


def macro_f1(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean F1 over the classes present in `target` or `preds`.

    Unanswered items (-1) count as misses of their gold class; the "unanswered" class itself is
    not averaged. Absent classes are left out rather than counted as F1 = 0, which would punish
    a test split that happens to lack a label.
    """
    mapped = _as_predictions(preds, target, num_classes)
    per_class = multiclass_f1_score(
        mapped, target.long(), num_classes=num_classes + 1, average=None, zero_division=0
    )[:num_classes]
    counts = torch.bincount(target.long(), minlength=num_classes + 1)[:num_classes]
    counts = counts + torch.bincount(mapped, minlength=num_classes + 1)[:num_classes]
    present = counts > 0
    return float(per_class[present].mean())


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _as_values(values: torch.Tensor, name: str) -> torch.Tensor:
    values = torch.as_tensor(values)
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    return values.detach().to("cpu", torch.float64)


def _resampled_indices(n: int, n_boot: int, seed: int):
    """Yield `[chunk, n]` item-index matrices, `n_boot` rows in all, from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    rows = max(1, _CHUNK_ENTRIES // n)
    for start in range(0, n_boot, rows):
        yield torch.randint(n, (min(rows, n_boot - start), n), generator=generator)


def bootstrap_means(values: torch.Tensor, n_boot: int = 2000, seed: int = 0) -> torch.Tensor:
    """Means of `n_boot` resamples (with replacement, same size) of `values`: `[n_boot]`."""
    values = _as_values(values, "values")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return torch.cat(
        [values[idx].mean(dim=1) for idx in _resampled_indices(len(values), n_boot, seed)]
    )


def _interval(samples: torch.Tensor, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = torch.quantile(samples, torch.tensor([tail, 1.0 - tail], dtype=samples.dtype))
    return float(low), float(high)


def bootstrap_ci(
    correct: torch.Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): the observed mean and a percentile-bootstrap interval over items."""
    _check_level(level, n_boot)
    values = _as_values(correct, "correct")
    low, high = _interval(bootstrap_means(values, n_boot, seed), level)
    return float(values.mean()), low, high


def _macro_f1_rows(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`macro_f1` of each row of `[rows, n]` mapped predictions / labels, vectorised."""
    predicted = torch.nn.functional.one_hot(preds, num_classes + 1)[..., :num_classes].double()
    gold = torch.nn.functional.one_hot(target, num_classes).double()
    true_pos = (predicted * gold).sum(dim=1)
    predicted_count, gold_count = predicted.sum(dim=1), gold.sum(dim=1)
    denominator = predicted_count + gold_count
    f1 = torch.where(denominator > 0, 2 * true_pos / denominator.clamp(min=1), 0.0)
    present = denominator > 0
    return (f1 * present).sum(dim=1) / present.sum(dim=1)


def macro_f1_ci(
    preds: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(macro-F1, low, high): `macro_f1` with a percentile-bootstrap interval over items."""
    _check_level(level, n_boot)
    mapped, target = _as_predictions(preds, target, num_classes), target.long()
    samples = torch.cat(
        [
            _macro_f1_rows(mapped[idx], target[idx], num_classes)
            for idx in _resampled_indices(len(target), n_boot, seed)
        ]
    )
    low, high = _interval(samples, level)
    return macro_f1(preds, target, num_classes), low, high


def paired_macro_f1(
    preds_a: torch.Tensor,
    preds_b: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float, float]:
    """(macro-F1(a) - macro-F1(b), low, high, p) over the same items: both prediction vectors
    are resampled at the SAME indices (macro-F1 is not a mean over items, so the difference is
    recomputed per resample). p is two-sided, counted as in `paired_bootstrap_p`."""
    _check_level(level, n_boot)
    a = _as_predictions(preds_a, target, num_classes)
    b = _as_predictions(preds_b, target, num_classes)
    target = target.long()
    samples = torch.cat(
        [
            _macro_f1_rows(a[idx], target[idx], num_classes)
            - _macro_f1_rows(b[idx], target[idx], num_classes)
            for idx in _resampled_indices(len(target), n_boot, seed)
        ]
    )
    low, high = _interval(samples, level)
    observed = _macro_f1_rows(a[None], target[None], num_classes)
    difference = float(observed - _macro_f1_rows(b[None], target[None], num_classes))
    return difference, low, high, _two_sided_p(samples)


def habit_rate_ci(
    codes: torch.Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(habit rate, low, high): the share of items given the most common prediction, with a
    percentile-bootstrap interval over items. `codes` numbers the distinct predictions 0..U-1,
    -1 for an unanswered item (never counted as a habit)."""
    _check_level(level, n_boot)
    codes = torch.as_tensor(codes).long()
    if codes.dim() != 1 or codes.numel() == 0:
        raise ValueError(f"codes must be a non-empty 1-D tensor, got shape {tuple(codes.shape)}")
    if codes.min() < -1:
        raise ValueError("codes must be >= 0, or -1 for unanswered items")
    width = int(codes.max()) + 2
    one_hot = torch.nn.functional.one_hot(codes + 1, width)[:, 1:].double()

    def rates(counts: torch.Tensor) -> torch.Tensor:
        top = counts.max(dim=-1).values if counts.shape[-1] else torch.zeros(counts.shape[:-1])
        return top / len(codes)

    samples = torch.cat(
        [rates(one_hot[idx].sum(dim=1)) for idx in _resampled_indices(len(codes), n_boot, seed)]
    )
    low, high = _interval(samples.double(), level)
    return float(rates(one_hot.sum(dim=0))), low, high


def paired_bootstrap_ci(
    correct_a: torch.Tensor,
    correct_b: torch.Tensor,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high) with both vectors resampled at the SAME item indices.

    `correct_a[i]` and `correct_b[i]` must refer to the same item (same prompts, same order).
    """
    _check_level(level, n_boot)
    difference, samples = _paired_differences(correct_a, correct_b, n_boot, seed)
    low, high = _interval(samples, level)
    return float(difference.mean()), low, high


def _paired_differences(
    correct_a: torch.Tensor, correct_b: torch.Tensor, n_boot: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item differences a - b and the means of `n_boot` paired resamples of them."""
    a, b = _as_values(correct_a, "correct_a"), _as_values(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(
            f"paired bootstrap needs the same items for both methods, got {len(a)} and {len(b)}"
        )
    difference = a - b
    samples = torch.cat(
        [difference[idx].mean(dim=1) for idx in _resampled_indices(len(a), n_boot, seed)]
    )
    return difference, samples


def paired_bootstrap_p(
    correct_a: torch.Tensor, correct_b: torch.Tensor, n_boot: int = 2000, seed: int = 0
) -> float:
    """Two-sided paired-bootstrap p-value of mean(a) - mean(b) = 0.

    From the same resamples as `paired_bootstrap_ci` (same seed): p = 2 min(P*(d <= 0),
    P*(d >= 0)), each share counted as (1 + count) / (1 + n_boot) so that p is never 0, capped
    at 1. Resamples with a difference of exactly 0 count on both sides (conservative). So
    p < 0.05 goes with a 95% percentile interval that excludes 0; two items sets that never
    differ give p = 1.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    _, samples = _paired_differences(correct_a, correct_b, n_boot, seed)
    return _two_sided_p(samples)


def _two_sided_p(samples: torch.Tensor) -> float:
    """2 min(P*(d <= 0), P*(d >= 0)) over bootstrap differences, each share (1 + count) /
    (1 + n), capped at 1."""
    below = (1 + int((samples <= 0).sum())) / (1 + len(samples))
    above = (1 + int((samples >= 0).sum())) / (1 + len(samples))
    return min(1.0, 2 * min(below, above))


def empirical_p(value: float, null: list[float]) -> float:
    """One-sided empirical p-value of `value` against null draws: (1 + #{null >= value}) /
    (1 + n). Never below 1 / (n + 1); ties count against `value`."""
    if not null:
        raise ValueError("no null draws to compare with")
    return (1 + sum(draw >= value for draw in null)) / (1 + len(null))


def gap_closed(steered: float, target: float, expert: float, min_gap: float = 1e-6) -> float | None:
    """Share of the expert-minus-target gap that steering closes: (steered - target) / gap.

    None when `expert - target <= min_gap`: with no gap the ratio divides by (nearly) zero and
    is noise, and with a negative gap (the expert is worse) there is no knowledge to transfer and
    the sign flips, so a steering gain would read as a negative share. Check the paired interval
    of expert minus target too: a positive but insignificant gap makes the ratio unreliable.
    """
    gap = expert - target
    if gap <= min_gap:
        return None
    return (steered - target) / gap
