"""`BehaviourEvaluator`: the callback that measures behaviour steering during `validate`.

For a behaviour task (`expertsteer.data.tasks`, type `behaviour`) the `SteeringModule` loads the
target and every method's vectors (plus the random null's draws) and scores nothing itself; at
the end of the validation epoch this callback, on one process:

1. sets each steered block's scale s_j: the median per-token residual norm of block j on the
   dev prompts, first position left out (`median_token_norms`); every method and null draw
   steering block j uses the same s_j;
2. continues every dev prompt unsteered and under each steered name (method or null draw) x
   target-layer set x alpha of the signed grid (greedy, plus `dev_samples` samples), scores
   each continuation for the concept and its perplexity under the unsteered target, and
   chooses each name's (layers, alpha) by the dev rule (`expertsteer.evaluation.behaviour.choose`)
   from dev results alone: no test prompt has been continued when the choice is made;
3. continues every test prompt once per row: `none`, `prompt` (the task's instruction put
   before the prompt, unsteered), each method and each null draw at its dev choice; greedy and
   `samples` sampled continuations with fixed seeds;
4. summarises (`metrics.json["behaviour"]`): per row the concept score with a 95% bootstrap
   interval over prompts, the concept share, mean perplexity, distinct-2 and degenerate rate;
   per method the two-sided paired-bootstrap p-value against `none` and the one-sided empirical
   p-value against the null's test gains (each draw at its own dev choice); and writes the
   report section, the concept-vs-perplexity plot of the dev grid and side-by-side samples.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from expertsteer.artifacts import METRICS_FILE, save_json
from expertsteer.data.catalogue import resolve_task
from expertsteer.data.tasks import Example
from expertsteer.evaluation.behaviour import (
    BehaviourConfig,
    Continuation,
    DevPoint,
    Row,
    Setting,
    choose,
    continue_prompts,
    degenerate,
    distinct2,
    median_token_norms,
)
from expertsteer.evaluation.behaviour_report import write_behaviour_report
from expertsteer.evaluation.choice import ChoiceConfig
from expertsteer.evaluation.controls import null_summary, smallest_null_p
from expertsteer.evaluation.report import layers_key
from expertsteer.evaluation.scorers import Scorer, make_scorer
from expertsteer.evaluation.stats import bootstrap_ci, empirical_p, paired_bootstrap_p
from expertsteer.evaluation.transfer import transfer_summary
from expertsteer.settings import settings_of
from lightning_modules.steer import NONE, SteeringModule

log = logging.getLogger(__name__)

PROMPT = "prompt"
"""The prompting baseline: the unsteered target with the task's instruction before the prompt."""
NATIVE = ("target_mean_diff", "target_rfm")
"""The target's own directions: the reference an expert-derived direction is measured against."""
Key = tuple[str, str, tuple[int, ...], float]
"""(split, name, layers, alpha) of one scored configuration."""


def _scored(scorer: Scorer, continuations: list[Continuation]) -> list[dict[str, Any]]:
    texts = [c.text for c in continuations]
    return [
        {"text": c.text, "perplexity": c.perplexity, "score": score, "hit": hit}
        for c, score, hit in zip(
            continuations, scorer.score(texts), scorer.hits(texts), strict=True
        )
    ]


class BehaviourEvaluator(Callback):
    """Chooses alpha and layers per method on dev prompts, continues test prompts once, writes
    `metrics.json["behaviour"]` and the report."""

    def __init__(
        self,
        choice: ChoiceConfig = ChoiceConfig(),  # noqa: B008 (frozen: one shared default)
        behaviour: BehaviourConfig = BehaviourConfig(),  # noqa: B008
        seed: int = 0,
        report: bool = True,
    ) -> None:
        """
        Args:
            choice: The dev grid (`ChoiceConfig`: signed alphas, as fractions of each block's
                median per-token residual norm; whether each layer is also tried alone) and
                the bootstrap resamples.
            behaviour: Generation and the dev rule (`BehaviourConfig`).
            seed: Sampling and bootstrap seed.
            report: Write `metrics.json`, `report.md` and the figure (rank 0).
        """
        super().__init__()
        self.choice = settings_of(ChoiceConfig, choice)
        self.config = settings_of(BehaviourConfig, behaviour)
        self.alphas = sorted(set(self.choice.alphas), key=lambda a: (abs(a), a))
        self.seed = seed
        self.report = report
        self.records: dict[Key, list[dict[str, Any]]] = {}
        self.chosen: dict[str, Setting] = {}
        self.metrics: dict[str, Any] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, SteeringModule):
            raise TypeError(
                f"BehaviourEvaluator needs a SteeringModule, got {type(pl_module).__name__}"
            )
        if pl_module.task_type != "behaviour":
            raise ValueError(
                f"BehaviourEvaluator scores behaviour tasks; '{pl_module.task_name}' is a "
                f"{pl_module.task_type} task (use SteeringEvaluator)"
            )
        self.records, self.chosen, self.metrics = {}, {}, {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.is_global_zero:
            self.metrics = self.evaluate(pl_module, trainer.datamodule)
            if self.report:
                run_dir = Path(pl_module.hparams.run_dir)
                save_json(run_dir / METRICS_FILE, self.metrics)
                path = write_behaviour_report(run_dir, self.metrics)
                log.info("report written to %s", path)
        trainer.strategy.barrier()

    # -- the measurement -----------------------------------------------------------------------

    def evaluate(self, pl_module: SteeringModule, datamodule: Any) -> dict[str, Any]:
        """Dev grid, dev choice, test rows, summary: the whole measurement."""
        started = time.perf_counter()
        spec = resolve_task(datamodule.hparams.task)
        scorer = make_scorer(spec.scorer, spec.scorer_options)
        splits = datamodule.splits()
        dev, test = splits["dev"], splits["test"]
        decoder = pl_module.target_decoder
        names = pl_module.steered_names
        layers = sorted({j for name in names for j in pl_module.steering[name].layers})
        self.scales = median_token_norms(decoder, [e.question for e in dev], layers)
        log.info("behaviour: block scales (median token norm) %s", self.scales)
        layer_sets = {name: pl_module.layer_sets(name, self.choice.layer_choice) for name in names}
        grid = {
            (name, layer_set, alpha): self._additions(pl_module, name, layer_set, alpha)
            for name in names
            for layer_set in layer_sets[name]
            for alpha in self.alphas
        }
        self._run(pl_module, scorer, "dev", dev, {(NONE, (), 0.0): None, **grid})
        self._choose(names, layer_sets)
        instruction = spec.instruction or ""
        test_configs: dict[tuple[str, tuple[int, ...], float], Any] = {(NONE, (), 0.0): None}
        test_configs[(PROMPT, (), 0.0)] = None
        for name in names:
            layer_set, alpha = self.chosen[name]
            test_configs[(name, layer_set, alpha)] = grid[(name, layer_set, alpha)]
        self._run(pl_module, scorer, "test", test, test_configs, instruction)
        metrics = self._summarise(pl_module, scorer, dev, test, instruction)
        metrics["behaviour"]["seconds"] = time.perf_counter() - started
        return metrics

    def _additions(
        self, pl_module: SteeringModule, name: str, layers: tuple[int, ...], alpha: float
    ) -> dict[int, torch.Tensor]:
        vectors = pl_module.steering[name].vectors
        return {j: alpha * self.scales[j] * vectors[j].double() for j in layers}

    def _run(
        self,
        pl_module: SteeringModule,
        scorer: Scorer,
        split: str,
        examples: list[Example],
        configs: dict[tuple[str, tuple[int, ...], float], dict[int, torch.Tensor] | None],
        instruction: str = "",
    ) -> None:
        """Continue `examples` under every configuration (greedy + samples) in shared batches,
        and store the scored continuations per configuration."""
        config = self.config
        samples = config.samples if split == "test" else config.dev_samples
        rows, keys = [], []
        for key, additions in configs.items():
            for example in examples:
                text = example.question
                if key[0] == PROMPT:
                    text = f"{instruction}\n{text}" if instruction else text
                for sample in [None, *range(samples)]:
                    rows.append(Row(example.id, text, additions, sample))
                    keys.append(key)
        log.info(
            "behaviour %s: %d continuations of %d configurations", split, len(rows), len(configs)
        )
        continuations = continue_prompts(
            pl_module.target_decoder,
            rows,
            config.max_new_tokens,
            seed=self.seed,
            temperature=config.temperature,
            batch_size=config.batch_size,
        )
        scored = _scored(scorer, continuations)
        for key, row, record in zip(keys, rows, scored, strict=True):
            record.update(prompt_id=row.prompt_id, sample=row.sample)
            self.records.setdefault((split, *key), []).append(record)

    def _point(self, split: str, name: str, layers: tuple[int, ...], alpha: float) -> DevPoint:
        records = self.records[(split, name, layers, alpha)]
        n = len(records)
        return DevPoint(
            concept=sum(r["score"] for r in records) / n,
            share=sum(r["hit"] for r in records) / n,
            perplexity=sum(r["perplexity"] for r in records) / n,
        )

    def _choose(self, names: list[str], layer_sets: dict[str, list[tuple[int, ...]]]) -> None:
        """Each name's (layers, alpha) by the dev rule, from dev records only."""
        if any(key[0] == "test" for key in self.records):
            raise RuntimeError("test continuations exist before the dev choice")
        none = self._point("dev", NONE, (), 0.0)
        for name in names:
            points = {
                (layer_set, alpha): self._point("dev", name, layer_set, alpha)
                for layer_set in layer_sets[name]
                for alpha in self.alphas
            }
            self.chosen[name] = choose(
                points,
                none,
                self.config.rule,
                self.config.perplexity_cap,
                layer_sets[name],
            )
            log.info("behaviour: %s chooses %s on dev", name, self.chosen[name])

    # -- summary -------------------------------------------------------------------------------

    def _per_prompt(self, records: list[dict[str, Any]], ids: list[str]) -> torch.Tensor:
        """Mean concept score per test prompt (over its greedy and sampled continuations)."""
        totals: dict[str, list[float]] = {}
        for record in records:
            totals.setdefault(record["prompt_id"], []).append(record["score"])
        return torch.tensor([sum(totals[i]) / len(totals[i]) for i in ids], dtype=torch.float64)

    def _entry(self, records: list[dict[str, Any]], ids: list[str]) -> dict[str, Any]:
        boot = {"n_boot": self.choice.n_boot, "seed": self.seed}
        per_prompt = self._per_prompt(records, ids)
        concept, low, high = bootstrap_ci(per_prompt, **boot)
        texts = [r["text"] for r in records]
        return {
            "concept": concept,
            "concept_ci": [low, high],
            "share": sum(r["hit"] for r in records) / len(records),
            "perplexity": sum(r["perplexity"] for r in records) / len(records),
            "distinct2": distinct2(texts),
            "degenerate_rate": sum(map(degenerate, texts)) / len(texts),
            "n": len(records),
        }

    def _summarise(
        self,
        pl_module: SteeringModule,
        scorer: Scorer,
        dev: list[Example],
        test: list[Example],
        instruction: str,
    ) -> dict[str, Any]:
        boot = {"n_boot": self.choice.n_boot, "seed": self.seed}
        ids = [e.id for e in test]
        none_records = self.records[("test", NONE, (), 0.0)]
        none_scores = self._per_prompt(none_records, ids)
        rows: dict[str, Any] = {
            NONE: self._entry(none_records, ids),
            PROMPT: {
                **self._entry(self.records[("test", PROMPT, (), 0.0)], ids),
                "instruction": instruction,
            },
        }
        rows[PROMPT]["p_vs_none"] = paired_bootstrap_p(
            self._per_prompt(self.records[("test", PROMPT, (), 0.0)], ids), none_scores, **boot
        )

        def test_scores(name: str) -> torch.Tensor:
            layers, alpha = self.chosen[name]
            return self._per_prompt(self.records[("test", name, layers, alpha)], ids)

        null_names = pl_module.null_names
        null_gains = [float((test_scores(n) - none_scores).mean()) for n in null_names]
        null = None
        if null_names:
            null = {
                "k": len(null_names),
                "seed": pl_module.hparams.null_seed,
                "reference": pl_module.null_reference,
                "scores": [float(test_scores(n).mean()) for n in null_names],
                "gains": null_gains,
                "alphas": [self.chosen[n][1] for n in null_names],
                "layers": [list(self.chosen[n][0]) for n in null_names],
                **null_summary([float(test_scores(n).mean()) for n in null_names]),
                "gain_median": null_summary(null_gains)["median"],
                "gain_p95": null_summary(null_gains)["p95"],
                "smallest_p": smallest_null_p(len(null_names)),
            }
        native_gain = None
        for name in NATIVE:
            if name in pl_module.hparams.methods:
                native_gain = float((test_scores(name) - none_scores).mean())
                break
        for name in pl_module.hparams.methods:
            layers, alpha = self.chosen[name]
            scores = test_scores(name)
            gain = float((scores - none_scores).mean())
            rows[name] = {
                **self._entry(self.records[("test", name, layers, alpha)], ids),
                "alpha": alpha,
                "layers": list(layers),
                "gain": gain,
                "shift_vs_native": (None if not native_gain else gain / native_gain),
                "p_vs_none": paired_bootstrap_p(scores, none_scores, **boot),
                "p_vs_null": None if null is None else empirical_p(gain, null_gains),
                "extractor": pl_module.steering[name].metadata.get("method"),
                "source": pl_module.steering[name].metadata.get("source"),
                "alignment_objective": pl_module.steering[name].metadata.get("alignment_objective"),
            }
        behaviour = {
            "scorer": scorer.name,
            "rule": self.config.rule,
            "perplexity_cap": self.config.perplexity_cap,
            "alphas": self.alphas,
            "layer_choice": self.choice.layer_choice,
            "scales": {str(j): s for j, s in self.scales.items()},
            "norm_scale": "median per-token residual norm on the dev prompts, first position out",
            "generation": {
                "max_new_tokens": self.config.max_new_tokens,
                "samples": self.config.samples,
                "dev_samples": self.config.dev_samples,
                "temperature": self.config.temperature,
                "seed": self.seed,
            },
            "n_dev_prompts": len(dev),
            "n_test_prompts": len(test),
            "methods": rows,
            "null": null,
            "dev_curves": self._dev_curves(pl_module),
            "samples": self._samples(pl_module, test, instruction),
            "p_values": (
                "vs none: two-sided paired bootstrap over test prompts (concept score per prompt "
                "averaged over its continuations); vs the null: one-sided empirical "
                "(1 + #{null gain >= gain}) / (1 + K)"
            ),
        }
        hp = pl_module.hparams
        return {
            "kind": "metrics",
            "task": pl_module.task_name,
            "task_type": "behaviour",
            "target": hp.target,
            "positions": "all",
            "n_dev": len(dev),
            "n_test": len(test),
            "behaviour": behaviour,
            "transfer": transfer_summary(
                {m: pl_module.steering[m].metadata for m in pl_module.hparams.methods}
            ),
        }

    def _dev_curves(self, pl_module: SteeringModule) -> dict[str, Any]:
        """Per method and layer set: (alpha, concept, share, perplexity) of every dev setting,
        with the unsteered point; the trade-off plot draws these."""
        none = self._point("dev", NONE, (), 0.0)
        curves: dict[str, Any] = {NONE: {"concept": none.concept, "perplexity": none.perplexity}}
        for name in [*pl_module.hparams.methods, *pl_module.null_names[:1]]:
            per_layers: dict[str, list[dict[str, float]]] = {}
            for key in self.records:
                if key[0] == "dev" and key[1] == name:
                    point = self._point(*key)
                    per_layers.setdefault(layers_key(key[2]), []).append(
                        {
                            "alpha": key[3],
                            "concept": point.concept,
                            "share": point.share,
                            "perplexity": point.perplexity,
                        }
                    )
            curves[name] = {k: sorted(v, key=lambda p: p["alpha"]) for k, v in per_layers.items()}
        return curves

    def _samples(
        self, pl_module: SteeringModule, test: list[Example], instruction: str
    ) -> list[dict[str, Any]]:
        """Greedy test continuations of the first prompts: unsteered, prompt, every method,
        one null draw."""
        shown = test[: self.config.num_examples]
        names = [NONE, PROMPT, *pl_module.hparams.methods, *pl_module.null_names[:1]]
        out = []
        for example in shown:
            outputs = {}
            for name in names:
                layers, alpha = self.chosen.get(name, ((), 0.0))
                records = self.records[("test", name, layers, alpha)]
                greedy = next(
                    r for r in records if r["prompt_id"] == example.id and r["sample"] is None
                )
                outputs[name] = greedy["text"]
            out.append({"id": example.id, "prompt": example.question, "outputs": outputs})
        return out
