"""The steering evaluation stage: the target (and the expert, for the headroom) with the run's
steering vectors, for `expertsteer validate`.

The module loads what is steered and how it is scored; the `SteeringEvaluator` callback
(`lightning_modules/evaluator.py`) runs the method x alpha x layers grid on dev, chooses, scores
test once and writes the report. Every artifact is read and checked against the configured
models and task before any model loads, so a vector made for another model pair or task, or a
layer the target does not have, fails at once.

A conditioned method (`expertsteer.method.conditioned`) has a reader beside its vectors: the
module reads each input with it (`reader_scores`: the expert's, or the target's own, last
prompt token state at the reader's block) and builds a per-row intervention from the scores.

With `scoring.null_k > 0` the module also holds the random null: `null_k` draws `null/0`,
`null/1`, ..., each a random unit vector per target layer of a reference method (`expertsteer`
by default, else the first method) with that method's norm scales s_j, so a draw steers the
same layers with the same alpha * s_j as the method. The draws come from a generator seeded by
`null_seed` alone (`expertsteer.method.extractors.random_unit_vectors`): they never see a label, and
draws 0..n-1 are the same for any larger K. The evaluator treats every draw like a method.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch

from expertsteer.artifacts import ArtifactError
from expertsteer.data.prompts import render_prompt
from expertsteer.data.tasks import Example
from expertsteer.evaluation.answers import generate_answers
from expertsteer.evaluation.branching import PrefixStore
from expertsteer.evaluation.controls import NONE_BIAS
from expertsteer.evaluation.evaluate import (
    DEFAULT_MODE,
    MODES_BY_TYPE,
    EvalResult,
    ScoringConfig,
    evaluate,
    evaluate_grid,
)
from expertsteer.method.conditioned import (
    PROBES,
    READER_FILE,
    Reading,
    conditioned_intervention,
    load_reading,
)
from expertsteer.method.extractors import random_unit_vectors
from expertsteer.method.steer import Intervention
from expertsteer.method.vectors import SteeringVectors, load_steering
from expertsteer.models.batching import naming_out_of_memory
from expertsteer.models.capture import capture
from expertsteer.models.causal_lm import CausalLM
from expertsteer.models.zoo import (
    DEFAULT_EXPERT,
    DEFAULT_TARGET,
    load_model,
    model_dims,
    resolve_dtype,
    weights_identity,
)
from expertsteer.settings import settings_of

log = logging.getLogger(__name__)

NONE = "none"
"""The unsteered target, always evaluated."""
EXPERT = "expert"
"""The expert model itself, unsteered (the headroom)."""
NULL_PREFIX = "null/"
"""Name prefix of the random null's draws (`null/0`, `null/1`, ...)."""
MAIN_METHOD = "expertsteer"
"""The default reference of the null's layers and norm scales."""


def null_steering(reference: SteeringVectors, k: int, seed: int) -> list[SteeringVectors]:
    """`k` random controls shaped like `reference`: per draw, one independent random unit
    vector for each of its target layers, with its norm scales. Labels never enter."""
    layers = reference.layers
    rows = random_unit_vectors(k * len(layers), reference.width, seed)
    rows = rows.view(k, len(layers), reference.width).float()
    return [
        SteeringVectors(
            vectors={layer: rows[draw, n] for n, layer in enumerate(layers)},
            norm_scale={layer: reference.norm_scale[layer] for layer in layers},
            metadata={"method": "random", "source": "null", "draw": draw, "seed": seed},
        )
        for draw in range(k)
    ]


class SteeringModule(L.LightningModule):
    """Holds the target (and expert) decoders and the steering vectors of every method."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        expert: str | None = DEFAULT_EXPERT,
        methods: dict[str, str] | None = None,
        run_dir: str = "runs/default",
        scoring: ScoringConfig = ScoringConfig(),  # noqa: B008 (frozen: one shared default)
        null_seed: int = 1,
        null_reference: str | None = None,
    ) -> None:
        """
        Args:
            target: Target model (packaged name, directory, .gguf or hub id); the vectors must
                have been made for it.
            expert: Expert model scored unsteered beside the target (the headroom of the
                report); None skips it.
            methods: Method name -> `steering.safetensors` (relative paths are read from
                `run_dir`). `none`, the unsteered target, is always added.
            run_dir: Run directory: artifacts are read from it and the report is written to it.
            scoring: How the models are scored (`ScoringConfig`: steered positions, mode,
                calibration, generation budget, batch size, dtype, shared forwards) and how
                many random null draws are scored beside the methods.
            null_seed: Seed of the null's draws (the experiment passes its seed + 1, apart
                from the `random` method's own seed).
            null_reference: Method whose target layers and norm scales the draws copy
                (default `expertsteer` if present, else the first method).
        """
        super().__init__()
        self.scoring = settings_of(ScoringConfig, scoring)
        # A plain dict in the hyperparameters keeps checkpoints loadable with weights_only.
        scoring = asdict(self.scoring)
        self.save_hyperparameters()
        if not methods:
            raise ValueError("methods is empty: name at least one steering.safetensors to test")
        reserved = {NONE, NONE_BIAS, EXPERT, *PROBES.values()} & set(methods)
        reserved |= {name for name in methods if name.startswith(NULL_PREFIX)}
        if reserved:
            raise ValueError(f"method names {sorted(reserved)} are reserved; rename them")
        if null_reference is not None and null_reference not in methods:
            raise ValueError(
                f"null_reference '{null_reference}' is not one of the methods {sorted(methods)}"
            )
        self.steering: dict[str, SteeringVectors] = {}
        self.readings: dict[str, Reading] = {}
        self.null_names: list[str] = []
        self.calibration_cache: dict[Any, dict] = {}
        self.prefix_store = PrefixStore()
        self.target_decoder: CausalLM | None = None
        self.expert_decoder: CausalLM | None = None
        self.task_name = ""
        self.task_type = ""

    # -- setup ---------------------------------------------------------------------------------

    def method_path(self, method: str) -> Path:
        path = Path(self.hparams.methods[method])
        return path if path.is_absolute() else Path(self.hparams.run_dir) / path

    def setup(self, stage: str) -> None:
        """Check the task, the artifacts and the layers, then load the models onto this rank's
        device (the trainer's root device: Lightning moves the module there after `setup`;
        the decoders are no submodules, so they are placed here)."""
        self.preflight(self.trainer.datamodule)
        device = self.trainer.strategy.root_device
        if self.target_decoder is None:
            self.target_decoder = self._load(self.hparams.target, device)
        if self.hparams.expert is not None and self.expert_decoder is None:
            self.expert_decoder = self._load(self.hparams.expert, device)
        for decoder in (self.target_decoder, self.expert_decoder):
            if decoder is not None and decoder.device != device:
                # Loaded under an earlier trainer with another device.
                decoder.hf_model.to(device)

    def preflight(self, datamodule: L.LightningDataModule) -> None:
        """Every check that needs no model: task type and mode, each method's artifact
        (exists, made for this target and task, layers the target has)."""
        task = datamodule.task
        self.task_name, self.task_type = task.name, task.type
        hp = self.hparams
        if task.type == "behaviour":
            # Scored by the BehaviourEvaluator callback: continuations, not answers.
            if self.scoring.mode is not None:
                raise ValueError(f"mode '{self.scoring.mode}' does not apply to behaviour tasks")
        elif task.type not in MODES_BY_TYPE:
            raise ValueError(f"task '{task.name}' of type '{task.type}' has no answers to score")
        mode = self.scoring.mode
        if mode is not None and task.type != "behaviour" and mode not in MODES_BY_TYPE[task.type]:
            raise ValueError(
                f"mode '{mode}' does not apply to {task.type} task '{task.name}'; choose one "
                f"of {MODES_BY_TYPE[task.type]}"
            )
        expect = {
            "target_model_id": hp.target,
            "target_weights_sha256": weights_identity(hp.target),
        }
        num_layers = model_dims(hp.target)[1]
        for method in hp.methods:
            steering = load_steering(self.method_path(method), expect, num_layers)
            made_for = steering.metadata.get("task")
            if made_for is not None and made_for != task.name:
                raise ArtifactError(
                    f"{self.method_path(method)}: method '{method}' was fitted on task "
                    f"'{made_for}', this evaluation is on '{task.name}'"
                )
            self.steering[method] = steering
            if steering.metadata.get("conditioned"):
                self.readings[method] = self._reading(method, steering)
        null_k = self.scoring.null_k
        self.null_names = [f"{NULL_PREFIX}{draw}" for draw in range(null_k)]
        if null_k:
            draws = null_steering(self.steering[self.null_reference], null_k, hp.null_seed)
            self.steering.update(zip(self.null_names, draws, strict=True))

    def _reading(self, method: str, steering: SteeringVectors) -> Reading:
        """A conditioned method's reader (`reader.safetensors` beside its vectors), checked
        against the model that will read: the expert, or the target itself."""
        hp = self.hparams
        reader = steering.metadata["conditioned"].get("reader")
        model = hp.expert if reader == "expert" else hp.target
        if model is None:
            raise ValueError(
                f"method '{method}' reads each input with the expert, but no expert is loaded "
                "(evaluation.headroom: false); turn headroom on"
            )
        path = self.method_path(method).with_name(READER_FILE)
        expect = {"model_id": model, "weights_sha256": weights_identity(model)}
        reading = load_reading(path, expect)
        if reading.metadata.get("position") != "last":
            raise ArtifactError(
                f"{path}: readers read the last prompt token; refit with position last"
            )
        return reading

    @property
    def conditioned_names(self) -> list[str]:
        """The methods whose push is set per input by a reader."""
        return list(self.readings)

    def reader_scores(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Each conditioned method's reading of `examples`: `[N, K]` scores (one capture per
        reading model and block, however many methods share it)."""
        prompts = [render_prompt(self.task_type, example) for example in examples]
        states: dict[tuple[str, int], torch.Tensor] = {}
        scores = {}
        for method, reading in self.readings.items():
            source, layer = reading.metadata["reader"], int(reading.metadata["layer"])
            if (source, layer) not in states:
                decoder = self.expert_decoder if source == "expert" else self.target_decoder
                with self._out_of_memory("reading"):
                    captured = capture(
                        decoder,
                        prompts,
                        [layer],
                        "last",
                        batch_size=self.scoring.batch_size,
                        max_tokens=self.scoring.max_batch_tokens,
                    )
                states[(source, layer)] = captured[layer]
            scores[method] = reading.scores(states[(source, layer)]).cpu()
        return scores

    @property
    def null_reference(self) -> str:
        """The method whose layers and norm scales the null's draws copy."""
        methods = list(self.hparams.methods)
        if self.hparams.null_reference is not None:
            return self.hparams.null_reference
        return MAIN_METHOD if MAIN_METHOD in methods else methods[0]

    @property
    def steered_names(self) -> list[str]:
        """Every steered configuration the evaluator chooses on dev: methods, then null draws."""
        return [*self.hparams.methods, *self.null_names]

    def _load(self, name: str, device: torch.device) -> CausalLM:
        dtype = resolve_dtype(self.scoring.model_dtype, device)
        loaded = load_model(name, dtype=dtype, device=device)
        return CausalLM.from_loaded(loaded, self.scoring.chat_template)

    def _out_of_memory(self, what: str) -> AbstractContextManager[None]:
        """Name the option to lower when scoring runs out of device memory."""
        scoring = self.scoring
        advice = (
            f"lower the evaluation's batch_size (now {scoring.batch_size}), set or lower its "
            f"max_batch_tokens (now {scoring.max_batch_tokens}) or, for the steered grid, "
            f"config_batch (now {scoring.config_batch})"
        )
        return naming_out_of_memory(f"{what} on {self.target_decoder.device}", advice)

    # -- what the evaluator calls --------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.scoring.mode or DEFAULT_MODE[self.task_type]

    def layer_sets(self, method: str, choice: str) -> list[tuple[int, ...]]:
        """Candidate target-layer sets of a method: all its layers together, and with
        `choice='dev'` also each layer alone (the pair is then chosen on dev)."""
        layers = tuple(self.steering[method].layers)
        if choice == "all" or len(layers) == 1:
            return [layers]
        return [layers] + [(layer,) for layer in layers]

    def intervention(
        self,
        method: str,
        alpha: float,
        layers: tuple[int, ...],
        scores: torch.Tensor | None = None,
        c_max: float | None = None,
    ) -> Intervention:
        """A method's intervention; a conditioned method's from its reader's `scores` `[N, K]`
        of the rows to steer, clipped at `c_max`."""
        if method not in self.readings:
            return Intervention.from_steering(
                self.steering[method], alpha, self.scoring.positions, list(layers)
            )
        if scores is None or c_max is None:
            raise ValueError(f"conditioned method '{method}' needs its reader's scores and c_max")
        reading = self.readings[method]
        return conditioned_intervention(
            self.steering[method],
            reading,
            reading.coefficients(scores, c_max),
            alpha,
            self.scoring.positions,
            layers,
            c_max,
        )

    def score(
        self,
        examples: list[Example],
        intervention: Intervention | None = None,
        expert: bool = False,
        key: Any = None,
    ) -> EvalResult:
        """Accuracy of the target (steered by `intervention`) or of the expert on `examples`.

        `key` names the (model, intervention) configuration; calls with the same key share their
        content-free calibration biases (one template per task: scored once, not per batch)."""
        decoder = self.expert_decoder if expert else self.target_decoder
        cache = None if key is None else self.calibration_cache.setdefault((expert, key), {})
        with self._out_of_memory("scoring"):
            return evaluate(
                decoder,
                self.task_type,
                examples,
                intervention,
                calibration_cache=cache,
                **self._scoring_options(),
            )

    def _scoring_options(self) -> dict[str, Any]:
        """The scoring settings `score` and `score_grid` both pass on."""
        scoring = self.scoring
        return {
            "mode": scoring.mode,
            "calibration": scoring.calibration,
            "max_new_tokens": scoring.max_new_tokens,
            "batch_size": scoring.batch_size,
            "max_tokens": scoring.max_batch_tokens,
        }

    def score_grid(
        self, examples: list[Example], interventions: dict[Any, Intervention]
    ) -> dict[Any, EvalResult]:
        """`score` of the target under each configuration (key -> intervention; the keys name
        them as `score`'s `key` does), from shared forwards unless `share_forwards` is off."""
        if not self.scoring.share_forwards:
            return {
                key: self.score(examples, intervention, key=key)
                for key, intervention in interventions.items()
            }
        results = {}
        # Conditioned configurations steer each row's prompt differently: no shared prefix.
        fixed = {k: v for k, v in interventions.items() if not v.conditioned}
        conditioned = {k: v for k, v in interventions.items() if v.conditioned}
        for group, store in ((fixed, self.prefix_store), (conditioned, None)):
            if not group:
                continue
            caches = {key: self.calibration_cache.setdefault((False, key), {}) for key in group}
            with self._out_of_memory("grid scoring"):
                results |= evaluate_grid(
                    self.target_decoder,
                    self.task_type,
                    examples,
                    group,
                    calibration_caches=caches,
                    **self._scoring_options(),
                    store=store,
                    config_batch=self.scoring.config_batch,
                )
        return {key: results[key] for key in interventions}

    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        intervention: Intervention | None = None,
        expert: bool = False,
    ) -> list[str]:
        """Greedy answers of the target (steered by `intervention`) or of the expert."""
        decoder = self.expert_decoder if expert else self.target_decoder
        with self._out_of_memory("generation"):
            return generate_answers(
                decoder,
                prompts,
                intervention,
                max_new_tokens,
                self.scoring.batch_size,
                self.scoring.max_batch_tokens,
            )

    # -- Lightning hooks -----------------------------------------------------------------------

    def transfer_batch_to_device(
        self, batch: list[Example], device: torch.device, dataloader_idx: int
    ) -> list[Example]:
        """Batches are examples (text); the decoders tokenise onto their own device."""
        return batch

    def validation_step(
        self, batch: list[Example], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any]:
        """The unsteered target (and the expert) on this batch; the steered grid runs in the
        `SteeringEvaluator` callback, which receives these results as `outputs`. A behaviour
        task scores nothing here: the `BehaviourEvaluator` continues its prompts."""
        if self.task_type == "behaviour":
            return {}
        with torch.inference_mode():
            outputs = {NONE: self.score(batch, key=NONE)}
            if self.expert_decoder is not None:
                outputs[EXPERT] = self.score(batch, expert=True, key=EXPERT)
        return outputs

    def configure_optimizers(self) -> None:
        """Nothing is trained: the target's weights never change."""
        return None
