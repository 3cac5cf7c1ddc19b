"""The controls every steering claim is measured against: the random-vector null distribution,
the threshold-only `none+bias`, instruction-bearing calibration prompts, p-values and the
report's conclusion line."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.task_examples import TaskExamplesDataModule
from expertsteer.artifacts import METRICS_FILE, STEERING_FILE
from expertsteer.evaluation.choice import ChoiceConfig
from expertsteer.evaluation.controls import (
    comparison_count,
    conclusion,
    fit_offsets,
    helps,
    null_summary,
    offset_predictions,
)
from expertsteer.evaluation.evaluate import ScoringConfig
from expertsteer.evaluation.report import NULL_FIGURE, REPORT_FILE
from expertsteer.evaluation.stats import empirical_p, paired_bootstrap_ci, paired_bootstrap_p
from expertsteer.method.extractors import random_direction, random_unit_vectors
from expertsteer.method.vectors import load_steering
from lightning_modules.evaluator import SteeringEvaluator, choose_setting
from lightning_modules.steer import SteeringModule
from lightning_modules.vectors import VectorsModule
from tests.tiny_data import prepared, tiny_datamodule
from tests.tiny_task import review_task, target_steering


@pytest.fixture(scope="module")
def paired(tiny_dirs, tmp_path_factory):
    """Tiny paired activations (target 48-d x 3 layers) with labels."""
    return prepared(tiny_datamodule(tiny_dirs, tmp_path_factory.mktemp("cache")))


# -- the random method is a label-free control ------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_method_is_not_flipped_to_agree_with_the_labels(paired, tmp_path, seed):
    module = VectorsModule(method="random", source="target", pairs=[[0, 1]], seed=seed)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=paired)
    vector = load_steering(tmp_path / STEERING_FILE).vectors[1].double()
    drawn = random_direction(torch.zeros(1, 48, dtype=torch.float64), None, seed=seed)
    torch.testing.assert_close(vector, drawn, atol=1e-6, rtol=0)


def test_random_unit_vectors_are_seeded_unit_and_prefix_stable():
    rows = random_unit_vectors(5, 48, seed=7)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(random_unit_vectors(3, 48, seed=7), rows[:3])
    assert not torch.allclose(random_unit_vectors(5, 48, seed=8), rows)
    with pytest.raises(ValueError, match="count and dim"):
        random_unit_vectors(0, 48, seed=0)


# -- none+bias ----------------------------------------------------------------------------------


def _two_class_scores(offset: float, n: int = 600, seed: int = 0):
    """Calibrated 2-option log-scores whose class-1 log-odds carry a known bias `-offset`:
    the latent evidence is symmetric about 0, so the best threshold sits at `offset`."""
    generator = torch.Generator().manual_seed(seed)
    gold = torch.arange(n) % 2
    evidence = (2.0 * gold - 1.0) + torch.randn(n, generator=generator, dtype=torch.float64)
    scores = torch.stack([torch.zeros(n, dtype=torch.float64), evidence - offset], dim=1)
    return torch.log_softmax(scores, dim=1), gold


@pytest.mark.parametrize("offset", [-1.5, 0.8, 2.0])
def test_none_bias_recovers_a_known_offset_on_dev(offset):
    scores, gold = _two_class_scores(offset)
    rule = fit_offsets(scores, gold, budget=9)
    offsets = rule.offsets
    assert offsets[0] == 0.0 and rule.constant is None
    # Nine quantile cuts: the one at half the items lies within sampling noise of the truth.
    assert abs(float(offsets[1]) - offset) < 0.25
    tuned = float((offset_predictions(scores, offsets) == gold).double().mean())
    untuned = float((scores.argmax(1) == gold).double().mean())
    assert tuned > untuned + 0.05 and tuned > 0.8  # Bayes accuracy here: Phi(1) = 0.84


def test_none_bias_keeps_no_offset_when_the_threshold_is_already_right():
    scores, gold = _two_class_scores(0.0)
    offsets = fit_offsets(scores, gold, budget=8).offsets
    accuracy = float((offset_predictions(scores, offsets) == gold).double().mean())
    assert accuracy >= float((scores.argmax(1) == gold).double().mean())
    assert abs(float(offsets[1])) < 0.3


def test_none_bias_per_class_coordinate_search_for_three_classes():
    generator = torch.Generator().manual_seed(1)
    n = 900
    gold = torch.arange(n) % 3
    logits = 2.0 * torch.nn.functional.one_hot(gold, 3).double()
    logits += torch.randn(n, 3, generator=generator, dtype=torch.float64)
    hidden = torch.tensor([0.0, -1.0, -2.5], dtype=torch.float64)  # a habit for class 0
    scores = torch.log_softmax(logits + hidden, dim=1)
    offsets = fit_offsets(scores, gold, budget=30).offsets
    tuned = float((offset_predictions(scores, offsets) == gold).double().mean())
    untuned = float((scores.argmax(1) == gold).double().mean())
    assert tuned > untuned + 0.15
    assert float(offsets[2]) > float(offsets[1]) > 0  # the more suppressed class gets more


def test_none_bias_budget_bounds_the_candidates_and_errors_are_named():
    scores, gold = _two_class_scores(1.0, n=50)
    calls = []
    original = offset_predictions

    def counting(scores, offsets):
        calls.append(offsets)
        return original(scores, offsets)

    import expertsteer.evaluation.controls as controls

    controls.offset_predictions = counting
    try:
        rule = controls.fit_offsets(scores, gold, budget=4)
    finally:
        controls.offset_predictions = original
    # The incumbent (no offset) + the budget of offsets; the two constant rules use no offsets.
    assert len(calls) <= 1 + 4
    assert rule.candidates <= 4 + 2
    with pytest.raises(ValueError, match="budget"):
        fit_offsets(scores, gold, budget=0)
    with pytest.raises(ValueError, match="one gold label per row"):
        fit_offsets(scores, gold[:-1], budget=4)


# -- p-values -----------------------------------------------------------------------------------


def test_paired_bootstrap_p_agrees_with_the_paired_interval():
    generator = torch.Generator().manual_seed(0)
    base = (torch.rand(200, generator=generator) < 0.5).double()
    better = base.clone()
    better[:40] = 1.0
    same = paired_bootstrap_p(base, base.clone())
    assert same == 1.0
    p = paired_bootstrap_p(better, base)
    _, low, _ = paired_bootstrap_ci(better, base)
    assert p < 0.05 and low > 0
    noisy = base.clone()
    noisy[:6] = 1 - noisy[:6]
    p_noisy = paired_bootstrap_p(noisy, base)
    _, low, high = paired_bootstrap_ci(noisy, base)
    assert p_noisy > 0.05 and low <= 0 <= high
    assert paired_bootstrap_p(base, better) == p  # two-sided


def test_empirical_p_counts_ties_against_the_method():
    assert empirical_p(0.10, [0.0, 0.02, 0.05]) == pytest.approx(1 / 4)
    assert empirical_p(0.05, [0.0, 0.02, 0.05]) == pytest.approx(2 / 4)
    assert empirical_p(-1.0, [0.0, 0.02, 0.05]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no null draws"):
        empirical_p(0.1, [])


# -- the conclusion line ------------------------------------------------------------------------


def _synthetic_metrics(gain, p_none, p_bias, null_gains, bias=True):
    null = {"k": len(null_gains), "gains": null_gains, **null_summary(null_gains)}
    entry = {
        "vs_none": {"difference": gain, "low": gain - 0.05, "high": gain + 0.05},
        "p_vs_none": p_none,
        "vs_none_bias": {"difference": gain - 0.01, "low": 0.0, "high": 0.1} if bias else None,
        "p_vs_none_bias": p_bias if bias else None,
        "p_vs_null": empirical_p(gain, null_gains),
    }
    methods = {"none": {}, "expertsteer": entry}
    if bias:
        methods["none+bias"] = {}
    return {"task": "sst2", "methods": methods, "null": null}


def test_a_method_inside_the_null_range_is_not_called_a_gain():
    null = [0.01 * i for i in range(-5, 20)]  # 25 draws, max +0.19
    metrics = _synthetic_metrics(0.12, p_none=0.001, p_bias=0.001, null_gains=null)
    assert not helps(metrics, "expertsteer")
    line = conclusion(metrics)
    assert "no steered method beats" in line and "expertsteer" not in line
    metrics = _synthetic_metrics(0.25, p_none=0.001, p_bias=0.001, null_gains=null)
    assert helps(metrics, "expertsteer")
    assert conclusion(metrics).startswith("sst2: expertsteer beats none, none+bias")


def test_each_control_can_veto_a_gain():
    null = [0.0] * 24
    assert helps(_synthetic_metrics(0.2, 0.01, 0.01, null), "expertsteer")
    assert not helps(_synthetic_metrics(0.2, 0.2, 0.01, null), "expertsteer")
    assert not helps(_synthetic_metrics(0.2, 0.01, 0.2, null), "expertsteer")
    assert helps(_synthetic_metrics(0.2, 0.01, None, null, bias=False), "expertsteer")
    assert not helps(_synthetic_metrics(-0.2, 0.01, 0.01, null), "expertsteer")


def test_a_null_too_small_for_significance_is_said_so():
    metrics = _synthetic_metrics(0.3, 0.001, 0.001, [0.0, 0.01, 0.02, 0.0, -0.01, 0.03])
    assert not helps(metrics, "expertsteer")  # smallest p is 1/7
    assert "K = 6" in conclusion(metrics) and "K >= 20 needed" in conclusion(metrics)
    metrics["null"] = None
    assert "K = 0" in conclusion(metrics)
    assert comparison_count(_synthetic_metrics(0.3, 0.01, 0.01, [0.0])) == 3
    assert comparison_count(_synthetic_metrics(0.3, 0.01, None, [0.0], bias=False)) == 2


# -- dev choice ---------------------------------------------------------------------------------


def test_choose_setting_tie_rules():
    accuracies = {((1,), -0.3): 0.6, ((1,), 0.3): 0.6, ((1,), 0.9): 0.6, ((1,), -0.1): 0.5}
    assert choose_setting(accuracies, [(1,)]) == ((1,), 0.3)  # smaller |alpha|, then positive
    accuracies[((1,), -0.9)] = 0.7
    assert choose_setting(accuracies, [(1,)]) == ((1,), -0.9)  # accuracy first
    layered = {((1, 2), 0.1): 0.5, ((2,), 0.1): 0.5}
    assert choose_setting(layered, [(1, 2), (1,), (2,)]) == ((1, 2), 0.1)


# -- the evaluator with both controls, on a tiny option-scored task ------------------------------

NULL_K = 3
ALPHAS = [-2.0, 2.0]


def _method(run_dir: Path, name: str, target: str, task: str, seed: int) -> str:
    """A steering artifact for the tiny target's block 1 (48-d)."""
    return target_steering(run_dir / "methods" / name / STEERING_FILE, target, task, seed, 40.0)


def _evaluate(tiny_dirs, tmp_path, labels, name="tiny_reviews", share_forwards=True):
    target = str(tiny_dirs["target"])
    run_dir = tmp_path / "run"
    task = review_task(tmp_path, name, labels)
    module = SteeringModule(
        target=target,
        expert=None,
        methods={
            "expertsteer": _method(run_dir, "expertsteer", target, name, 11),
            "target_mean_diff": _method(run_dir, "target_mean_diff", target, name, 12),
        },
        run_dir=str(run_dir),
        scoring=ScoringConfig(
            batch_size=8, null_k=NULL_K, share_forwards=share_forwards, config_batch=3
        ),
        null_seed=5,
    )
    data = TaskExamplesDataModule(task=str(task), steer_size=4, dev_size=10, test_size=10)
    evaluator = SteeringEvaluator(ChoiceConfig(alphas=ALPHAS, num_samples=0, n_boot=200))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[evaluator],
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(module, datamodule=data)
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    # logged figures are named by the split they come from
    logged = trainer.callback_metrics
    for split in ("dev", "test"):
        value = float(logged[f"{split}/{name}/expertsteer/acc"])
        assert value == pytest.approx(metrics["methods"]["expertsteer"][split]["accuracy"])
    assert not any(key.startswith("val/") for key in logged)
    return module, evaluator, metrics, run_dir


@pytest.fixture(scope="module")
def evaluated(tiny_dirs, tmp_path_factory):
    labels = [i % 2 for i in range(24)]
    return _evaluate(tiny_dirs, tmp_path_factory.mktemp("eval"), labels)


def test_null_draws_go_through_the_same_dev_choice_as_the_methods(evaluated):
    module, evaluator, metrics, _ = evaluated
    assert module.null_names == [f"null/{k}" for k in range(NULL_K)]
    dev_grid: dict[str, set] = {}
    for split, name, alpha, layers in evaluator.records:
        if split == "dev" and name not in ("none", "expert"):
            dev_grid.setdefault(name, set()).add((layers, alpha))
    # Every method and every null draw was scored on the same signed grid ...
    expected = {((1,), alpha) for alpha in ALPHAS}
    assert set(dev_grid) == set(module.steered_names)
    assert all(grid == expected for grid in dev_grid.values())
    # ... and chosen by the same rule from its dev accuracies.
    for name in module.steered_names:
        accuracies = {
            (layers, alpha): sum(r["correct"] for r in items.values()) / len(items)
            for (split, n, alpha, layers), items in evaluator.records.items()
            if split == "dev" and n == name
        }
        assert evaluator.chosen[name] == choose_setting(accuracies, [(1,)])
    null = metrics["null"]
    assert null["k"] == NULL_K and len(null["gains"]) == NULL_K and null["seed"] == 5
    assert null["reference"] == "expertsteer"
    assert all(alpha in ALPHAS for alpha in null["alphas"])
    assert null["median"] == pytest.approx(float(torch.tensor(null["gains"]).quantile(0.5)))
    none = metrics["methods"]["none"]["test"]["accuracy"]
    for name, gain in zip(module.null_names, null["gains"], strict=True):
        layers, alpha = evaluator.chosen[name]
        items = evaluator.records[("test", name, alpha, layers)]
        accuracy = sum(r["correct"] for r in items.values()) / len(items)
        assert gain == pytest.approx(accuracy - none)


def test_null_draws_are_random_unit_vectors_with_the_reference_scales(evaluated):
    module, *_ = evaluated
    reference = module.steering["expertsteer"]
    vectors = torch.stack([module.steering[name].vectors[1] for name in module.null_names])
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(NULL_K))
    torch.testing.assert_close(
        vectors.double(), random_unit_vectors(NULL_K, 48, 5).float().double()
    )
    assert all(module.steering[n].norm_scale == reference.norm_scale for n in module.null_names)


def test_null_draws_do_not_depend_on_the_labels(evaluated, tiny_dirs, tmp_path):
    module, *_ = evaluated
    shuffled = [1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 1, 0] * 2
    other, *_ = _evaluate(tiny_dirs, tmp_path, shuffled)
    for name in module.null_names:
        torch.testing.assert_close(
            other.steering[name].vectors[1], module.steering[name].vectors[1]
        )


def test_metrics_carry_both_controls_and_every_method_figure(evaluated):
    _, _, metrics, run_dir = evaluated
    methods = metrics["methods"]
    assert list(methods)[:2] == ["none", "none+bias"]
    bias = methods["none+bias"]
    assert len(bias["offsets"]) == 2 and bias["offsets"][0] == 0.0
    # One target layer per method: the largest dev search is the alpha grid.
    assert bias["budget"] == len(ALPHAS) and "p_vs_none" in bias and "constant" in bias
    assert metrics["none_bias"]["applicable"] is True
    assert metrics["none_bias"]["constant_classes"] == [0, 1]
    assert metrics["none_bias"]["candidates"] <= len(ALPHAS) + 2
    environment = metrics["environment"]
    # tests/tiny_task.py writes its artifacts by hand, without a capture dtype.
    assert environment["capture_dtype"] == ["unknown"] and environment["scoring_dtype"]
    assert environment["threads"] >= 1 and environment["device"] == "cpu"
    assert metrics["conclusion"]["metrics"] == ["accuracy", "macro_f1"]
    assert metrics["one_class_test"] is False
    for name in ("none", "none+bias", "expertsteer", "target_mean_diff"):
        entry = methods[name]
        assert 0.0 <= entry["macro_f1"] <= 1.0 and 0.5 <= entry["habit_rate"] <= 1.0
        for figure in ("macro_f1", "habit_rate"):
            low, high = entry[f"{figure}_ci"]
            assert low <= entry[figure] <= high
        assert sum(entry["predicted_share"].values()) == pytest.approx(1.0)
    for name in ("expertsteer", "target_mean_diff"):
        entry = methods[name]
        assert entry["collapsed"] in (True, False)
        assert 0.0 < entry["p_vs_none_macro_f1"] <= 1.0
        assert entry["vs_none_macro_f1"]["difference"] == pytest.approx(
            entry["macro_f1"] - methods["none"]["macro_f1"]
        )
        assert entry["alpha"] in ALPHAS
        for key in ("p_vs_none", "p_vs_none_bias", "p_vs_null"):
            assert 0.0 < entry[key] <= 1.0
        gain = entry["vs_none"]["difference"]
        assert entry["p_vs_null"] == pytest.approx(empirical_p(gain, metrics["null"]["gains"]))
    assert not any(name.startswith("null/") for name in methods)
    assert set(metrics["test_items"]) == {"none", "none+bias", "expertsteer", "target_mean_diff"}
    assert metrics["comparisons"]["count"] == 2 * 4
    assert metrics["conclusion"]["text"].startswith("tiny_reviews:")
    report = (run_dir / REPORT_FILE).read_text()
    assert "**Conclusion**" in report and "8 comparisons" in report
    assert "Environment: torch" in report
    assert (run_dir / NULL_FIGURE).is_file() and NULL_FIGURE in report


def test_reserved_names_and_bad_null_settings_are_refused():
    with pytest.raises(ValueError, match="reserved"):
        SteeringModule(methods={"none+bias": "x.safetensors"})
    with pytest.raises(ValueError, match="reserved"):
        SteeringModule(methods={"null/0": "x.safetensors"})
    with pytest.raises(ValueError, match="null_k"):
        SteeringModule(methods={"a": "x.safetensors"}, scoring={"null_k": -1})
    with pytest.raises(ValueError, match="null_reference"):
        SteeringModule(methods={"a": "x.safetensors"}, null_reference="b")


def test_shared_forwards_give_the_records_of_one_forward_per_configuration(
    evaluated, tiny_dirs, tmp_path
):
    """The evaluation stage's steered grid from shared forwards (the default) scores every
    (split, method, alpha, layers) like one full nnsight forward per configuration."""
    _, shared, _, _ = evaluated
    labels = [i % 2 for i in range(24)]
    _, separate, _, _ = _evaluate(tiny_dirs, tmp_path, labels, share_forwards=False)
    assert shared.records.keys() == separate.records.keys()
    assert len(shared.records) > 2 + 3 * len(ALPHAS)  # dev grid and test choices were scored
    for key, items in separate.records.items():
        for item_id, record in items.items():
            other = shared.records[key][item_id]
            assert other["correct"] == record["correct"], (key, item_id)
            assert other["prediction"] == record["prediction"], (key, item_id)
            torch.testing.assert_close(
                torch.tensor(other["scores"]), torch.tensor(record["scores"]), rtol=0, atol=1e-5
            )
