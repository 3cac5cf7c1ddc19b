"""The threshold control can do what a collapse does, and a verdict must hold on a balanced view:
constant predictors in `none+bias`, the `collapsed` flag, the paired macro-F1 check, a one-class
test set, and the run's recorded environment."""

from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

from expertsteer.environment import _cpuinfo, describe_environment, environment, native_bfloat16
from expertsteer.evaluation.controls import (
    collapsed,
    comparison_count,
    conclusion,
    fit_offsets,
    helps,
    null_summary,
    verdict_metrics,
)
from expertsteer.evaluation.report import summary_table
from expertsteer.evaluation.stats import macro_f1, paired_macro_f1

# -- none+bias can predict a constant class -----------------------------------------------------


def _majority_scores(n: int = 200, majority: int = 1, share: float = 0.8, seed: int = 0):
    """3-class calibrated scores that carry no information about the gold class, with a habit
    towards class 0, and gold labels of which `share` are `majority`: the best dev rule is
    "always `majority`", which quantile offsets never reach."""
    generator = torch.Generator().manual_seed(seed)
    gold = torch.full((n,), majority)
    others = [k for k in range(3) if k != majority]
    rest = torch.randint(2, (n,), generator=generator)
    minority = torch.rand(n, generator=generator) >= share
    gold[minority] = torch.tensor(others)[rest[minority]]
    logits = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    logits[:, 0] += 1.0
    return torch.log_softmax(logits, dim=1), gold


@pytest.mark.parametrize("majority", [0, 1, 2])
def test_none_bias_picks_always_class_k_when_that_is_the_best_dev_rule(majority):
    scores, gold = _majority_scores(majority=majority)
    rule = fit_offsets(scores, gold, budget=4)
    assert rule.constant == majority
    assert torch.equal(rule.predict(scores), torch.full((len(gold),), majority))
    share = float((gold == majority).double().mean())
    assert float((rule.predict(scores) == gold).double().mean()) == pytest.approx(share)
    # The offset search alone (constants aside) stays below the constant rule here.
    offsets_only = float(((scores + rule.offsets).argmax(1) == gold).double().mean())
    assert offsets_only < share
    assert rule.candidates == 4 + 3


def test_none_bias_keeps_offsets_when_no_constant_is_strictly_better():
    generator = torch.Generator().manual_seed(3)
    gold = torch.arange(300) % 2
    evidence = (2.0 * gold - 1.0) + torch.randn(300, generator=generator, dtype=torch.float64)
    scores = torch.log_softmax(torch.stack([torch.zeros(300).double(), evidence], 1), 1)
    rule = fit_offsets(scores, gold, budget=6)
    assert rule.constant is None
    assert torch.equal(rule.predict(scores), (scores + rule.offsets).argmax(1))


# -- collapsed ----------------------------------------------------------------------------------


def test_collapsed_needs_a_habit_and_gold_labels_that_are_not_lopsided():
    balanced = [0, 1, 2] * 10
    assert collapsed(0.95, balanced) and collapsed(1.0, balanced)
    assert not collapsed(0.94, balanced)
    lopsided = [1] * 28 + [0, 2]  # majority 0.93: answering it always is no collapse
    assert not collapsed(1.0, lopsided)
    with pytest.raises(ValueError, match="no gold"):
        collapsed(1.0, [])


# -- macro-F1, paired -------------------------------------------------------------------------


def _numpy_macro_f1(preds: np.ndarray, gold: np.ndarray, classes: int) -> float:
    scores = []
    for k in range(classes):
        tp = np.sum((preds == k) & (gold == k))
        denominator = np.sum(preds == k) + np.sum(gold == k)
        if denominator:
            scores.append(2 * tp / denominator)
    return float(np.mean(scores))


def test_paired_macro_f1_difference_interval_and_p():
    generator = torch.Generator().manual_seed(0)
    gold = torch.randint(3, (300,), generator=generator)
    good = torch.where(torch.rand(300, generator=generator) < 0.7, gold, (gold + 1) % 3)
    collapse = torch.zeros(300, dtype=torch.long)
    difference, low, high, p = paired_macro_f1(collapse, good, gold, 3)
    expected = _numpy_macro_f1(collapse.numpy(), gold.numpy(), 3) - _numpy_macro_f1(
        good.numpy(), gold.numpy(), 3
    )
    assert difference == pytest.approx(expected, abs=1e-12)
    assert difference == pytest.approx(macro_f1(collapse, gold, 3) - macro_f1(good, gold, 3))
    assert low <= difference <= high < 0 and p < 0.01
    same = paired_macro_f1(good, good.clone(), gold, 3)
    assert same[0] == 0.0 and same[3] == 1.0


# -- the verdict ------------------------------------------------------------------------------


def _entry(gain, p, f1_difference, f1_p, habit, collapsed_flag):
    return {
        "test": {"accuracy": 0.65 + gain, "low": 0.6, "high": 0.9, "n": 200},
        "dev": {"accuracy": 0.7},
        "vs_none": {"difference": gain, "low": gain - 0.05, "high": gain + 0.05},
        "p_vs_none": p,
        "vs_none_bias": {"difference": gain, "low": gain - 0.05, "high": gain + 0.05},
        "p_vs_none_bias": p,
        "p_vs_null": 1 / 25,
        "macro_f1": 0.26,
        "macro_f1_ci": [0.2, 0.3],
        "vs_none_macro_f1": {"difference": f1_difference, "low": -0.1, "high": 0.1},
        "p_vs_none_macro_f1": f1_p,
        "habit_rate": habit,
        "habit_rate_ci": [habit - 0.01, habit],
        "collapsed": collapsed_flag,
        "alpha": 0.9,
        "layers": [7],
        "source": "expert",
        "extractor": "rfm",
    }


def _collapse_metrics():
    """The held-out task the issue measured: a method answers the majority class for every
    item, gains +19 points on accuracy at p 0.001 against none and none+bias, beats the null,
    and lowers macro-F1."""
    null = [0.0] * 24
    base = {
        "test": {"accuracy": 0.46, "low": 0.4, "high": 0.5, "n": 200},
        "dev": {"accuracy": 0.45},
        "macro_f1": 0.29,
        "macro_f1_ci": [0.25, 0.33],
        "habit_rate": 0.5,
        "habit_rate_ci": [0.45, 0.55],
    }
    return {
        "task": "held_out",
        "null": {"k": 24, "gains": null, **null_summary(null)},
        "methods": {
            "none": base,
            "none+bias": dict(base),
            "collapsing": _entry(0.19, 0.001, -0.03, 0.01, 1.0, True),
            "honest": _entry(0.19, 0.001, 0.05, 0.2, 0.6, False),
            "unbalanced": _entry(0.19, 0.001, -0.08, 0.001, 0.8, False),
        },
    }


def test_a_collapsed_method_that_beats_none_on_accuracy_is_not_a_gain():
    metrics = _collapse_metrics()
    assert not helps(metrics, "collapsing")
    assert not helps(metrics, "unbalanced")  # macro-F1 significantly below none
    assert helps(metrics, "honest")
    assert verdict_metrics(metrics) == ["accuracy", "macro_f1"]
    line = conclusion(metrics)
    assert line.startswith("held_out: honest beats none, none+bias and the random null")
    assert "macro-F1 not significantly below none" in line
    assert "Collapsed (one answer for nearly every test item): collapsing." in line
    assert comparison_count(metrics) == 3 * 4
    table = summary_table(metrics)
    row = next(line for line in table.splitlines() if line.startswith("| collapsing |"))
    assert "**collapsed**" in row and "-0.03" in row
    assert "**collapsed**" not in next(r for r in table.splitlines() if r.startswith("| honest"))


def test_the_target_reading_itself_is_named_when_it_beats_none_but_is_never_a_gain():
    metrics = _collapse_metrics()
    del metrics["methods"]["honest"]
    own = _entry(0.087, 0.001, 0.08, 0.001, 0.53, False) | {"reader": "target", "shuffled": None}
    expert_read = _entry(-0.05, 0.25, -0.02, 0.4, 0.6, False) | {"reader": "expert"}
    metrics["methods"] |= {"target_conditioned": own, "expert_conditioned": expert_read}
    assert not helps(metrics, "target_conditioned")  # a control: no shuffled draws, no gain
    line = conclusion(metrics)
    assert line.startswith("held_out: no steered method beats")
    assert "The control target_conditioned (the target steered by its own reading" in line
    own["p_vs_none_bias"] = 0.2  # not beyond the threshold control: not mentioned
    assert "The control target_conditioned" not in conclusion(metrics)


def test_a_one_class_test_set_allows_no_verdict():
    metrics = _collapse_metrics()
    metrics["one_class_test"] = True
    assert not any(helps(metrics, m) for m in ("collapsing", "honest", "unbalanced"))
    assert "same gold label" in conclusion(metrics)


# -- environment --------------------------------------------------------------------------------


def test_environment_records_versions_dtypes_threads_and_the_cpu(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse avx512_bf16 amx_tile\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    entry = environment("cpu", 3, ["bfloat16", "bfloat16"], "float32", cpuinfo=cpuinfo)
    assert entry["cpu"] == "Example CPU 9000" and entry["cpu_native_bfloat16"] is True
    assert entry["capture_dtype"] == ["bfloat16"] and entry["scoring_dtype"] == "float32"
    assert entry["threads"] == torch.get_num_threads() and entry["seed"] == 3
    assert entry["versions"]["torch"] == version("torch") and "nnsight" in entry["versions"]
    assert entry["device"] == "cpu"
    line = describe_environment(entry)
    assert "capture bfloat16, scoring float32" in line and "native bfloat16" in line
    assert not native_bfloat16({"fpu", "avx2"})
    missing = environment("cpu", 0, [], "float32", cpuinfo=tmp_path / "absent")
    assert missing["capture_dtype"] == ["unknown"] and missing["cpu"]
    assert _cpuinfo(tmp_path / "absent")[1] == set()
