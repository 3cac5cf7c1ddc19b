"""`SteeringEvaluator`: the callback that steers during `validate` and writes the report.

Dev batches (dataloader 0): every method x target-layer set x alpha of the grid is scored on the
batch, beside the unsteered target and the expert (the `SteeringModule`'s own step). Before the
first test batch (dataloader 1) the dev results of all ranks are gathered and each method's
(layers, alpha) is chosen by dev accuracy (ties: the smaller alpha, then all layers together).
Test batches then score each method once, at its choice. At the epoch end the test results are
gathered, every figure gets a 95% bootstrap interval, each method a paired interval against the
unsteered target and its share of the expert-target gap, `val/<task>/<method>/acc` is logged,
and rank 0 writes `metrics.json`, `report.md` and the figures into the run directory.

Under DDP every rank scores its shard of each split; duplicates a padded sampler adds are
dropped by example id when results are gathered.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from expertsteer.artifacts import METRICS_FILE, save_json
from expertsteer.metrics import bootstrap_ci, gap_closed, paired_bootstrap_ci
from expertsteer.prompts import render_prompt
from expertsteer.report import layers_key, write_report
from expertsteer.scoring import EvalResult
from expertsteer.tasks import Example
from lightning_modules.steer import EXPERT, NONE, SteeringModule

log = logging.getLogger(__name__)

LAYER_CHOICES = ("all", "dev")
Key = tuple[str, str, float, tuple[int, ...]]
"""(split, method, alpha, target layers) of one scored configuration."""


def _item_records(result: EvalResult) -> dict[str, dict[str, Any]]:
    records = {}
    for index, item_id in enumerate(result.ids):
        record = {"correct": bool(result.correct[index]), "prediction": result.predictions[index]}
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


class SteeringEvaluator(Callback):
    """Chooses alpha (and layers) per method on dev, scores test once, writes the report."""

    def __init__(
        self,
        alphas: list[float] | None = None,
        layer_choice: str = "all",
        num_samples: int = 3,
        sample_tokens: int = 48,
        n_boot: int = 2000,
        seed: int = 0,
        report: bool = True,
    ) -> None:
        """
        Args:
            alphas: Steering strengths tried on dev, as fractions of each layer's mean residual
                norm (default 0.05, 0.1, 0.2, 0.4). Zero is not a candidate: a method is
                reported at its best non-zero strength, so "no gain" shows as no gain.
            layer_choice: `all` steers every layer of a method's artifact together; `dev` also
                tries each layer alone and keeps the best on dev (with `select: dev` pairing).
            num_samples: Test prompts answered in free text with and without steering.
            sample_tokens: Generation budget of those samples.
            n_boot: Bootstrap resamples of every interval.
            seed: Bootstrap seed.
            report: Write `metrics.json`, `report.md` and figures (rank 0).
        """
        super().__init__()
        alphas = [0.05, 0.1, 0.2, 0.4] if alphas is None else [float(a) for a in alphas]
        if not alphas or any(not math.isfinite(a) or a == 0 for a in alphas):
            raise ValueError(f"alphas must be finite and non-zero, got {alphas}")
        if layer_choice not in LAYER_CHOICES:
            raise ValueError(f"layer_choice must be one of {LAYER_CHOICES}, got '{layer_choice}'")
        if num_samples < 0 or sample_tokens < 1 or n_boot < 1:
            raise ValueError(
                "num_samples must be >= 0, sample_tokens and n_boot >= 1; got "
                f"{num_samples}, {sample_tokens}, {n_boot}"
            )
        self.alphas = sorted(set(alphas), key=lambda a: (abs(a), a))
        self.layer_choice = layer_choice
        self.num_samples = num_samples
        self.sample_tokens = sample_tokens
        self.n_boot = n_boot
        self.seed = seed
        self.report = report
        self.records: dict[Key, dict[str, dict]] = {}
        self.chosen: dict[str, tuple[tuple[int, ...], float]] = {}
        self.metrics: dict[str, Any] = {}

    # -- scoring -------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, SteeringModule):
            raise TypeError(
                f"SteeringEvaluator needs a SteeringModule, got {type(pl_module).__name__}"
            )
        self.records, self.chosen, self.metrics = {}, {}, {}

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
        with torch.inference_mode():
            for method in pl_module.hparams.methods:
                if split == "dev":
                    grid = [
                        (layers, alpha)
                        for layers in pl_module.layer_sets(method, self.layer_choice)
                        for alpha in self.alphas
                    ]
                else:
                    grid = [self.chosen[method]]
                for layers, alpha in grid:
                    intervention = pl_module.intervention(method, alpha, layers)
                    steered = pl_module.score(batch, intervention, key=(method, alpha, layers))
                    self._store(split, method, alpha, layers, steered)

    def _choose(self, pl_module: SteeringModule) -> None:
        """Each method's (layers, alpha) with the best dev accuracy, from all ranks' dev items."""
        dev = {key: items for key, items in _gather(self.records).items() if key[0] == "dev"}
        for method in pl_module.hparams.methods:
            candidates = [
                (key, sum(r["correct"] for r in items.values()) / len(items))
                for key, items in dev.items()
                if key[1] == method
            ]
            order = {layers: k for k, layers in enumerate(pl_module.layer_sets(method, "dev"))}
            (_, _, alpha, layers), accuracy = max(
                candidates, key=lambda c: (c[1], -abs(c[0][2]), -order.get(c[0][3], 0))
            )
            self.chosen[method] = (layers, alpha)
            log.info(
                "%s: alpha %g on layers %s chosen on dev (accuracy %.3f)",
                method,
                alpha,
                list(layers),
                accuracy,
            )

    # -- results -------------------------------------------------------------------------------

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.chosen:
            return
        records = _gather(self.records)
        self.metrics = self._summarise(pl_module, records)
        for method, entry in self.metrics["methods"].items():
            pl_module.log(
                f"val/{pl_module.task_name}/{method}/acc",
                entry["test"]["accuracy"],
                sync_dist=True,
            )
        if trainer.is_global_zero:
            if self.num_samples:
                self.metrics["samples"] = self._samples(pl_module, trainer)
            if self.report:
                run_dir = Path(pl_module.hparams.run_dir)
                save_json(run_dir / METRICS_FILE, self.metrics)
                path = write_report(run_dir, self.metrics)
                log.info("report written to %s", path)
        trainer.strategy.barrier()

    def _summarise(self, pl_module: SteeringModule, records: dict[Key, dict]) -> dict[str, Any]:
        boot = {"n_boot": self.n_boot, "seed": self.seed}
        test_ids = sorted(records[("test", NONE, 0.0, ())])
        dev_ids = sorted(records[("dev", NONE, 0.0, ())])
        none_test = _correct(records[("test", NONE, 0.0, ())], test_ids)

        def summary(correct: torch.Tensor) -> dict[str, float]:
            mean, low, high = bootstrap_ci(correct, **boot)
            return {"accuracy": mean, "low": low, "high": high, "n": len(correct)}

        def paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
            mean, low, high = paired_bootstrap_ci(a, b, **boot)
            return {"difference": mean, "low": low, "high": high}

        methods: dict[str, Any] = {}
        baselines = [NONE] + ([EXPERT] if ("test", EXPERT, 0.0, ()) in records else [])
        for name in baselines:
            methods[name] = {
                "test": summary(_correct(records[("test", name, 0.0, ())], test_ids)),
                "dev": summary(_correct(records[("dev", name, 0.0, ())], dev_ids)),
            }
        expert_acc = methods.get(EXPERT, {}).get("test", {}).get("accuracy")
        for method in pl_module.hparams.methods:
            layers, alpha = self.chosen[method]
            steered = _correct(records[("test", method, alpha, layers)], test_ids)
            steering = pl_module.steering[method]
            curves: dict[str, dict[str, float]] = {}
            for (split, name, a, ls), items in records.items():
                if split == "dev" and name == method:
                    accuracy = float(_correct(items, dev_ids).mean())
                    curves.setdefault(layers_key(ls), {})[f"{a:g}"] = accuracy
            methods[method] = {
                "alpha": alpha,
                "layers": list(layers),
                "test": summary(steered),
                "dev": {"accuracy": curves[layers_key(layers)][f"{alpha:g}"]},
                "vs_none": paired(steered, none_test),
                "gap_closed": (
                    None
                    if expert_acc is None
                    else gap_closed(float(steered.mean()), float(none_test.mean()), expert_acc)
                ),
                "dev_curve": curves,
                "artifact": str(pl_module.method_path(method)),
                "extractor": steering.metadata.get("method"),
                "source": steering.metadata.get("source"),
                "space": steering.metadata.get("space"),
                "alignment_objective": steering.metadata.get("alignment_objective"),
                "pairs": steering.metadata.get("pairs"),
                "fits": steering.metadata.get("fits"),
            }
        headroom = None
        if EXPERT in methods:
            expert_test = _correct(records[("test", EXPERT, 0.0, ())], test_ids)
            headroom = paired(expert_test, none_test)
        hp = pl_module.hparams
        return {
            "kind": "metrics",
            "task": pl_module.task_name,
            "task_type": pl_module.task_type,
            "mode": pl_module.mode,
            "calibration": hp.calibration
            or ("none" if pl_module.mode == "generate" else "content_free"),
            "positions": hp.positions,
            "target": hp.target,
            "expert": hp.expert,
            "alphas": self.alphas,
            "layer_choice": self.layer_choice,
            "n_dev": len(dev_ids),
            "n_test": len(test_ids),
            "headroom": headroom,
            "methods": methods,
            "test_items": {
                key[1]: {i: records[key][i]["correct"] for i in test_ids}
                for key in records
                if key[0] == "test"
            },
        }

    def _samples(self, pl_module: SteeringModule, trainer: L.Trainer) -> list[dict[str, Any]]:
        """Free-text answers to the first test prompts: unsteered, each method, the expert."""
        examples = trainer.datamodule.splits()["test"][: self.num_samples]
        prompts = [render_prompt(pl_module.task_type, example) for example in examples]
        outputs = {NONE: pl_module.generate(prompts, self.sample_tokens)}
        for method, (layers, alpha) in self.chosen.items():
            intervention = pl_module.intervention(method, alpha, layers)
            outputs[method] = pl_module.generate(prompts, self.sample_tokens, intervention)
        if pl_module.expert_decoder is not None:
            outputs[EXPERT] = pl_module.generate(prompts, self.sample_tokens, expert=True)
        return [
            {
                "id": example.id,
                "prompt": prompt,
                "gold": _gold_text(example),
                "outputs": {name: texts[k] for name, texts in outputs.items()},
            }
            for k, (example, prompt) in enumerate(zip(examples, prompts, strict=True))
        ]


def _gold_text(example: Example) -> str:
    if example.choices and example.answer is not None:
        return example.choices[int(example.answer)]
    return str(example.answer)
