"""The controls a steering claim is measured against, and the verdict they allow.

* `none+bias` — the unsteered target with a decision rule tuned on dev: per-class log-odds
  offsets, or one class for every item. What a moved decision threshold alone achieves, up to
  the extreme a collapsed method reaches. `fit_offsets` searches offsets b (b_0 = 0) for
  `argmax_k(calibrated[n, k] + b[k])` with as many offset candidates as the largest dev search
  of a steered method (`budget`), and every constant predictor besides; no extra forward pass:
  the rule acts on the target's calibrated option scores already computed for `none`.
* the random null — K label-free random unit vectors, each chosen on dev exactly like a method;
  `null_summary` describes their test gains over `none`.
* `helps` / `conclusion` — a method helps only if it beats `none`, `none+bias` (where it
  applies) and the null, each at p < `LEVEL`, and its gain lies above the null's 95th
  percentile: a gain inside the null's range is never called a gain. Where answers are classes
  (option-scored tasks) it must also hold on a balanced view: the method is not `collapsed`
  (one answer for nearly every item while the gold labels are not that lopsided) and its
  macro-F1 is not significantly below `none`'s. A one-class test set allows no verdict.
* conditioned methods (`expertsteer.method.conditioned`, whose entry names its `reader`) must
  also beat `shuffled` (their own test coefficients permuted across items, K times: one-sided
  empirical p < `LEVEL` and a gain above its 95th percentile) and, for an expert reader, the
  target reading itself (`target_conditioned`, paired p < `LEVEL`); for them `shuffled` is
  the null, and the random null counts where there is one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertsteer.method.conditioned import PROBES as READER_PROBES
from expertsteer.method.conditioned import SHUFFLED, TARGET_READING

LEVEL = 0.05
"""Significance level of every comparison (unadjusted; the report gives the count)."""
NONE = "none"
NONE_BIAS = "none+bias"
EXPERT = "expert"
PROBES = tuple(READER_PROBES.values())
"""The readers of conditioned methods answering by themselves: a ceiling, not a steered row."""
CONTROLS = (NONE, NONE_BIAS, EXPERT, *PROBES)
"""Unsteered entries of `metrics["methods"]`; every other entry is a steered method."""
COLLAPSE_HABIT = 0.95
"""A steered row is collapsed when it gives one answer to at least this share of test items..."""
COLLAPSE_MAJORITY = 0.9
"""...while the gold labels' majority class holds less than this share of them."""


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


@dataclass(frozen=True)
class ThresholdRule:
    """A `none+bias` decision rule on calibrated option scores: per-class offsets, or, with
    `constant` set, that one class for every item. `candidates`: how many rules the dev
    search scored (the incumbent "no offset" not counted)."""

    offsets: torch.Tensor
    constant: int | None = None
    candidates: int = 0

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        """`[N]` predicted class of each row of `scores [N, K]`."""
        if self.constant is not None:
            return torch.full((scores.shape[0],), self.constant, dtype=torch.long)
        width = scores.shape[1]
        offsets = torch.zeros(width, dtype=torch.float64)
        offsets[: min(width, len(self.offsets))] = self.offsets[:width]
        return offset_predictions(scores, offsets)


def _rule_accuracy(scores: torch.Tensor, gold: torch.Tensor, rule: ThresholdRule) -> float:
    return float((rule.predict(scores) == gold).double().mean())


def fit_offsets(scores: torch.Tensor, gold: torch.Tensor, budget: int) -> ThresholdRule:
    """The `none+bias` rule with the best dev accuracy: per-class log-odds offsets `[K]` (class
    0 fixed at 0), or one class for every item.

    Offsets: one pass of coordinate search over classes 1..K-1, `budget // (K - 1)` (at least
    one) candidates each, so that search scores at most `budget` settings (K = 2: `budget`
    thresholds). Candidates for class k are data-driven cuts: with the other offsets fixed,
    item n switches to k once b_k exceeds its margin max_{j != k}(s_nj + b_j) - s_nk, and the
    cuts sit at evenly spaced quantiles of those margins (no labels enter the candidates; labels
    only pick among them). Then each of the K constant predictors ("always class k"), the
    extreme a collapsed steered method reaches, which quantile cuts never do. The incumbent is
    "no offset" (`none` itself); a candidate replaces it only if strictly better on dev, and
    among equal offsets the smaller |offset| wins — the tie rule of a method's alpha; a
    constant rule must beat every offset rule.
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
    candidates = 0
    for k in range(1, classes):
        others = (scores + offsets).clone()
        others[:, k] = float("-inf")
        margins = others.max(dim=1).values - scores[:, k]
        for cut in _cuts(margins, per_class):
            trial = offsets.clone()
            trial[k] = cut
            candidates += 1
            accuracy = _accuracy(scores, gold, trial)
            if accuracy > best or (accuracy == best and abs(cut) < abs(float(offsets[k]))):
                offsets, best = trial, accuracy
    constant = None
    for k in range(classes):
        candidates += 1
        accuracy = _rule_accuracy(scores, gold, ThresholdRule(offsets, constant=k))
        if accuracy > best:
            constant, best = k, accuracy
    return ThresholdRule(offsets, constant, candidates)


def collapsed(habit_rate: float, gold: Sequence[int]) -> bool:
    """Whether one answer for `habit_rate` of the items is a collapse: at least
    `COLLAPSE_HABIT` of them, while the gold majority class holds under `COLLAPSE_MAJORITY`."""
    if not gold:
        raise ValueError("no gold labels")
    counts: dict[int, int] = {}
    for label in gold:
        counts[int(label)] = counts.get(int(label), 0) + 1
    majority = max(counts.values()) / len(gold)
    return habit_rate >= COLLAPSE_HABIT and majority < COLLAPSE_MAJORITY


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


def verdict_metrics(metrics: dict[str, Any]) -> list[str]:
    """The figures a verdict requires: accuracy, and macro-F1 where answers are classes."""
    return ["accuracy", "macro_f1"] if _has_classes(metrics) else ["accuracy"]


def _has_classes(metrics: dict[str, Any]) -> bool:
    return metrics["methods"][NONE].get("macro_f1") is not None


def _balanced(entry: dict[str, Any]) -> bool:
    """Not collapsed, and macro-F1 not significantly below `none`'s (where measured)."""
    if entry.get("collapsed"):
        return False
    comparison, p = entry.get("vs_none_macro_f1"), entry.get("p_vs_none_macro_f1")
    return not (
        comparison is not None and p is not None and comparison["difference"] < 0 and p < LEVEL
    )


def helps(metrics: dict[str, Any], method: str) -> bool:
    """Whether `method` beats none, none+bias (where it applies) and the null, each at
    p < LEVEL, with its gain above the null's 95th percentile; where answers are classes, also
    not collapsed and with macro-F1 not significantly below none's. Never on a one-class test
    set."""
    if metrics.get("one_class_test"):
        return False
    entry = metrics["methods"][method]
    null = metrics.get("null")
    gain = entry["vs_none"]["difference"]
    if "reader" in entry:
        if not _beats_draws(gain, entry.get(SHUFFLED), entry.get(f"p_vs_{SHUFFLED}")):
            return False
        if f"vs_{TARGET_READING}" in entry and not _significant_gain(entry, TARGET_READING):
            return False
        beats_null = not (null and null.get("gains")) or _beats_draws(
            gain, null, entry.get("p_vs_null")
        )
    else:
        beats_null = _beats_draws(gain, null, entry.get("p_vs_null"))
    return beats_null and _beats_plain_controls(metrics, entry)


def _beats_plain_controls(metrics: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Beats none and none+bias (where it applies) at p < LEVEL, balanced."""
    beats_bias = NONE_BIAS not in metrics["methods"] or _significant_gain(entry, "none_bias")
    return _significant_gain(entry, "none") and beats_bias and _balanced(entry)


def _beats_draws(gain: float, draws: dict[str, Any] | None, p: float | None) -> bool:
    """A gain beyond a control of draws (the random null, or `shuffled`): p < LEVEL and above
    the draws' 95th percentile; never without draws."""
    if not draws or not draws.get("gains") or p is None:
        return False
    return p < LEVEL and gain > draws["p95"]


def comparison_count(metrics: dict[str, Any]) -> int:
    """Hypothesis tests behind the conclusion: per steered method vs none, none+bias (where
    it applies), the null (where there is one) and none's macro-F1 (where answers are
    classes)."""
    per_method = 1 + (NONE_BIAS in metrics["methods"]) + bool((metrics.get("null") or {}).get("k"))
    per_method += _has_classes(metrics)
    conditioned = [metrics["methods"][m] for m in steered_methods(metrics)]
    extra = sum(
        bool(e.get(SHUFFLED)) + ("vs_target_conditioned" in e) for e in conditioned if "reader" in e
    )
    return per_method * len(steered_methods(metrics)) + extra


def collapsed_methods(metrics: dict[str, Any]) -> list[str]:
    return [m for m in steered_methods(metrics) if metrics["methods"][m].get("collapsed")]


def conclusion(metrics: dict[str, Any]) -> str:
    """One line: which steered methods beat none, none+bias and the null (p < LEVEL), on a
    balanced view where answers are classes."""
    task = metrics["task"]
    if metrics.get("one_class_test"):
        return (
            f"{task}: every test item has the same gold label, so no gain can be judged "
            "(a constant answer would score 100%)."
        )
    controls = (
        "none, none+bias and the random null"
        if NONE_BIAS in metrics["methods"]
        else ("none and the random null (none+bias does not apply: no option scores)")
    )
    balanced = (
        ", without collapsing and with macro-F1 not significantly below none"
        if _has_classes(metrics)
        else ""
    )
    null = metrics.get("null") or {}
    k = int(null.get("k") or 0)
    shuffled = [m for m in steered_methods(metrics) if metrics["methods"][m].get(SHUFFLED)]
    if k == 0 and not shuffled:
        return f"{task}: no null distribution (K = 0), so no method can be called a gain."
    if shuffled:
        controls += "; conditioned methods also shuffled (and the target's own reading)"
    winners = [m for m in steered_methods(metrics) if helps(metrics, m)]
    if winners:
        verb = "beats" if len(winners) == 1 else "beat"
        line = f"{task}: {', '.join(winners)} {verb} {controls} (p < {LEVEL:g} each){balanced}."
    else:
        line = f"{task}: no steered method beats {controls} (p < {LEVEL:g} each){balanced}."
    own = metrics["methods"].get(TARGET_READING)
    if own is not None and _beats_plain_controls(metrics, own):
        # A control, never a gain of the expert's; said so that "no method" is not misread.
        line += (
            f" The control {TARGET_READING} (the target steered by its own reading: what the "
            f"target already knows) beats none and none+bias (p < {LEVEL:g} each{balanced})."
        )
    fallen = collapsed_methods(metrics)
    if fallen:
        line += f" Collapsed (one answer for nearly every test item): {', '.join(fallen)}."
    if not winners and k and smallest_null_p(k) >= LEVEL:
        line += (
            f" With K = {k} null draws the smallest attainable p vs the null is "
            f"{smallest_null_p(k):.2f}: this run cannot show a gain over noise "
            f"(K >= {math.ceil(1 / LEVEL)} needed)."
        )
    return line
