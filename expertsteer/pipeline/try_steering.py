"""Try a run's steering vectors on your own prompts: unsteered and steered continuations.

    from expertsteer.pipeline.try_steering import RunSteering

    steering = RunSteering.load("runs/default/sst2", method="expertsteer")
    for unsteered, steered in steering.compare(["The film was"], max_new_tokens=32):
        print(unsteered, "|", steered)

The strength, layers and positions default to the ones chosen on dev, which the evaluation
records beside the vectors (`steering.choice.json`, `expertsteer.method.vectors.write_choice`;
a run evaluated before that falls back to `metrics.json`, refused when it no longer describes
the run's vectors); an explicit `alpha` steers the method's dev-chosen layers, or all its
layers when nothing records a choice.

A conditioned method (`expert_conditioned*`, `target_conditioned`;
`expertsteer.method.conditioned`) first reads each prompt with its reader (the expert, or the
target itself) at the reader's block and pushes each prompt by its own coefficient c(x),
clipped at the c_max chosen on dev. Its reader was fitted on the task's rendered prompts, so
give prompts in the task's format (`expertsteer tasks --check` shows it) for a meaningful c(x).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from expertsteer.artifacts import METRICS_FILE, STEERING_FILE, ArtifactError
from expertsteer.errors import ExpertSteerError
from expertsteer.method.conditioned import (
    READER_FILE,
    Reading,
    conditioned_intervention,
    load_reading,
)
from expertsteer.method.steer import Intervention, steered_generate
from expertsteer.method.vectors import check_alpha, load_steering
from expertsteer.models.causal_lm import CausalLM
from expertsteer.pipeline.experiment import MAIN_METHOD, METHODS
from expertsteer.pipeline.stages import current_metrics, method_dir

log = logging.getLogger(__name__)


@dataclass
class PromptReader:
    """A conditioned method's reader: reads each prompt and gives its push coefficients."""

    reading: Reading
    """The read-out fitted on the steer split (`reader.safetensors`)."""
    decoder: CausalLM
    """The model that reads (the expert, or the target itself)."""
    c_max: float
    """Clip bound of the coefficients, chosen on dev."""

    def coefficients(self, prompts: list[str]) -> torch.Tensor:
        """`[N, K]` push coefficients of `prompts`: one forward of the reader per prompt."""
        from expertsteer.models.capture import capture

        layer = int(self.reading.metadata["layer"])
        states = capture(self.decoder, prompts, [layer], "last")[layer]
        return self.reading.coefficients(self.reading.scores(states), self.c_max)


@dataclass
class RunSteering:
    """One method's vectors of a run, at a strength, on the run's target model."""

    decoder: CausalLM
    """The target model."""
    intervention: Intervention
    """What is added where."""
    method: str
    """Method whose vectors steer."""
    alpha: float
    """Strength (a fraction of the mean residual norm of each steered block)."""
    reader: PromptReader | None = None
    """A conditioned method's reader (None: the same push for every prompt); `intervention`
    then holds the steer split's mean coefficient, and `compare` reads each prompt's own."""

    @property
    def layers(self) -> list[int]:
        return sorted(self.intervention.vectors)

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        method: str = MAIN_METHOD,
        alpha: float | None = None,
        decoder: CausalLM | None = None,
    ) -> RunSteering:
        """The vectors of `method` in `run_dir`; `decoder` reuses a loaded target."""
        run = Path(run_dir)
        if alpha is not None:
            try:
                alpha = check_alpha(alpha)
            except ValueError as error:
                raise ExpertSteerError(str(error)) from None
        if method not in METHODS:
            raise ExpertSteerError(f"unknown method '{method}'; choose from {list(METHODS)}")
        path = method_dir(run, method) / STEERING_FILE
        if not path.is_file():
            present = [m for m in METHODS if (method_dir(run, m) / STEERING_FILE).is_file()]
            raise ExpertSteerError(
                f"{path} does not exist: {run} has no vectors of method '{method}' "
                f"(methods with vectors there: {present or 'none'})"
            )
        steering = load_steering(path)
        choice = steering.choice
        if choice is None and (run / METRICS_FILE).is_file():
            # A run evaluated before the vectors recorded their choice: read metrics.json.
            choice = _dev_choice(run, method, required=alpha is None)
        if alpha is None and choice is None:
            raise ExpertSteerError(
                f"{path} records no chosen alpha and {run} has no current {METRICS_FILE}; "
                "give --alpha (a fraction of each layer's mean residual norm, e.g. 0.3)"
            )
        layers, positions = None, "all"
        if choice is not None:
            layers, positions = choice["layers"], choice["positions"]
            if alpha is None:
                alpha = float(choice["alpha"])
                log.info("alpha %g on layers %s: chosen on dev", alpha, layers)
        conditioned = steering.metadata.get("conditioned")
        reading = None
        if conditioned:
            # Checked before any model loads: the reader file, and the clip bound chosen on dev.
            reading = _reading(path.with_name(READER_FILE), method)
            if choice is None or choice.get("c_max") is None:
                raise ExpertSteerError(
                    f"{path} records no c_max chosen on dev: evaluate the run first "
                    "(`expertsteer run`) so that the input-dependent method has its choice"
                )
        if decoder is None:
            target = steering.metadata["target_model_id"]
            decoder = _decoder(target)
        reader = None
        if reading is not None:
            same = conditioned.get("reader") == "target"
            model = decoder if same else _decoder(reading.metadata["model_id"])
            reader = PromptReader(reading, model, float(choice["c_max"]))
            layers = layers if layers is not None else steering.layers
            reference = reading.reference(reader.c_max)
            intervention = conditioned_intervention(
                steering, reading, reference[None], float(alpha), positions, layers, reader.c_max
            )
        else:
            intervention = Intervention.from_steering(steering, alpha, positions, layers)
        return cls(decoder, intervention, method, float(alpha), reader)

    def steered_by(self, prompts: list[str]) -> Intervention:
        """The intervention of `prompts`: the fixed one, or each prompt's own push."""
        if self.reader is None:
            return self.intervention
        coefficients = self.reader.coefficients(prompts)
        for prompt, row in zip(prompts, coefficients.tolist(), strict=True):
            log.info("c(x) = %s for %r", [round(c, 3) for c in row], prompt[:60])
        return replace(self.intervention, coefficients=coefficients)

    def compare(self, prompts: list[str], max_new_tokens: int = 48) -> list[tuple[str, str]]:
        """(unsteered, steered) greedy continuation of each prompt."""
        plain = steered_generate(self.decoder, prompts, None, max_new_tokens)
        intervention = self.steered_by(prompts)
        steered = steered_generate(self.decoder, prompts, intervention, max_new_tokens)
        return list(zip(plain, steered, strict=True))


def _decoder(model_id: str) -> CausalLM:
    from expertsteer.models.zoo import load_model

    return CausalLM.from_loaded(load_model(model_id))


def _reading(path: Path, method: str) -> Reading:
    if not path.is_file():
        raise ExpertSteerError(
            f"{path} does not exist: method '{method}' is input-dependent and needs its "
            "reader beside its vectors (rerun its vectors stage)"
        )
    try:
        return load_reading(path)
    except ArtifactError as error:
        raise ExpertSteerError(str(error)) from None


def _dev_choice(run: Path, method: str, required: bool) -> dict | None:
    """alpha, layers and positions chosen on dev for `method` according to `metrics.json`
    (runs evaluated before the vectors recorded their choice); None when not `required` and
    the run has no current metrics."""
    if not required and not (run / METRICS_FILE).is_file():
        return None
    try:
        metrics = current_metrics(run, alpha_option=True)
    except ExpertSteerError:
        if required:
            raise
        log.warning("%s is stale: steering every layer of the vectors", run / METRICS_FILE)
        return None
    entry = metrics["methods"].get(method)
    if entry is None:
        if required:
            raise ExpertSteerError(
                f"{run / METRICS_FILE} has no dev choice for method '{method}'; give --alpha"
            )
        return None
    return {"alpha": entry["alpha"], "layers": entry["layers"], "positions": metrics["positions"]}
