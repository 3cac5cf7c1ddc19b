"""`SteeringEvaluator`: the callback that steers during `validate` and writes the report.

Dev batches (dataloader 0): every steered configuration — each method and each draw of the
random null (`SteeringModule.steered_names`) x target-layer set x alpha of the signed grid — is
scored on the batch, beside the unsteered target and the expert (the `SteeringModule`'s own
step). Before the first test batch (dataloader 1) the dev results of all ranks are gathered
and each method's and each null draw's (layers, alpha) is chosen by one rule, `_choose`: best
dev accuracy; ties go to the smaller |alpha|, then to all layers together, then to the positive
sign. Test batches then score each once, at its choice.

At the epoch end the test results are gathered and summarised (`metrics.json`):

* every figure with a 95% bootstrap interval; macro-F1, habit rate and the predicted-class
  shares per method and control;
* `none+bias`: the unsteered target with per-class log-odds offsets on its calibrated option
  scores, or one class for every item, fitted on dev with as many offset candidates as the
  largest dev search of a steered method (alphas x layer sets) plus every constant predictor
  (`expertsteer.evaluation.controls.fit_offsets`) — a moved decision threshold, no forward pass;
  not applicable in generation-scored modes (numeric tasks), which have no option scores;
* `null`: the test gain over `none` of every null draw at its dev choice, with its median and
  95th percentile;
* per steered method: paired interval and two-sided paired-bootstrap p-value against `none`
  and `none+bias`, the one-sided empirical p-value against the null; where answers are classes
  the paired macro-F1 difference to `none` and whether the row is `collapsed`; and the one-line
  conclusion (`expertsteer.evaluation.controls.conclusion`), which names the metrics it requires;
* `environment`: versions, dtypes, threads, CPU and device (`expertsteer.environment`).

`val/<task>/<method>/acc` is logged, and rank 0 writes `metrics.json`, `report.md` and the
figures into the run directory.

Under DDP every rank scores its shard of each split; duplicates a padded sampler adds are
dropped by example id when results are gathered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from expertsteer.artifacts import METRICS_FILE, save_json
from expertsteer.data.prompts import render_prompt
from expertsteer.data.tasks import Example
from expertsteer.environment import environment
from expertsteer.evaluation.choice import ChoiceConfig
from expertsteer.evaluation.controls import (
    LEVEL,
    NONE_BIAS,
    ThresholdRule,
    collapsed,
    comparison_count,
    conclusion,
    fit_offsets,
    helps,
    null_summary,
    smallest_null_p,
    verdict_metrics,
)
from expertsteer.evaluation.evaluate import EvalResult
from expertsteer.evaluation.report import layers_key, write_report
from expertsteer.evaluation.stats import (
    bootstrap_ci,
    empirical_p,
    gap_closed,
    habit_rate_ci,
    macro_f1_ci,
    paired_bootstrap_ci,
    paired_bootstrap_p,
    paired_macro_f1,
)
from expertsteer.evaluation.transfer import transfer_summary
from expertsteer.method.conditioned import PROBES, SHUFFLED, shuffled_orders
from expertsteer.method.vectors import record_choices
from expertsteer.models.zoo import resolve_dtype
from expertsteer.settings import settings_of
from lightning_modules.steer import EXPERT, NONE, SteeringModule

log = logging.getLogger(__name__)

NO_OPTION_SCORES = (
    "generation-scored task: no option scores to offset; the random null is the control"
)
P_VALUES = (
    "vs none and none+bias (accuracy) and vs none (macro-F1): two-sided paired bootstrap over "
    "test items; vs the null: one-sided empirical (1 + #{null gain >= gain}) / (1 + K)"
)
Key = tuple[str, str, float, tuple[int, ...]]
"""(split, method, alpha, target layers) of one scored configuration."""


def variant(method: str, c_max: float) -> str:
    """Name of a conditioned method's dev configurations at one clip bound."""
    return f"{method}@c_max={c_max:g}"


def shuffled_name(method: str, draw: int) -> str:
    """Name of one permutation of a conditioned method's test coefficients."""
    return f"{method}/{SHUFFLED}/{draw}"


def _item_records(result: EvalResult) -> dict[str, dict[str, Any]]:
    records = {}
    for index, item_id in enumerate(result.ids):
        record = {
            "correct": bool(result.correct[index]),
            "prediction": result.predictions[index],
            "gold": result.gold[index],
        }
        if result.calibrated is not None:
            record["scores"] = result.calibrated[index].tolist()
        if result.generations is not None:
            record["generation"] = result.generations[index]
        records[item_id] = record
    return records


def _gather(records: dict[Key, dict[str, dict]]) -> dict[Key, dict[str, dict]]:
    """Union of every rank's records (padding duplicates collapse onto their id)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return records
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, records)
    merged: dict[Key, dict[str, dict]] = {}
    for part in parts:
        for key, items in part.items():
            merged.setdefault(key, {}).update(items)
    return merged


def _correct(items: dict[str, dict], ids: list[str]) -> torch.Tensor:
    return torch.tensor([items[item_id]["correct"] for item_id in ids], dtype=torch.float64)


def _gain(steered: torch.Tensor, none: torch.Tensor) -> float:
    """Test gain over `none`: the mean paired difference (as `vs_none` reports it)."""
    return float((steered - none).mean())


def _score_matrix(items: dict[str, dict], ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, K]` calibrated option scores (-inf where an item has fewer options) and gold."""
    width = max(len(items[item_id]["scores"]) for item_id in ids)
    scores = torch.full((len(ids), width), float("-inf"), dtype=torch.float64)
    for row, item_id in enumerate(ids):
        values = items[item_id]["scores"]
        scores[row, : len(values)] = torch.tensor(values, dtype=torch.float64)
    gold = torch.tensor([int(items[item_id]["gold"]) for item_id in ids])
    return scores, gold


def _num_classes(task_type: str, items: dict[str, dict]) -> int | None:
    """Option positions / labels of the task (None for numeric answers)."""
    if task_type == "numeric":
        return None
    seen = [int(r["gold"]) for r in items.values()]
    seen += [int(r["prediction"]) for r in items.values() if r["prediction"] is not None]
    widths = [len(r["scores"]) for r in items.values() if "scores" in r]
    return max(seen + [w - 1 for w in widths]) + 1


def _predictions(items: dict[str, dict], ids: list[str]) -> list[Any]:
    return [items[item_id]["prediction"] for item_id in ids]


def _class_metrics(
    predictions: list[Any], gold: list[int | float], classes: int | None, **boot: int
) -> dict[str, Any]:
    """Macro-F1, habit rate (each with a 95% bootstrap interval over items) and predicted-class
    shares of test predictions (numeric tasks, `classes` None: the habit rate alone — the share
    of the most common number)."""
    distinct: dict[Any, int] = {}
    codes = torch.tensor(
        [-1 if p is None else distinct.setdefault(p, len(distinct)) for p in predictions]
    )
    habit, habit_low, habit_high = habit_rate_ci(codes, **boot)
    out: dict[str, Any] = {"habit_rate": habit, "habit_rate_ci": [habit_low, habit_high]}
    if classes is None:
        return out | {"macro_f1": None, "macro_f1_ci": None, "predicted_share": None}
    preds = torch.tensor([-1 if p is None else int(p) for p in predictions])
    target = torch.tensor([int(g) for g in gold])
    counts = torch.bincount(preds[preds >= 0], minlength=classes).tolist()
    f1, f1_low, f1_high = macro_f1_ci(preds, target, num_classes=classes, **boot)
    return out | {
        "macro_f1": f1,
        "macro_f1_ci": [f1_low, f1_high],
        "predicted_share": {str(k): count / len(preds) for k, count in enumerate(counts)},
    }


class _Figures:
    """The gathered records, with what every figure of the summary shares: the sorted dev and
    test ids, the unsteered target's test results and the bootstrap settings."""

    def __init__(self, records: dict[Key, dict], task_type: str, n_boot: int, seed: int) -> None:
        self.records = records
        self.boot = {"n_boot": n_boot, "seed": seed}
        none_items = records[("test", NONE, 0.0, ())]
        self.test_ids = sorted(none_items)
        self.dev_ids = sorted(records[("dev", NONE, 0.0, ())])
        self.none_test = _correct(none_items, self.test_ids)
        self.gold = [none_items[item_id]["gold"] for item_id in self.test_ids]
        self.classes = _num_classes(task_type, none_items)

    def correct(
        self, split: str, name: str, alpha: float = 0.0, layers: tuple[int, ...] = ()
    ) -> torch.Tensor:
        """1.0 / 0.0 per item of `split` (in id order) of one scored configuration."""
        ids = self.test_ids if split == "test" else self.dev_ids
        return _correct(self.records[(split, name, alpha, layers)], ids)

    def test_predictions(
        self, name: str, alpha: float = 0.0, layers: tuple[int, ...] = ()
    ) -> list[Any]:
        return _predictions(self.records[("test", name, alpha, layers)], self.test_ids)

    def summary(self, correct: torch.Tensor) -> dict[str, float]:
        mean, low, high = bootstrap_ci(correct, **self.boot)
        return {"accuracy": mean, "low": low, "high": high, "n": len(correct)}

    def paired(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        mean, low, high = paired_bootstrap_ci(a, b, **self.boot)
        return {"difference": mean, "low": low, "high": high}

    def p_value(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Two-sided paired-bootstrap p-value of `a` against `b`."""
        return paired_bootstrap_p(a, b, **self.boot)

    def class_metrics(self, predictions: list[Any]) -> dict[str, Any]:
        return _class_metrics(predictions, self.gold, self.classes, **self.boot)

    @property
    def one_class(self) -> bool:
        """Whether every test item has the same gold class (no gain can be judged)."""
        return self.classes is not None and len(set(self.gold)) == 1

    def balance(self, predictions: list[Any], habit: float) -> dict[str, Any]:
        """Where answers are classes: the paired macro-F1 difference to `none` (with its
        p-value) and whether the predictions (habit rate `habit`) collapsed onto one answer."""
        if self.classes is None:
            return {}
        steered = torch.tensor([-1 if p is None else int(p) for p in predictions])
        none = torch.tensor([-1 if p is None else int(p) for p in self.test_predictions(NONE)])
        gold = torch.tensor([int(g) for g in self.gold])
        difference, low, high, p = paired_macro_f1(steered, none, gold, self.classes, **self.boot)
        return {
            "vs_none_macro_f1": {"difference": difference, "low": low, "high": high},
            "p_vs_none_macro_f1": p,
            "collapsed": collapsed(habit, [int(g) for g in self.gold]),
        }

    def dev_curves(self, method: str) -> dict[str, dict[str, float]]:
        """Dev accuracy of `method` per target-layer set and alpha, as the grid scored it."""
        curves: dict[str, dict[str, float]] = {}
        for (split, name, alpha, layers), items in self.records.items():
            if split == "dev" and name == method:
                accuracy = float(_correct(items, self.dev_ids).mean())
                curves.setdefault(layers_key(layers), {})[f"{alpha:g}"] = accuracy
        return curves

    def per_item(self, correct: dict[str, torch.Tensor]) -> dict[str, dict[str, bool]]:
        """Name -> test item id -> correct, of each entry's test results."""
        return {
            name: {i: bool(value) for i, value in zip(self.test_ids, vector.tolist(), strict=True)}
            for name, vector in correct.items()
        }


def _baseline_entries(figures: _Figures) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Entries of the unsteered target (`none`) and, where they were scored, the `expert` and
    the readers' own answers (`expert_probe`, `target_probe`); and their per-item test
    results."""
    methods: dict[str, Any] = {}
    correct: dict[str, torch.Tensor] = {}
    scored = [n for n in (EXPERT, *PROBES.values()) if ("test", n, 0.0, ()) in figures.records]
    for name in [NONE, *scored]:
        correct[name] = figures.correct("test", name)
        methods[name] = {
            "test": figures.summary(correct[name]),
            "dev": figures.summary(figures.correct("dev", name)),
            **figures.class_metrics(figures.test_predictions(name)),
        }
    return methods, correct


def choose_setting(
    accuracies: dict[tuple[tuple[int, ...], float], float], layer_order: list[tuple[int, ...]]
) -> tuple[tuple[int, ...], float]:
    """The (layers, alpha) with the best dev accuracy; ties go to the smaller |alpha|, then to
    the earlier layer set of `layer_order` (all layers together first), then to alpha > 0."""
    if not accuracies:
        raise ValueError("no dev results to choose from")
    order = {layers: k for k, layers in enumerate(layer_order)}
    return max(
        accuracies,
        key=lambda s: (accuracies[s], -abs(s[1]), -order.get(s[0], len(order)), s[1]),
    )


class SteeringEvaluator(Callback):
    """Chooses alpha (and layers) per method on dev, scores test once, writes the report."""

    def __init__(
        self,
        choice: ChoiceConfig = ChoiceConfig(),  # noqa: B008 (frozen: one shared default)
        seed: int = 0,
        report: bool = True,
    ) -> None:
        """
        Args:
            choice: The dev grid and the report's extras (`ChoiceConfig`: alphas, as
                fractions of each layer's mean residual norm, signed and non-zero; whether
                each layer is also tried alone; sample generations; bootstrap resamples).
            seed: Bootstrap seed.
            report: Write `metrics.json`, `report.md` and figures (rank 0).
        """
        super().__init__()
        self.choice = settings_of(ChoiceConfig, choice)
        self.alphas = sorted(set(self.choice.alphas), key=lambda a: (abs(a), a))
        self.seed = seed
        self.report = report
        self.records: dict[Key, dict[str, dict]] = {}
        self.chosen: dict[str, tuple[tuple[int, ...], float]] = {}
        self.c_max: dict[str, float] = {}
        self.test_scores: dict[str, dict[str, torch.Tensor]] = {}
        self.test_ids: list[str] = []
        self.test_position: dict[str, int] = {}
        self.orders: list[torch.Tensor] = []
        self.metrics: dict[str, Any] = {}

    # -- scoring -------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, SteeringModule):
            raise TypeError(
                f"SteeringEvaluator needs a SteeringModule, got {type(pl_module).__name__}"
            )
        self.records, self.chosen, self.metrics = {}, {}, {}
        self.c_max, self.test_scores, self.test_ids, self.orders = {}, {}, [], []

    def _store(self, split: str, method: str, alpha: float, layers: tuple, result: Any) -> None:
        self.records.setdefault((split, method, alpha, layers), {}).update(_item_records(result))

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: list[Example],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx == 1 and not self.chosen:
            self._choose(pl_module)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: dict[str, EvalResult],
        batch: list[Example],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        split = ("dev", "test")[dataloader_idx]
        for name, result in outputs.items():
            self._store(split, name, 0.0, (), result)
        scores = self._reader_scores(pl_module, split, batch)
        self._store_probes(pl_module, split, batch, scores)
        configurations = {}
        for method in pl_module.steered_names:
            for name, layers, alpha, c_max in self._grid(pl_module, split, method):
                intervention = pl_module.intervention(
                    method, alpha, layers, scores.get(method), c_max
                )
                configurations[(name, alpha, layers)] = intervention
        if split == "test":
            configurations |= self._shuffled(pl_module, batch)
        # Every configuration of the batch at once: they share the unsteered work.
        with torch.inference_mode():
            results = pl_module.score_grid(batch, configurations)
        for (method, alpha, layers), steered in results.items():
            self._store(split, method, alpha, layers, steered)

    def _grid(
        self, pl_module: SteeringModule, split: str, method: str
    ) -> list[tuple[str, tuple[int, ...], float, float | None]]:
        """(name, layers, alpha, c_max) of a steered configuration to score on `split`: on dev
        the whole grid (a conditioned method's per clip bound, under `variant` names), on test
        the dev choice."""
        conditioned = method in pl_module.readings
        if split == "test":
            return [(method, *self.chosen[method], self.c_max.get(method))]
        layer_sets = pl_module.layer_sets(method, self.choice.layer_choice)
        bounds = self._bounds(pl_module, method) if conditioned else [None]
        return [
            (method if c_max is None else variant(method, c_max), layers, alpha, c_max)
            for c_max in bounds
            for layers in layer_sets
            for alpha in self.alphas
        ]

    def _reader_scores(
        self, pl_module: SteeringModule, split: str, batch: list[Example]
    ) -> dict[str, torch.Tensor]:
        """Each conditioned method's reading of the batch (test: read once for every test item
        at the dev choice, so that the shuffled control can permute them)."""
        if not pl_module.readings:
            return {}
        if split == "dev":
            return pl_module.reader_scores(batch)
        return {
            method: torch.stack([rows[example.id] for example in batch])
            for method, rows in self.test_scores.items()
        }

    def _store_probes(
        self,
        pl_module: SteeringModule,
        split: str,
        batch: list[Example],
        scores: dict[str, torch.Tensor],
    ) -> None:
        """Each reader's own answers (`expert_probe`, `target_probe`): the class it reads."""
        for method, reading in pl_module.readings.items():
            key = (split, PROBES[reading.metadata["reader"]], 0.0, ())
            if any(example.id in self.records.get(key, {}) for example in batch):
                continue  # another method with the same reader already answered
            predictions = reading.predict(scores[method]).tolist()
            self.records.setdefault(key, {}).update(
                {
                    example.id: {
                        "correct": int(predicted) == int(example.answer),
                        "prediction": int(predicted),
                        "gold": int(example.answer),
                    }
                    for example, predicted in zip(batch, predictions, strict=True)
                }
            )

    def _shuffled(self, pl_module: SteeringModule, batch: list[Example]) -> dict[Any, Any]:
        """The `shuffled` control's configurations of a test batch: each conditioned method at
        its dev choice, item n steered with the coefficients of item order[n] of the test
        split (the same coefficients, their link to the input broken)."""
        position = self.test_position
        configurations = {}
        for method in _shuffled_methods(pl_module):
            layers, alpha = self.chosen[method]
            for draw, order in enumerate(self.orders):
                sources = [self.test_ids[int(order[position[e.id]])] for e in batch]
                rows = torch.stack([self.test_scores[method][source] for source in sources])
                configurations[(shuffled_name(method, draw), alpha, layers)] = (
                    pl_module.intervention(method, alpha, layers, rows, self.c_max[method])
                )
        return configurations

    def _choose(self, pl_module: SteeringModule) -> None:
        """Each method's and null draw's (layers, alpha) — and a conditioned method's c_max,
        ties to the smaller — from all ranks' dev items, by one rule (`choose_setting`); then
        the readings of every test item and the shuffled control's permutations."""
        dev = {key: items for key, items in _gather(self.records).items() if key[0] == "dev"}
        for method in pl_module.steered_names:
            best = None
            for name, c_max in self._dev_names(pl_module, method):
                accuracies = {
                    (key[3], key[2]): sum(r["correct"] for r in items.values()) / len(items)
                    for key, items in dev.items()
                    if key[1] == name
                }
                setting = choose_setting(accuracies, pl_module.layer_sets(method, "dev"))
                if best is None or accuracies[setting] > best[0]:
                    best = (accuracies[setting], setting, c_max)
            accuracy, (layers, alpha), c_max = best
            self.chosen[method] = (layers, alpha)
            if c_max is not None:
                self.c_max[method] = c_max
            log.info(
                "%s: alpha %g on layers %s%s chosen on dev (accuracy %.3f)",
                method,
                alpha,
                list(layers),
                "" if c_max is None else f", c_max {c_max:g},",
                accuracy,
            )
        if pl_module.readings:
            examples = pl_module.trainer.datamodule.splits()["test"]
            scores = pl_module.reader_scores(examples)
            self.test_scores = {
                method: {e.id: rows[n] for n, e in enumerate(examples)}
                for method, rows in scores.items()
            }
            self.test_ids = sorted(e.id for e in examples)
            self.test_position = {item_id: n for n, item_id in enumerate(self.test_ids)}
            self.orders = shuffled_orders(
                len(self.test_ids), pl_module.scoring.shuffle_k, self.seed
            )

    def _dev_names(self, pl_module: SteeringModule, method: str) -> list[tuple[str, float | None]]:
        """The names a method's dev configurations are stored under, with their c_max."""
        if method not in pl_module.readings:
            return [(method, None)]
        return [(variant(method, c_max), c_max) for c_max in self._bounds(pl_module, method)]

    def _bounds(self, pl_module: SteeringModule, method: str) -> list[float]:
        """A conditioned method's clip bounds that give distinct coefficients (more than two
        classes: bounds >= 1 all clip nothing, so one of them is scored)."""
        return pl_module.readings[method].distinct_bounds(self.choice.c_max)

    # -- results -------------------------------------------------------------------------------

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.chosen:
            return
        records = _gather(self.records)
        self.metrics = self._summarise(pl_module, records)
        # Named by the split the number comes from (the stage is Lightning's `validate`).
        for method, entry in self.metrics["methods"].items():
            for split in ("dev", "test"):
                pl_module.log(
                    f"{split}/{pl_module.task_name}/{method}/acc",
                    entry[split]["accuracy"],
                    sync_dist=True,
                )
        if trainer.is_global_zero:
            if self.choice.num_samples:
                self.metrics["samples"] = self._samples(pl_module, trainer)
            if self.report:
                run_dir = Path(pl_module.hparams.run_dir)
                save_json(run_dir / METRICS_FILE, self.metrics)
                # The vectors describe themselves: apply / generate / export need no metrics.
                fixed = [m for m in pl_module.hparams.methods if m not in pl_module.readings]
                record_choices(
                    {m: pl_module.method_path(m) for m in fixed},
                    self.chosen,
                    pl_module.scoring.positions,
                    task=pl_module.task_name,
                )
                for method in pl_module.readings:
                    record_choices(
                        {method: pl_module.method_path(method)},
                        {method: self.chosen[method]},
                        pl_module.scoring.positions,
                        task=pl_module.task_name,
                        c_max=self.c_max[method],
                    )
                path = write_report(run_dir, self.metrics)
                log.info("report written to %s", path)
        trainer.strategy.barrier()

    def _summarise(self, pl_module: SteeringModule, records: dict[Key, dict]) -> dict[str, Any]:
        """`metrics.json`: the run's settings, the baselines and controls, the null, every
        steered method at its dev choice, the headroom, transfer and the conclusion."""
        figures = _Figures(records, pl_module.task_type, self.choice.n_boot, self.seed)
        methods, correct = _baseline_entries(figures)
        budget = self._bias_budget(pl_module)
        bias = self._none_bias(figures, budget)
        if bias is not None:
            methods[NONE_BIAS], correct[NONE_BIAS] = self._none_bias_entry(figures, budget, *bias)
        null = self._null(pl_module, figures)
        expert_acc = methods.get(EXPERT, {}).get("test", {}).get("accuracy")
        if figures.one_class:
            log.warning(
                "every test item of %s has the same gold label: no gain can be judged",
                pl_module.task_name,
            )
            expert_acc = None
        for method in pl_module.hparams.methods:
            methods[method], correct[method] = self._method_entry(
                pl_module, figures, method, null, correct.get(NONE_BIAS), expert_acc
            )
        for method in pl_module.readings:
            methods[method] |= self._conditioned_entry(pl_module, figures, method, correct)
        metrics: dict[str, Any] = {
            **self._run_settings(pl_module),
            "n_dev": len(figures.dev_ids),
            "n_test": len(figures.test_ids),
            "dropped_rows": _dropped_rows(pl_module),
            # The expert's paired gain over the unsteered target: the room steering has.
            "headroom": (
                figures.paired(correct[EXPERT], figures.none_test) if EXPERT in correct else None
            ),
            "one_class_test": figures.one_class,
            "none_bias": (
                {
                    "applicable": True,
                    "budget": budget,
                    "constant_classes": list(range(len(bias[0].offsets))),
                    "candidates": bias[0].candidates,
                    "chosen_constant": bias[0].constant,
                }
                if bias is not None
                else {"applicable": False, "reason": NO_OPTION_SCORES}
            ),
            "null": null,
            "methods": methods,
            "transfer": transfer_summary(
                {m: pl_module.steering[m].metadata for m in pl_module.hparams.methods}
            ),
            "test_items": figures.per_item(correct),
            "environment": self._environment(pl_module),
        }
        return metrics | _verdict(metrics, pl_module.hparams.methods)

    def _environment(self, pl_module: SteeringModule) -> dict[str, Any]:
        """What the evaluation ran on, with the capture dtype its vectors record."""
        captures = [
            pl_module.steering[m].metadata.get("capture_dtype") for m in pl_module.hparams.methods
        ]
        return environment(
            pl_module.device,
            self.seed,
            [c for c in captures if c],
            resolve_dtype(pl_module.scoring.model_dtype, pl_module.device),
        )

    def _bias_budget(self, pl_module: SteeringModule) -> int:
        """Offset candidates of `none+bias`: the largest dev search of any steered
        configuration (alphas x candidate layer sets), so the threshold control never gets a
        smaller search than a method."""
        layer_sets = [
            len(pl_module.layer_sets(name, self.choice.layer_choice))
            * len(self._dev_names(pl_module, name))
            for name in pl_module.steered_names
        ]
        return len(self.alphas) * max(layer_sets, default=1)

    def _run_settings(self, pl_module: SteeringModule) -> dict[str, Any]:
        """What was scored and how: task, scoring mode, models and the dev grid."""
        hp = pl_module.hparams
        return {
            "kind": "metrics",
            "task": pl_module.task_name,
            "task_type": pl_module.task_type,
            "mode": pl_module.mode,
            "calibration": pl_module.scoring.calibration
            or ("none" if pl_module.mode == "generate" else "content_free"),
            "positions": pl_module.scoring.positions,
            "target": hp.target,
            "expert": hp.expert,
            "alphas": self.alphas,
            "layer_choice": self.choice.layer_choice,
        }

    def _none_bias_entry(
        self,
        figures: _Figures,
        budget: int,
        rule: ThresholdRule,
        dev_correct: torch.Tensor,
        test_correct: torch.Tensor,
        test_predictions: list[int],
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """The `none+bias` control's entry (its rule, figures and paired comparison with
        `none`) and its per-item test results."""
        entry = {
            "offsets": rule.offsets.tolist(),
            "constant": rule.constant,
            "budget": budget,
            "test": figures.summary(test_correct),
            "dev": figures.summary(dev_correct),
            "vs_none": figures.paired(test_correct, figures.none_test),
            "p_vs_none": figures.p_value(test_correct, figures.none_test),
            **figures.class_metrics(test_predictions),
        }
        return entry, test_correct

    def _method_entry(
        self,
        pl_module: SteeringModule,
        figures: _Figures,
        method: str,
        null: dict[str, Any] | None,
        bias_test: torch.Tensor | None,
        expert_acc: float | None,
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """A steered method at its dev choice: test figures, paired comparisons with `none`,
        `none+bias` (`bias_test`, where it applies) and the null, the share of the expert's
        gap it closes, its dev curves and its vectors' provenance; and its per-item test
        results."""
        layers, alpha = self.chosen[method]
        none_test = figures.none_test
        steered = figures.correct("test", method, alpha, layers)
        predictions = figures.test_predictions(method, alpha, layers)
        class_metrics = figures.class_metrics(predictions)  # bootstrapped once
        c_max = self.c_max.get(method)
        curves = figures.dev_curves(method if c_max is None else variant(method, c_max))
        entry = {
            "alpha": alpha,
            "layers": list(layers),
            "test": figures.summary(steered),
            "dev": {"accuracy": curves[layers_key(layers)][f"{alpha:g}"]},
            "vs_none": figures.paired(steered, none_test),
            "p_vs_none": figures.p_value(steered, none_test),
            "vs_none_bias": None if bias_test is None else figures.paired(steered, bias_test),
            "p_vs_none_bias": None if bias_test is None else figures.p_value(steered, bias_test),
            "p_vs_null": (
                None if null is None else empirical_p(_gain(steered, none_test), null["gains"])
            ),
            **class_metrics,
            **figures.balance(predictions, class_metrics["habit_rate"]),
            "gap_closed": (
                None
                if expert_acc is None
                else gap_closed(float(steered.mean()), float(none_test.mean()), expert_acc)
            ),
            "dev_curve": curves,
            **_provenance(pl_module, method),
        }
        return entry, steered

    def _conditioned_entry(
        self,
        pl_module: SteeringModule,
        figures: _Figures,
        method: str,
        correct: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        """What a conditioned method adds to its entry: its clip bound and reader, its dev
        curves per clip bound, the `shuffled` control (each permutation's test gain over none,
        the empirical p-value) and the paired comparison with the target reading itself."""
        reading = pl_module.readings[method]
        layers, alpha = self.chosen[method]
        none_test, steered = figures.none_test, correct[method]
        shuffled = method in _shuffled_methods(pl_module)
        gains = [
            _gain(figures.correct("test", shuffled_name(method, k), alpha, layers), none_test)
            for k in range(len(self.orders) if shuffled else 0)
        ]
        reader = reading.metadata["reader"]
        entry: dict[str, Any] = {
            "c_max": self.c_max[method],
            "reader": reader,
            "reader_layer": reading.metadata.get("layer"),
            "probe": PROBES[reader],
            "dev_curves_by_c_max": {
                f"{c:g}": figures.dev_curves(variant(method, c))
                for c in self._bounds(pl_module, method)
            },
            SHUFFLED: (
                {"k": len(gains), "seed": self.seed, "gains": gains, **null_summary(gains)}
                | {"smallest_p": smallest_null_p(len(gains))}
                if gains
                else None
            ),
            f"p_vs_{SHUFFLED}": empirical_p(_gain(steered, none_test), gains) if gains else None,
        }
        target_read = [m for m, r in pl_module.readings.items() if r.metadata["reader"] == "target"]
        if reader == "expert" and target_read:
            control = correct[target_read[0]]
            entry["target_conditioned"] = target_read[0]
            entry["vs_target_conditioned"] = figures.paired(steered, control)
            entry["p_vs_target_conditioned"] = figures.p_value(steered, control)
        return entry

    def _none_bias(
        self, figures: _Figures, budget: int
    ) -> tuple[ThresholdRule, torch.Tensor, torch.Tensor, list[int]] | None:
        """`none+bias`: a rule fitted on the unsteered target's dev scores (`budget` offset
        candidates and every constant predictor), applied to its test scores. None in
        generation-scored modes, which have no option scores to offset."""
        dev_ids, test_ids = figures.dev_ids, figures.test_ids
        dev = figures.records[("dev", NONE, 0.0, ())]
        test = figures.records[("test", NONE, 0.0, ())]
        if "scores" not in dev[dev_ids[0]]:
            return None
        dev_scores, dev_gold = _score_matrix(dev, dev_ids)
        test_scores, test_gold = _score_matrix(test, test_ids)
        rule = fit_offsets(dev_scores, dev_gold, budget=budget)
        dev_correct = rule.predict(dev_scores) == dev_gold
        test_predictions = rule.predict(test_scores)
        log.info(
            "none+bias: offsets %s%s chosen on dev among %d candidates",
            [round(float(b), 4) for b in rule.offsets],
            "" if rule.constant is None else f", then always class {rule.constant},",
            rule.candidates,
        )
        return (
            rule,
            dev_correct.double(),
            (test_predictions == test_gold).double(),
            test_predictions.tolist(),
        )

    def _null(self, pl_module: SteeringModule, figures: _Figures) -> dict[str, Any] | None:
        """The random null: each draw's test gain over `none` at its dev choice.

        `gains` has one entry per draw. The signed alpha grid holds both signs of every
        draw, and v and -v span the same candidates under it, so a draw's sign is part of
        its dev choice (`alphas` records the signed alpha each draw took), just as a method
        may take a negative alpha: one gain per draw, not two."""
        if not pl_module.null_names:
            return None
        gains, alphas, layer_sets = [], [], []
        for name in pl_module.null_names:
            layers, alpha = self.chosen[name]
            steered = figures.correct("test", name, alpha, layers)
            gains.append(_gain(steered, figures.none_test))
            alphas.append(alpha)
            layer_sets.append(list(layers))
        return {
            "k": len(gains),
            "seed": pl_module.hparams.null_seed,
            "reference": pl_module.null_reference,
            "gains": gains,
            "alphas": alphas,
            "layers": layer_sets,
            **null_summary(gains),
            "smallest_p": smallest_null_p(len(gains)),
        }

    def _samples(self, pl_module: SteeringModule, trainer: L.Trainer) -> list[dict[str, Any]]:
        """Free-text answers to the first test prompts: unsteered, each method, the expert."""
        examples = trainer.datamodule.splits()["test"][: self.choice.num_samples]
        prompts = [render_prompt(pl_module.task_type, example) for example in examples]
        outputs = {NONE: pl_module.generate(prompts, self.choice.sample_tokens)}
        for method in pl_module.hparams.methods:
            layers, alpha = self.chosen[method]
            scores = None
            if method in self.test_scores:
                scores = torch.stack([self.test_scores[method][e.id] for e in examples])
            intervention = pl_module.intervention(
                method, alpha, layers, scores, self.c_max.get(method)
            )
            outputs[method] = pl_module.generate(prompts, self.choice.sample_tokens, intervention)
        if pl_module.expert_decoder is not None:
            outputs[EXPERT] = pl_module.generate(prompts, self.choice.sample_tokens, expert=True)
        return [
            {
                "id": example.id,
                "prompt": prompt,
                "gold": _gold_text(example),
                "outputs": {name: texts[k] for name, texts in outputs.items()},
            }
            for k, (example, prompt) in enumerate(zip(examples, prompts, strict=True))
        ]


def _shuffled_methods(pl_module: SteeringModule) -> list[str]:
    """The conditioned methods that get the `shuffled` control: those an expert reads. The
    target's own reading (`target_conditioned`) is itself a control, not a candidate gain, and
    its K permutations would cost as much again as every other test configuration."""
    return [m for m, r in pl_module.readings.items() if r.metadata["reader"] == "expert"]


def _dropped_rows(pl_module: L.LightningModule) -> dict[str, int]:
    """Rows the task loader dropped on purpose (`skip_unanswered`), per pool."""
    datamodule = pl_module.trainer.datamodule
    task = getattr(datamodule, "task", None)
    return dict(getattr(task, "dropped", None) or {})


def _verdict(metrics: dict[str, Any], methods: Iterable[str]) -> dict[str, Any]:
    """The hypothesis tests behind the conclusion, and the conclusion: which steered methods
    beat every control."""
    return {
        "comparisons": {"count": comparison_count(metrics), "level": LEVEL, "tests": P_VALUES},
        "conclusion": {
            "helps": [m for m in methods if helps(metrics, m)],
            "metrics": verdict_metrics(metrics),
            "text": conclusion(metrics),
        },
    }


def _provenance(pl_module: SteeringModule, method: str) -> dict[str, Any]:
    """Where a method's vectors come from: its artifact and how it was made."""
    metadata = pl_module.steering[method].metadata
    return {
        "artifact": str(pl_module.method_path(method)),
        "extractor": metadata.get("method"),
        "source": metadata.get("source"),
        "space": metadata.get("space"),
        "alignment_objective": metadata.get("alignment_objective"),
        "pairs": metadata.get("pairs"),
        "fits": metadata.get("fits"),
    }


def _gold_text(example: Example) -> str:
    if example.choices and example.answer is not None:
        return example.choices[int(example.answer)]
    return str(example.answer)
