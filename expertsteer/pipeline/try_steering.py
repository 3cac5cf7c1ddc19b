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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from expertsteer.artifacts import METRICS_FILE, STEERING_FILE
from expertsteer.errors import ExpertSteerError
from expertsteer.method.steer import Intervention, steered_generate
from expertsteer.method.vectors import check_alpha, load_steering
from expertsteer.models.causal_lm import CausalLM
from expertsteer.pipeline.experiment import MAIN_METHOD, METHODS
from expertsteer.pipeline.stages import current_metrics, method_dir

log = logging.getLogger(__name__)


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
        if steering.metadata.get("conditioned"):
            # Its push needs the reader run on each prompt first (not wired into generate yet).
            raise ExpertSteerError(
                f"method '{method}' is input-dependent (its push is read from each prompt); "
                "`generate --steer` supports fixed-vector methods only for now"
            )
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
        if decoder is None:
            from expertsteer.models.zoo import load_model

            target = steering.metadata["target_model_id"]
            decoder = CausalLM.from_loaded(load_model(target))
        intervention = Intervention.from_steering(steering, alpha, positions, layers)
        return cls(decoder, intervention, method, float(alpha))

    def compare(self, prompts: list[str], max_new_tokens: int = 48) -> list[tuple[str, str]]:
        """(unsteered, steered) greedy continuation of each prompt."""
        plain = steered_generate(self.decoder, prompts, None, max_new_tokens)
        steered = steered_generate(self.decoder, prompts, self.intervention, max_new_tokens)
        return list(zip(plain, steered, strict=True))


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
