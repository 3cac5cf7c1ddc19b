"""One experiment from one YAML: capture -> alignment -> pairing -> vectors -> evaluation ->
report, per task, reusing every stage whose inputs did not change.

Each stage is an ordinary LightningCLI run (`expertsteer fit|validate --config <stage>.yaml`)
whose config this module writes into `<run>/stages/`. The stage runs in its own process, so
`trainer.strategy: ddp` works exactly as it does for a hand-written stage config (Lightning's
launcher re-executes that one command on every rank). A stage's fingerprint is the hash of its
config text and of its upstream stages' fingerprints; `stages.json` records the fingerprint of
every finished stage, and a stage is skipped when its fingerprint matches and its outputs exist.
Change the RFM ridge and only the RFM stages and the evaluation rerun; change the task's split
sizes and everything reruns (the activation cache is fingerprinted separately and reused
whenever the captured items are the same).

Run directory of one task (`<output_root>/<name>/<task>/`):
`alignment.safetensors`, `mi.safetensors`, `pairs.json`, `mi_heatmap.png`, `r2_heatmap.png`
(reconstruction alignment and pairing), `steering.safetensors` (ExpertSteer), `translate/`
(target-tied ridge alignment), `recon_translate/` (recon+translate, when a method uses it),
`methods/<method>/steering.safetensors` (the other methods), `metrics.json`,
`report.md` and figures, `stages/*.yaml` (the exact stage configs), `logs/` (CSV metrics),
`stages.json`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from expertsteer.cache import CACHE_ENV
from expertsteer.errors import ExpertSteerError
from expertsteer.models.zoo import AUTO_DTYPE, DEFAULT_EXPERT, DEFAULT_TARGET, DTYPES

log = logging.getLogger(__name__)


class ExperimentError(ExpertSteerError):
    """An experiment config that cannot run."""


ALPHA_LIMIT = 20.0
"""Largest |alpha| accepted: alpha is a fraction of the mean residual norm, and far beyond a
few norms the steered state is the vector alone (garbage text, then non-finite logits)."""


def _integer(option: str, value: Any, minimum: int) -> None:
    """`value` must be an int (not a bool or float) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ExperimentError(f"{option} must be an integer >= {minimum}, got {value!r}")


def _number(option: str, value: Any, positive: bool = True) -> None:
    """`value` must be a finite real number (> 0 if `positive`, else >= 0)."""
    real = isinstance(value, int | float) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ExperimentError(f"{option} must be a finite number {bound}, got {value!r}")


def _choice(option: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ExperimentError(f"{option} must be one of {list(choices)}, got {value!r}")


def _numbers(option: str, values: Any, positive: bool = True) -> None:
    """A non-empty list of finite numbers."""
    if not isinstance(values, list) or not values:
        raise ExperimentError(f"{option} must be a non-empty list of numbers, got {values!r}")
    for value in values:
        _number(option, value, positive)


@dataclass(frozen=True)
class MethodSpec:
    """How one steering method's vectors are made."""

    extractor: str
    """RFMModule `method`: rfm, mean_diff, pca_diff, logistic or random."""
    source: str
    """Whose states: expert or target."""
    alignment: str | None = None
    """Alignment objective whose encoder maps expert states (expert methods only)."""


METHODS: dict[str, MethodSpec] = {
    "random": MethodSpec("random", "target"),
    "target_mean_diff": MethodSpec("mean_diff", "target"),
    "target_rfm": MethodSpec("rfm", "target"),
    "expert_mean_diff": MethodSpec("mean_diff", "expert", "recon"),
    "expertsteer": MethodSpec("rfm", "expert", "recon"),
    "expert_mean_diff_translate": MethodSpec("mean_diff", "expert", "translate"),
    "expertsteer_translate": MethodSpec("rfm", "expert", "translate"),
    "expert_mean_diff_recon_translate": MethodSpec("mean_diff", "expert", "recon+translate"),
    "expertsteer_recon_translate": MethodSpec("rfm", "expert", "recon+translate"),
}
"""The methods of the evaluation protocol: target-self and expert-derived vectors; every
expert RFM method has a mean-difference twin under the same alignment objective."""
MAIN_METHOD = "expertsteer"


@dataclass
class Splits:
    """Examples per split; the same for capture, fitting and evaluation."""

    steer: int = 200
    """Fitting: auto-encoders, MI, RFM."""
    dev: int = 100
    """Choice of alpha and layers; RFM iteration and bandwidth."""
    test: int = 200
    """Reported once."""

    def __post_init__(self) -> None:
        for split in ("steer", "dev", "test"):
            _integer(f"splits.{split}", getattr(self, split), 1)


@dataclass
class AlignmentSettings:
    """Auto-encoder alignment and MI pairing."""

    max_epochs: int = 60
    """Epoch budget (early stopping on dev reconstruction loss)."""
    patience: int = 6
    """Early-stopping patience in epochs."""
    lr: float = 3e-3
    """AdamW learning rate."""
    batch_size: int = 64
    """Training batch size."""
    max_batch_tokens: int | None = None
    """Token budget of one capture forward (the data module's `max_batch_tokens`; long texts
    make smaller batches): lower it when the capture runs out of device memory. null: none."""
    model_dtype: str = "auto"
    """Dtype the models capture in (every fitting stage's data module): auto (bfloat16 on a
    CUDA device that supports it, else float32), float32, bfloat16 or float16. A CPU with
    native bfloat16 runs the packaged models 2-3x faster in bfloat16 (`benchmarks/
    capture_dtype.py`); each dtype has its own cache entry."""
    lambda_tr: float = 1.0
    """Weight of the translation term (recon+translate)."""
    items: str = "steering"
    """States the auto-encoders and MI use: `steering` (prompt + answer, the same capture as
    the RFM) or `prompts` (prompt only, a second capture)."""
    mi_estimator: str = "gaussian"
    """gaussian or ksg."""
    mi_rank: int = 16
    """PCA rank of the MI estimate."""
    top_k: int = 1
    """Pairs kept."""
    window: list[float] = field(default_factory=lambda: [0.25, 0.75])
    """Target-depth window of the pairs."""
    expert_window: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """Expert-depth window of the pairs."""
    select: str = "lowest_mi"
    """lowest_mi (the paper), translatable (best held-out R^2; needs a corpus) or dev (the
    evaluator chooses among `candidates` lowest-MI pairs on dev)."""
    candidates: int = 4
    """Candidates kept with select: dev."""
    corpus: dict[str, Any] | None = field(default_factory=dict)
    """Token-level paired corpus (`expertsteer.data.token_pairs.CorpusConfig` fields; `{}` for the
    defaults, null for none). Needed by `translate` and `select: translatable`; with it, MI is
    estimated on held-out token positions."""
    translate: dict[str, Any] = field(default_factory=dict)
    """Ridge settings of the `translate` objective
    (`expertsteer.method.translate.TranslateConfig`)."""

    def __post_init__(self) -> None:
        _integer("alignment.max_epochs", self.max_epochs, 1)
        _integer("alignment.patience", self.patience, 0)
        _number("alignment.lr", self.lr)
        _integer("alignment.batch_size", self.batch_size, 1)
        if self.max_batch_tokens is not None:
            _integer("alignment.max_batch_tokens", self.max_batch_tokens, 1)
        _choice("alignment.model_dtype", self.model_dtype, (AUTO_DTYPE, *DTYPES))
        _number("alignment.lambda_tr", self.lambda_tr, positive=False)
        _choice("alignment.items", self.items, ("steering", "prompts"))
        _choice("alignment.mi_estimator", self.mi_estimator, ("gaussian", "ksg"))
        _integer("alignment.mi_rank", self.mi_rank, 1)
        _integer("alignment.top_k", self.top_k, 1)
        _integer("alignment.candidates", self.candidates, 1)
        for option in ("window", "expert_window"):
            values = getattr(self, option)
            _numbers(f"alignment.{option}", values, positive=False)
            if len(values) != 2:
                raise ExperimentError(f"alignment.{option} must be [low, high], got {values!r}")
        if self.corpus is not None and not isinstance(self.corpus, dict):
            raise ExperimentError(
                f"alignment.corpus must be a mapping or null, got {self.corpus!r}"
            )
        if not isinstance(self.translate, dict):
            raise ExperimentError(f"alignment.translate must be a mapping, got {self.translate!r}")


@dataclass
class RFMSettings:
    """Vector extraction (RFM and baselines)."""

    iterations: int = 8
    """RFM iterations T."""
    ridge: float = 1e-3
    """KRR ridge lambda."""
    bandwidth_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    """Bandwidth grid, multiples of the median distance."""
    space: str = "encoded"
    """Expert methods: fit on encoded (default) or raw expert states."""

    def __post_init__(self) -> None:
        _integer("rfm.iterations", self.iterations, 1)
        _number("rfm.ridge", self.ridge)
        _numbers("rfm.bandwidth_scales", self.bandwidth_scales)
        _choice("rfm.space", self.space, ("encoded", "raw"))


@dataclass
class EvalSettings:
    """The validate stage."""

    alphas: list[float] = field(default_factory=lambda: [-0.9, -0.3, -0.1, 0.1, 0.3, 0.9])
    """Steering strengths tried on dev (fractions of the mean residual norm); signed, non-zero."""
    null_k: int = 6
    """Random null draws, each chosen on dev like a method (p vs null >= 1/(K+1))."""
    positions: str = "all"
    """Steered positions."""
    layer_choice: str = "all"
    """all layers together, or dev: also each layer alone, chosen on dev."""
    mode: str | None = None
    """Scoring mode (default per task type)."""
    calibration: str | None = None
    """content_free (default) or none."""
    max_new_tokens: int | None = None
    """Generation budget (default 128 numeric, 16 otherwise)."""
    batch_size: int = 8
    """Prompts per forward."""
    num_samples: int = 3
    """Sample generations in the report."""
    sample_tokens: int = 48
    """Their budget."""
    headroom: bool = True
    """Score the expert too."""
    model_dtype: str = "auto"
    """Dtype the target and expert are scored in: auto (bfloat16 on a CUDA device that
    supports it, else float32), float32, bfloat16 or float16. Every method and control is
    scored in the same dtype."""

    def __post_init__(self) -> None:
        from expertsteer.evaluation.calibration import CALIBRATIONS
        from expertsteer.evaluation.evaluate import SCORE_MODES
        from expertsteer.method.vectors import POSITIONS

        alphas = self.alphas
        real = isinstance(alphas, list) and all(
            isinstance(a, int | float) and not isinstance(a, bool) for a in alphas
        )
        if not real or not alphas or any(not math.isfinite(a) or a == 0 for a in alphas):
            raise ExperimentError(
                "evaluation.alphas must be a non-empty list of finite numbers, each non-zero "
                f"(zero is `none`), got {alphas!r}"
            )
        extreme = [a for a in alphas if abs(a) > ALPHA_LIMIT]
        if extreme:
            raise ExperimentError(
                f"evaluation.alphas {extreme} exceed +-{ALPHA_LIMIT:g}: alpha is a fraction of "
                "the mean residual norm, and at such strengths the target only emits the vector "
                "(garbage text, then non-finite logits); use strengths of a few norms at most"
            )
        _integer("evaluation.null_k", self.null_k, 0)
        _choice("evaluation.model_dtype", self.model_dtype, (AUTO_DTYPE, *DTYPES))
        _choice("evaluation.positions", self.positions, POSITIONS)
        _choice("evaluation.layer_choice", self.layer_choice, ("all", "dev"))
        _choice("evaluation.mode", self.mode, (None, *SCORE_MODES))
        _choice("evaluation.calibration", self.calibration, (None, *CALIBRATIONS))
        if self.max_new_tokens is not None:
            _integer("evaluation.max_new_tokens", self.max_new_tokens, 1)
        _integer("evaluation.batch_size", self.batch_size, 1)
        _integer("evaluation.num_samples", self.num_samples, 0)
        _integer("evaluation.sample_tokens", self.sample_tokens, 1)
        if not isinstance(self.headroom, bool):
            raise ExperimentError(
                f"evaluation.headroom must be true or false, got {self.headroom!r}"
            )


@dataclass
class Experiment:
    """A whole experiment: models, tasks and every stage's settings."""

    name: str = "default"
    """Experiment name: runs go to `<output_root>/<name>/<task>/`."""
    output_root: str = "runs"
    """Folder of all runs."""
    expert: str = DEFAULT_EXPERT
    """Expert model."""
    target: str = DEFAULT_TARGET
    """Target model."""
    tasks: list[str] = field(default_factory=lambda: ["sst2"])
    """Tasks, each a separate run."""
    data_root: str | None = None
    """Benchmark files of built-in tasks (default: `$EXPERTSTEER_DATA`, else
    `../shared/data/benchmarks`; a task whose files are absent reads its hub dataset)."""
    seed: int = 0
    """Split and fit seed."""
    position: str = "last"
    """Sequence-level state: last or mean."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Methods evaluated (see `METHODS`); `none` and the expert are always there."""
    splits: Splits = field(default_factory=Splits)
    alignment: AlignmentSettings = field(default_factory=AlignmentSettings)
    rfm: RFMSettings = field(default_factory=RFMSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    trainer: dict[str, Any] = field(default_factory=lambda: {"accelerator": "cpu", "devices": 1})
    """Trainer settings of every stage (e.g. strategy: ddp, devices: 2)."""
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Task -> settings replacing the above for that task only (e.g. splits, evaluation)."""

    def __post_init__(self) -> None:
        from expertsteer.data.tasks import TASK_NAME

        if not isinstance(self.name, str) or not TASK_NAME.fullmatch(self.name):
            raise ExperimentError(
                f"name {self.name!r} must be letters, digits, '_', '.', '+' or '-' (not starting "
                "with '.'): it names the folder of the runs"
            )
        _choice("position", self.position, ("last", "mean"))
        _integer("seed", self.seed, 0)
        for option in ("tasks", "methods"):
            values = getattr(self, option)
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ExperimentError(f"{option} must be a list of names, got {values!r}")
        for option in ("output_root", "expert", "target"):
            if not isinstance(getattr(self, option), str):
                raise ExperimentError(f"{option} must be a string, got {getattr(self, option)!r}")
        if not isinstance(self.data_root, str | None):
            raise ExperimentError(f"data_root must be a folder or null, got {self.data_root!r}")
        if not isinstance(self.trainer, dict):
            raise ExperimentError(f"trainer must be a mapping, got {self.trainer!r}")
        if not isinstance(self.task_overrides, dict):
            raise ExperimentError(f"task_overrides must be a mapping, got {self.task_overrides!r}")

    def run_dir(self, task: str) -> Path:
        """`<output_root>/<name>/<task name>` (a task YAML's `name`, not its path)."""
        from expertsteer.data.catalogue import resolve_task

        return Path(self.output_root) / self.name / resolve_task(task).name

    def for_task(self, task: str) -> Experiment:
        """This experiment with `task_overrides[task]` applied."""
        overrides = self.task_overrides.get(task, {})
        merged = _merge(dataclasses.asdict(self), overrides)
        merged["task_overrides"] = {}
        return _build(Experiment, merged, "experiment")


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "trainer":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(cls: type, values: dict, where: str) -> Any:
    """A dataclass from a dict, with unknown keys named in the error."""
    if not isinstance(values, dict):
        raise ExperimentError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ExperimentError(f"unknown option(s) {unknown} in {where}; known: {sorted(fields)}")
    kwargs = {}
    nested = {"splits": Splits, "alignment": AlignmentSettings, "rfm": RFMSettings}
    nested["evaluation"] = EvalSettings
    for key, value in values.items():
        if cls is Experiment and key in nested:
            value = (
                value
                if isinstance(value, nested[key])
                else _build(nested[key], value or {}, f"{where}.{key}")
            )
        kwargs[key] = value
    return cls(**kwargs)


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment YAML (unknown options, tasks, models, methods, layers)."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment config not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ExperimentError(f"{path} is not valid YAML: {error}") from error
    experiment = _build(Experiment, values, str(path))
    check(experiment)
    return experiment


def check(experiment: Experiment) -> None:
    """Everything that can be checked without loading a model."""
    from expertsteer.models.zoo import model_dims

    unknown = [m for m in experiment.methods if m not in METHODS]
    if unknown:
        raise ExperimentError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if not experiment.methods:
        raise ExperimentError("methods is empty: name at least one steering method")
    if not experiment.tasks:
        raise ExperimentError("tasks is empty: name at least one task")
    for task in experiment.task_overrides:
        if task not in experiment.tasks:
            raise ExperimentError(f"task_overrides names '{task}', which is not in tasks")
    for name in (experiment.expert, experiment.target):
        model_dims(name)
    run_dirs: dict[Path, str] = {}
    for task in experiment.tasks:
        settings = experiment.for_task(task)
        _check_data(settings, task)
        _check_alignment(settings)
        _check_accelerator(settings.trainer)
        run_dir = settings.run_dir(task)
        if run_dir in run_dirs:
            raise ExperimentError(
                f"tasks '{run_dirs[run_dir]}' and '{task}' have the same name, so one run "
                f"directory ({run_dir}); rename one task"
            )
        run_dirs[run_dir] = task
        _check_writable(run_dir, "output_root")
    _check_writable(_cache_root(), f"the cache (set {CACHE_ENV} to move it)")


def _check_data(settings: Experiment, task: str) -> None:
    """The task's and the token corpus's built-in tasks are readable: local files, or the hub
    when they are absent (one error naming both otherwise, before any model loads)."""
    from expertsteer.data.catalogue import resolve_task
    from expertsteer.data.tasks import data_source

    names = [task]
    if settings.alignment.corpus is not None:
        from expertsteer.data.token_pairs import DEFAULT_CORPUS_TASKS

        names += list(settings.alignment.corpus.get("tasks", DEFAULT_CORPUS_TASKS))
    for name in dict.fromkeys(names):
        data_source(resolve_task(name), settings.data_root)


def _check_accelerator(trainer: dict[str, Any]) -> None:
    """`accelerator: gpu` on a machine without one fails here, not after the first stage."""
    import torch

    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ExperimentError(
            f"trainer.accelerator is '{accelerator}' but no CUDA GPU is visible here; set "
            "trainer.accelerator: cpu (or auto)"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ExperimentError("trainer.accelerator is 'mps' but MPS is not available here")


def _cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "expertsteer"


def _check_writable(path: Path, option: str) -> None:
    """The nearest existing folder of `path` must be writable (checked before any stage)."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ExperimentError(
            f"cannot write {path}: {existing} is not a writable folder; change {option} or "
            "the folder's permissions"
        )


def _check_alignment(settings: Experiment) -> None:
    """Corpus, ridge and pairing settings, checked by building them (errors name the option)."""
    from expertsteer.data.token_pairs import CorpusConfig
    from expertsteer.method.pair import PairingConfig
    from expertsteer.method.translate import TranslateConfig

    a = settings.alignment
    for name, cls, values in (
        ("corpus", CorpusConfig, a.corpus),
        ("translate", TranslateConfig, a.translate),
    ):
        if values is None:
            continue
        try:
            cls(**values)
        except (TypeError, ValueError) as error:
            raise ExperimentError(f"alignment.{name}: {error}") from error
    try:
        PairingConfig(
            top_k=a.top_k,
            window=tuple(a.window),
            select=a.select,
            candidates=a.candidates,
            expert_window=tuple(a.expert_window),
        )
    except ValueError as error:
        raise ExperimentError(f"alignment: {error}") from error
    needs_corpus = [m for m in settings.methods if METHODS[m].alignment == "translate"]
    if a.corpus is None and (needs_corpus or a.select == "translatable"):
        raise ExperimentError(
            f"methods {needs_corpus} / select '{a.select}' need the token-level corpus: set "
            "alignment.corpus ({} for the defaults)"
        )
