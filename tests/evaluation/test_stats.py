"""Accuracy, macro-F1, habit-rate intervals, bootstrap intervals and the gap closed, against hand
counts, plain per-resample figures and the width of a proportion's interval."""

import math

import numpy as np
import pytest
import torch

from expertsteer.evaluation.answers import habit_rate
from expertsteer.evaluation.stats import (
    _resampled_indices,
    accuracy,
    bootstrap_ci,
    bootstrap_means,
    gap_closed,
    habit_rate_ci,
    macro_f1,
    macro_f1_ci,
    paired_bootstrap_ci,
)


def test_macro_f1_and_accuracy_against_hand_counts():
    preds = torch.tensor([0, 0, 1, -1])
    target = torch.tensor([0, 1, 1, 1])
    assert accuracy(preds, target, 2) == 0.5
    # class 0: P 1/2, R 1 -> 2/3; class 1: P 1, R 1/3 -> 1/2; the absent class 2 is left out.
    for classes in (2, 3):
        assert math.isclose(macro_f1(preds, target, classes), (2 / 3 + 1 / 2) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="target labels must lie in 0..1"):
        accuracy(preds, torch.tensor([0, 1, 2, 0]), 2)


def test_macro_f1_and_habit_intervals_resample_like_the_plain_figures():
    rng = np.random.default_rng(0)
    target = torch.tensor(rng.integers(0, 3, 60))
    preds = torch.where(
        torch.tensor(rng.random(60) < 0.6), target, torch.tensor(rng.integers(-1, 3, 60))
    )
    f1, low, high = macro_f1_ci(preds, target, 3, n_boot=50, seed=4)
    assert f1 == macro_f1(preds, target, 3) and low < f1 < high
    # The vectorised resamples equal the plain figures computed on each resampled item set.
    index_rows = next(_resampled_indices(60, 50, 4))
    plain = torch.tensor([macro_f1(preds[idx], target[idx], 3) for idx in index_rows])
    assert (low, high) == pytest.approx(
        torch.quantile(plain.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    )
    answers = [None if p < 0 else int(p) for p in preds]
    rate, low, high = habit_rate_ci(preds, n_boot=50, seed=4)
    assert rate == habit_rate(answers) and low <= rate <= high
    plain = torch.tensor([habit_rate([answers[i] for i in idx]) for idx in index_rows.tolist()])
    assert (low, high) == pytest.approx(
        torch.quantile(plain.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    )
    assert habit_rate_ci(torch.full((5,), -1), n_boot=10)[0] == 0.0
    with pytest.raises(ValueError, match="codes must be >= 0"):
        habit_rate_ci(torch.tensor([0, -2]))


def test_bootstrap_ci_sanity():
    rng = np.random.default_rng(0)
    correct = torch.tensor(rng.random(300) < 0.6)
    mean, low, high = bootstrap_ci(correct)
    assert mean == correct.double().mean().item() and low < mean < high
    assert bootstrap_ci(correct, seed=0) == (mean, low, high)
    assert bootstrap_ci(correct, seed=1) != (mean, low, high)
    # Width of a proportion's 95% interval: about 2 * 1.96 * sqrt(p (1 - p) / n).
    widths = {}
    for n in (100, 1600):
        half = torch.arange(n) % 2 == 0
        _, low, high = bootstrap_ci(half)
        widths[n] = high - low
        assert abs(widths[n] - 2 * 1.96 * math.sqrt(0.25 / n)) < 0.15 * widths[n]
    assert 3.3 < widths[100] / widths[1600] < 4.7
    assert bootstrap_ci(torch.ones(50, dtype=torch.bool)) == (1.0, 1.0, 1.0)
    assert bootstrap_ci(torch.zeros(50)) == (0.0, 0.0, 0.0)


def test_bootstrap_means_are_chunk_independent_in_shape_and_seeded():
    values = torch.rand(10)
    means = bootstrap_means(values, n_boot=37, seed=3)
    assert means.shape == (37,)
    assert torch.equal(means, bootstrap_means(values, n_boot=37, seed=3))
    assert values.min() <= means.min() and means.max() <= values.max()


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    a = torch.tensor(rng.random(400) < 0.5)
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0, 0.0)
    b = a.clone()
    flip = torch.tensor(rng.choice(400, size=40, replace=False))
    b[flip] = ~b[flip]  # b agrees with a on 90% of the items: strongly correlated
    diff, low, high = paired_bootstrap_ci(a, b)
    assert math.isclose(diff, a.double().mean().item() - b.double().mean().item(), abs_tol=1e-12)
    assert low <= diff <= high
    # Unpaired: independent resamples of the two vectors.
    unpaired = bootstrap_means(a, seed=10) - bootstrap_means(b, seed=11)
    u_low, u_high = torch.quantile(unpaired, torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert high - low < 0.5 * float(u_high - u_low)
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_ci(a, b[:10])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        bootstrap_ci(torch.tensor([]))
    with pytest.raises(ValueError, match="level must lie strictly between"):
        bootstrap_ci(a, level=1.0)


def test_gap_closed():
    assert math.isclose(gap_closed(0.6, 0.5, 0.7), 0.5)
    assert math.isclose(gap_closed(0.45, 0.5, 0.7), -0.25)
    assert gap_closed(0.6, 0.5, 0.5) is None  # no gap to close
    assert gap_closed(0.6, 0.5, 0.4) is None  # the expert is worse: nothing to transfer
