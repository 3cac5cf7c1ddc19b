"""The controls a steering claim is measured against, and the verdict they allow.

* `none+bias` — the unsteered target with per-class log-odds offsets tuned on dev: what a moved
  decision threshold alone achieves. `fit_offsets` searches offsets b (b_0 = 0) for
  `argmax_k(calibrated[n, k] + b[k])` with the same number of dev evaluations as a steered
  method's alpha grid (`budget`), no extra forward pass: the offsets act on the target's
  calibrated option scores already computed for `none`.
* the random null — K label-free random unit vectors, each chosen on dev exactly like a method;
  `null_summary` describes their test gains over `none`.
* `helps` / `conclusion` — a method helps only if it beats `none`, `none+bias` (where it
  applies) and the null, each at p < `LEVEL`, and its gain lies above the null's 95th
  percentile: a gain inside the null's range is never called a gain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

LEVEL = 0.05
"""Significance level of every comparison (unadjusted; the report gives the count)."""
NONE = "none"
NONE_BIAS = "none+bias"
EXPERT = "expert"
CONTROLS = (NONE, NONE_BIAS, EXPERT)
"""Unsteered entries of `metrics["methods"]`; every other entry is a steered method."""


# -- none+bias ----------------------------------------------------------------------------------


def offset_predictions(scores: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`[N]` argmax of `scores [N, K] + offsets [K]`; -inf padding (absent options) stays out."""
    return (scores + offsets.to(scores.dtype)).argmax(dim=1)


def _accuracy(scores: torch.Tensor, gold: torch.Tensor, offsets: torch.Tensor) -> float:
    return float((offset_predictions(scores, offsets) == gold).double().mean())


def _cuts(margins: torch.Tensor, count: int) -> list[float]:
    """Up to `count` offsets that give class k about 1/(count+1), ..., count/(count+1) of the
    items: midpoints between consecutive sorted margins (so no item sits on a cut)."""
    values = torch.unique(margins[torch.isfinite(margins)])  # sorted
    if len(values) < 2:
        return []
    cuts = []
    for i in range(1, count + 1):
        j = min(max(round(i * len(values) / (count + 1)), 1), len(values) - 1)
        cuts.append(float((values[j - 1] + values[j]) / 2))
    return list(dict.fromkeys(cuts))


def fit_offsets(scores: torch.Tensor, gold: torch.Tensor, budget: int) -> torch.Tensor:
    """Per-class log-odds offsets `[K]` (class 0 fixed at 0) with the best dev accuracy.

    One pass of coordinate search over classes 1..K-1, `budget // (K - 1)` (at least one)
    candidates each, so the whole search scores at most `budget` settings (K = 2: `budget`
    thresholds). Candidates for class k are data-driven cuts: with the other offsets fixed, item
    n switches to k once b_k exceeds its margin max_{j != k}(s_nj + b_j) - s_nk, and the cuts
    sit at evenly spaced quantiles of those margins (no labels enter the candidates; labels
    only pick among them). The incumbent is "no offset" (`none` itself); a candidate replaces
    it only if strictly better on dev, and among equals the smaller |offset| wins — the tie
    rule of a method's alpha.
    """
    if scores.dim() != 2 or scores.shape[1] < 2 or scores.shape[0] != len(gold):
        raise ValueError(
            f"scores must be [N, K>=2] with one gold label per row, got {tuple(scores.shape)} "
            f"and {len(gold)} labels"
        )
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    scores = scores.double()
    classes = scores.shape[1]
    offsets = torch.zeros(classes, dtype=torch.float64)
    best = _accuracy(scores, gold, offsets)
    per_class = max(1, budget // (classes - 1))
    for k in range(1, classes):
        others = (scores + offsets).clone()
        others[:, k] = float("-inf")
        margins = others.max(dim=1).values - scores[:, k]
        for cut in _cuts(margins, per_class):
            trial = offsets.clone()
            trial[k] = cut
            accuracy = _accuracy(scores, gold, trial)
            if accuracy > best or (accuracy == best and abs(cut) < abs(float(offsets[k]))):
                offsets, best = trial, accuracy
    return offsets


# -- the null -----------------------------------------------------------------------------------


def null_summary(gains: Sequence[float]) -> dict[str, float]:
    """Median, 95th percentile (linear interpolation), mean, min and max of null test gains."""
    if not gains:
        raise ValueError("the null distribution has no draws")
    values = torch.tensor(list(gains), dtype=torch.float64)
    return {
        "median": float(values.quantile(0.5)),
        "p95": float(values.quantile(0.95)),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def smallest_null_p(k: int) -> float:
    """The smallest empirical p-value K null draws can give: 1 / (K + 1)."""
    return 1.0 / (k + 1)


# -- verdict ------------------------------------------------------------------------------------


def _significant_gain(entry: dict[str, Any], versus: str) -> bool:
    comparison, p = entry.get(f"vs_{versus}"), entry.get(f"p_vs_{versus}")
    return comparison is not None and p is not None and comparison["difference"] > 0 and p < LEVEL


def steered_methods(metrics: dict[str, Any]) -> list[str]:
    return [name for name in metrics["methods"] if name not in CONTROLS]


def helps(metrics: dict[str, Any], method: str) -> bool:
    """Whether `method` beats none, none+bias (where it applies) and the null, each at
    p < LEVEL, with its gain above the null's 95th percentile."""
    entry = metrics["methods"][method]
    null = metrics.get("null")
    if null is None or not null.get("gains"):
        return False
    gain = entry["vs_none"]["difference"]
    beats_null = entry.get("p_vs_null") is not None and entry["p_vs_null"] < LEVEL
    beats_null = beats_null and gain > null["p95"]
    beats_bias = NONE_BIAS not in metrics["methods"] or _significant_gain(entry, "none_bias")
    return _significant_gain(entry, "none") and beats_bias and beats_null


def comparison_count(metrics: dict[str, Any]) -> int:
    """Hypothesis tests behind the conclusion: per steered method vs none, none+bias (where
    it applies) and the null (where there is one)."""
    per_method = 1 + (NONE_BIAS in metrics["methods"]) + bool((metrics.get("null") or {}).get("k"))
    return per_method * len(steered_methods(metrics))


def conclusion(metrics: dict[str, Any]) -> str:
    """One line: which steered methods beat none, none+bias and the null (p < LEVEL)."""
    task = metrics["task"]
    controls = (
        "none, none+bias and the random null"
        if NONE_BIAS in metrics["methods"]
        else ("none and the random null (none+bias does not apply: no option scores)")
    )
    null = metrics.get("null") or {}
    k = int(null.get("k") or 0)
    if k == 0:
        return f"{task}: no null distribution (K = 0), so no method can be called a gain."
    winners = [m for m in steered_methods(metrics) if helps(metrics, m)]
    if winners:
        verb = "beats" if len(winners) == 1 else "beat"
        return f"{task}: {', '.join(winners)} {verb} {controls} (p < {LEVEL:g} each)."
    line = f"{task}: no steered method beats {controls} (p < {LEVEL:g} each)."
    if smallest_null_p(k) >= LEVEL:
        line += (
            f" With K = {k} null draws the smallest attainable p vs the null is "
            f"{smallest_null_p(k):.2f}: this run cannot show a gain over noise "
            f"(K >= {math.ceil(1 / LEVEL)} needed)."
        )
    return line
