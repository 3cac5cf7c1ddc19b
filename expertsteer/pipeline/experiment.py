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

import contextlib
import copy
import dataclasses
import logging
import os
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from expertsteer.cache import CACHE_ENV
from expertsteer.data.token_pairs import CorpusConfig
from expertsteer.errors import ExpertSteerError
from expertsteer.evaluation.behaviour import BehaviourConfig
from expertsteer.evaluation.choice import ChoiceConfig
from expertsteer.evaluation.evaluate import ModelDtype, ScoringConfig
from expertsteer.method.align import TrainingConfig
from expertsteer.method.conditioned import READER_BLOCKS, READER_FOLDS
from expertsteer.method.pair import Estimator, MIConfig, PairingConfig
from expertsteer.method.rfm import VectorsConfig
from expertsteer.method.translate import TranslateConfig
from expertsteer.models.batching import check_budget
from expertsteer.models.zoo import DEFAULT_EXPERT, DEFAULT_TARGET
from expertsteer.settings import check_bool, check_choice, check_choices, check_integer

log = logging.getLogger(__name__)


class ExperimentError(ExpertSteerError):
    """An experiment config that cannot run."""


@contextlib.contextmanager
def _options(prefix: str = "") -> Iterator[None]:
    """A settings error (ValueError) raised in the block as an `ExperimentError`, its option
    named with the experiment section it belongs to (`rfm.` + `iterations must be ...`)."""
    try:
        yield
    except ValueError as error:
        raise ExperimentError(f"{prefix}{error}") from error


@dataclass(frozen=True)
class MethodSpec:
    """How one steering method's vectors are made."""

    extractor: str
    """VectorsModule `method`: rfm, mean_diff, pca_diff, logistic or random."""
    source: str
    """Whose states: expert or target."""
    alignment: str | None = None
    """Alignment objective whose encoder maps expert states (expert methods only)."""
    reader: str | None = None
    """Conditioned steering (`expertsteer.method.conditioned`): whose states set each input's
    push, `expert` or `target`; its vectors are fitted on class items. None: a fixed vector."""


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
    "expert_conditioned": MethodSpec("mean_diff", "expert", "recon", reader="expert"),
    "expert_conditioned_translate": MethodSpec("mean_diff", "expert", "translate", reader="expert"),
    "expert_conditioned_gate": MethodSpec("mean_diff", "target", reader="expert"),
    "target_conditioned": MethodSpec("mean_diff", "target", reader="target"),
}
"""The methods of the evaluation protocol: target-self and expert-derived vectors; every
expert RFM method has a mean-difference twin under the same alignment objective. The
conditioned methods (yes/no and classification tasks) push each input by the expert's reading
of it, along the mapped expert direction (recon, translate) or the target's own (`gate`);
`target_conditioned` reads with the target itself (the control of what it already knows)."""
FIXED_METHODS = [name for name, spec in METHODS.items() if spec.reader is None]
"""The fixed-vector methods: the default method list (conditioned ones are asked by name)."""
CONDITIONED_TASK_TYPES = ("yesno", "classification")
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
        with _options("splits."):
            for split in ("steer", "dev", "test"):
                check_integer(split, getattr(self, split), 1)


@dataclass(frozen=True)
class AlignmentSettings(PairingConfig, TrainingConfig):
    """Auto-encoder alignment and MI pairing: the alignment stages' training
    (`TrainingConfig`) and pairing (`PairingConfig`) settings, their MI estimate and token
    corpus, and the trainer and capture settings of every fitting stage."""

    max_epochs: int = 60
    """Epoch budget (early stopping on dev reconstruction loss)."""
    patience: int = 6
    """Early-stopping patience in epochs."""
    lr: float = 3e-3
    """AdamW learning rate (the experiment's default; the stage's is 1e-3)."""
    batch_size: int = 64
    """Training batch size."""
    max_batch_tokens: int | None = None
    """Token budget of one capture forward (the data module's `max_batch_tokens`; long texts
    make smaller batches): lower it when the capture runs out of device memory. null: none."""
    model_dtype: ModelDtype = "auto"
    """Dtype the models capture in (every fitting stage's data module): auto (bfloat16 on a
    CUDA device that supports it, else float32), float32, bfloat16 or float16. A CPU with
    native bfloat16 runs the packaged models 2-3x faster in bfloat16 (`benchmarks/
    capture_dtype.py`); each dtype has its own cache entry."""
    items: Literal["steering", "prompts"] = "steering"
    """States the auto-encoders and MI use: `steering` (prompt + answer, the same capture as
    the RFM) or `prompts` (prompt only, a second capture)."""
    mi_estimator: Estimator = "gaussian"
    """`MIConfig.estimator`: gaussian or ksg."""
    mi_rank: int = 16
    """`MIConfig.mi_rank`: PCA rank of the MI estimate."""
    corpus: CorpusConfig | None = field(default_factory=CorpusConfig)
    """Token-level paired corpus (`CorpusConfig`; `{}` for the defaults, null for none).
    Needed by `translate` and `select: translatable`; with it, MI is estimated on held-out
    token positions."""
    translate: TranslateConfig = field(default_factory=TranslateConfig)
    """Ridge settings of the `translate` objective (`TranslateConfig`)."""

    def __post_init__(self) -> None:
        with _options("alignment."):
            TrainingConfig.__post_init__(self)
            PairingConfig.__post_init__(self)
            check_choices(self)
            check_integer("max_epochs", self.max_epochs, 1)
            check_integer("patience", self.patience, 0)
            check_integer("batch_size", self.batch_size, 1)
            check_budget("max_batch_tokens", self.max_batch_tokens)
            self.mi()
            if not isinstance(self.corpus, CorpusConfig | None):
                raise ValueError(f"corpus must be a mapping or null, got {self.corpus!r}")
            if not isinstance(self.translate, TranslateConfig):
                raise ValueError(f"translate must be a mapping, got {self.translate!r}")

    def mi(self) -> MIConfig:
        """The MI estimate of the alignment stages."""
        return MIConfig(estimator=self.mi_estimator, mi_rank=self.mi_rank)


@dataclass(frozen=True)
class EvalSettings(ChoiceConfig, ScoringConfig):
    """The validate stage: how the target is scored (`ScoringConfig`), the dev grid and the
    report (`ChoiceConfig`), and whether the expert is scored too."""

    null_k: int = 6
    """Random null draws, each chosen on dev like a method (p vs null >= 1/(K+1)); the
    experiment's default (the stage's is 0)."""
    headroom: bool = True
    """Score the expert too."""
    reader_block: str = "paired"
    """Where conditioned methods read each input (`expertsteer.method.conditioned`):
    `paired` (the expert at the pair's expert block, the target at its steered block) or
    `best` (each reader's model at the block whose reading classifies the steer split best in
    5-fold cross-validation)."""

    def __post_init__(self) -> None:
        with _options("evaluation."):
            ChoiceConfig.__post_init__(self)
            ScoringConfig.__post_init__(self)
            check_bool("headroom", self.headroom)
            check_choice("reader_block", self.reader_block, READER_BLOCKS)


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
    position: Literal["last", "mean"] = "last"
    """Sequence-level state: last or mean."""
    methods: list[str] = field(default_factory=lambda: list(FIXED_METHODS))
    """Methods evaluated (see `METHODS`); `none` and the expert are always there."""
    splits: Splits = field(default_factory=Splits)
    """Examples per split."""
    alignment: AlignmentSettings = field(default_factory=AlignmentSettings)
    """Alignment and pairing, and the capture of every fitting stage."""
    rfm: VectorsConfig = field(default_factory=VectorsConfig)
    """Vector extraction (RFM and baselines), for every method."""
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    """The evaluation stage."""
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    """Behaviour tasks' continuations and dev rule (their alphas, null_k, layer_choice and
    n_boot come from `evaluation`)."""
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
        with _options():
            check_choices(self)
            check_integer("seed", self.seed, 0)
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


def _build(cls: type, values: dict, where: str, prefix: str = "") -> Any:
    """A settings dataclass from a dict, nested settings (a field typed with a dataclass)
    built from their dicts, with unknown keys named in the error. A setting's error names it
    after its section (`prefix`): a section of the experiment under its own key, the settings
    nested in a section under the section's key (their messages name them: `corpus.size`)."""
    if not isinstance(values, dict):
        raise ExperimentError(f"{where} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ExperimentError(f"unknown option(s) {unknown} in {where}; known: {known}")
    kwargs = {}
    for key, value in values.items():
        nested, optional = _settings_class(hints[key])
        if nested is None or isinstance(value, nested) or (value is None and optional):
            kwargs[key] = value
            continue
        section = f"{key}." if cls is Experiment else prefix
        value = {} if value is None else value
        kwargs[key] = _build(nested, value, f"{where}.{key}", section)
    with _options(prefix):
        return cls(**kwargs)


def _settings_class(annotation: Any) -> tuple[type | None, bool]:
    """The dataclass an annotation names (`X` or `X | None`), and whether None is allowed."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        classes = [arg for arg in args if dataclasses.is_dataclass(arg)]
        return (classes[0] if classes else None), type(None) in args
    return (annotation if dataclasses.is_dataclass(annotation) else None), False


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment YAML (unknown options, tasks, models, methods, layers)."""
    path = Path(path)
    if path.is_dir():
        raise ExperimentError(f"experiment config {path} is a directory; name the YAML file")
    if not path.is_file():
        raise ExperimentError(f"experiment config not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ExperimentError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); re-save it as UTF-8"
        ) from None
    except yaml.YAMLError as error:
        raise ExperimentError(f"{path} is not valid YAML: {error}") from error
    if not values:
        # An empty file would silently plan the whole default experiment.
        raise ExperimentError(
            f"{path} is empty: an experiment names at least its tasks (see "
            "configs/experiments/default.yaml)"
        )
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
        _check_conditioned(settings, task)
        _check_data(settings, task)
        _check_corpus(settings)
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


def _check_conditioned(settings: Experiment, task: str) -> None:
    """Conditioned methods need a task whose items have classes, and the expert reader needs
    the expert loaded in the evaluation."""
    from expertsteer.data.catalogue import resolve_task

    conditioned = [m for m in settings.methods if METHODS[m].reader]
    if not conditioned:
        return
    spec = resolve_task(task)
    task_type = spec.type
    classes = len(spec.labels) if spec.labels else 2
    least = 2 * READER_FOLDS * classes
    if settings.evaluation.reader_block == "best" and settings.splits.steer < least:
        # Checked again on the steer split itself; this catches the plainly too small before
        # the capture (room for uneven classes).
        raise ExperimentError(
            f"evaluation.reader_block: best chooses each reader's block by {READER_FOLDS}-fold "
            f"cross-validation on the steer split: {settings.splits.steer} steer items are too "
            f"few for task '{task}' ({classes} classes; give at least {least}) "
            "or use reader_block: paired"
        )
    if task_type not in CONDITIONED_TASK_TYPES:
        raise ExperimentError(
            f"methods {conditioned} read the item's class, but task '{task}' is a {task_type} "
            f"task; conditioned steering needs one of {CONDITIONED_TASK_TYPES} (use "
            "task_overrides to leave them out for this task)"
        )
    expert_read = [m for m in conditioned if METHODS[m].reader == "expert"]
    if expert_read and not settings.evaluation.headroom:
        raise ExperimentError(
            f"methods {expert_read} read each input with the expert during the evaluation; "
            "set evaluation.headroom: true"
        )


def _check_data(settings: Experiment, task: str) -> None:
    """The task's and the token corpus's built-in tasks are readable: local files, or the hub
    when they are absent (one error naming both otherwise, before any model loads)."""
    from expertsteer.data.catalogue import resolve_task
    from expertsteer.data.tasks import data_source

    names = [task]
    if settings.alignment.corpus is not None:
        names += settings.alignment.corpus.tasks
    for name in dict.fromkeys(names):
        data_source(resolve_task(name), settings.data_root)


def split_plan(settings: Experiment, task: str) -> list[str]:
    """What the task's splits really hold, before any work: sizes against those asked, rows
    left out as duplicates, and each split the data cannot fill (an impossible split raises
    the `TaskError` the run would)."""
    from expertsteer.data.catalogue import resolve_task
    from expertsteer.data.splits import SPLITS, SplitSizes, make_splits, split_shortfalls
    from expertsteer.data.tasks import load_task

    loaded = load_task(resolve_task(task), settings.data_root)
    sizes = SplitSizes(settings.splits.steer, settings.splits.dev, settings.splits.test)
    splits = make_splits(loaded, sizes, settings.seed)
    held = ", ".join(f"{name} {len(splits[name])}/{getattr(sizes, name)}" for name in SPLITS)
    lines = [f"{task}: splits (held/asked) {held}"]
    return lines + [f"{task}: warning: {line}" for line in split_shortfalls(task, splits, sizes)]


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


def _check_corpus(settings: Experiment) -> None:
    """The methods and pairing that need the token-level corpus have one."""
    a = settings.alignment
    needs_corpus = [m for m in settings.methods if METHODS[m].alignment == "translate"]
    if a.corpus is None and (needs_corpus or a.select == "translatable"):
        raise ExperimentError(
            f"methods {needs_corpus} / select '{a.select}' need the token-level corpus: set "
            "alignment.corpus ({} for the defaults)"
        )
