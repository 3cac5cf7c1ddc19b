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
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from expertsteer.artifacts import (
    ALIGNMENT_FILE,
    METRICS_FILE,
    PAIRS_FILE,
    STEERING_FILE,
    load_json,
    save_json,
)
from expertsteer.errors import ExpertSteerError
from expertsteer.zoo import DEFAULT_EXPERT, DEFAULT_TARGET

log = logging.getLogger(__name__)

STAGES_FILE = "stages.json"
OBJECTIVES = ("recon", "translate", "recon+translate")
ALIGNMENT_DIRS = {"recon": "", "translate": "translate", "recon+translate": "recon_translate"}
ALIGNMENT_STAGES = {
    "recon": "align",
    "translate": "align_translate",
    "recon+translate": "align_recon_translate",
}


class ExperimentError(ExpertSteerError):
    """An experiment config that cannot run."""


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
"""The methods of the evaluation protocol (SPEC): target-self and expert-derived vectors; every
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
    """Token-level paired corpus (`expertsteer.token_pairs.CorpusConfig` fields; `{}` for the
    defaults, null for none). Needed by `translate` and `select: translatable`; with it, MI is
    estimated on held-out token positions."""
    translate: dict[str, Any] = field(default_factory=dict)
    """Ridge settings of the `translate` objective (`expertsteer.translate.TranslateConfig`)."""


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

    def __post_init__(self) -> None:
        if not self.alphas or any(not math.isfinite(a) or a == 0 for a in self.alphas):
            raise ExperimentError(
                f"evaluation.alphas must be finite and non-zero (zero is `none`), got {self.alphas}"
            )
        if self.null_k < 0:
            raise ExperimentError(f"evaluation.null_k must be >= 0, got {self.null_k}")


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
    data_root: str = "../shared/data/benchmarks"
    """Benchmark files."""
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

    def run_dir(self, task: str) -> Path:
        return Path(self.output_root) / self.name / task.replace("/", "_")

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
    from expertsteer.benchmarks import resolve_task
    from expertsteer.zoo import model_dims

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
    for task in experiment.tasks:
        resolve_task(task)
        settings = experiment.for_task(task)
        if settings.alignment.items not in ("steering", "prompts"):
            raise ExperimentError(
                f"alignment.items must be steering or prompts, got '{settings.alignment.items}'"
            )
        _check_alignment(settings)
        for split in ("steer", "dev", "test"):
            if getattr(settings.splits, split) < 1:
                raise ExperimentError(f"splits.{split} must be >= 1 (task '{task}')")


def _check_alignment(settings: Experiment) -> None:
    """Corpus, ridge and pairing settings, checked by building them (errors name the option)."""
    from expertsteer.mi import PairingConfig
    from expertsteer.token_pairs import CorpusConfig
    from expertsteer.translate import TranslateConfig

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


# -- stage configs ------------------------------------------------------------------------------


def _trainer(experiment: Experiment, run_dir: Path, name: str, **extra: Any) -> dict:
    return {
        "default_root_dir": str(run_dir),
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run_dir / "logs"), "name": name, "version": 0},
        },
        **experiment.trainer,
        **extra,
    }


def _activations(experiment: Experiment, task: str, item_kind: str, corpus: bool = False) -> dict:
    config = {
        "class_path": "PairedActivationDataModule",
        "init_args": {
            "expert": experiment.expert,
            "target": experiment.target,
            "task": task,
            "data_root": experiment.data_root,
            "item_kind": item_kind,
            "position": experiment.position,
            "steer_size": experiment.splits.steer,
            "dev_size": experiment.splits.dev,
            "test_size": experiment.splits.test,
            "seed": experiment.seed,
            "batch_size": experiment.alignment.batch_size,
            "capture_splits": ["steer", "dev"],
        },
    }
    if corpus and experiment.alignment.corpus is not None:
        config["init_args"]["corpus"] = dict(experiment.alignment.corpus)
    return config


def alignment_dir(run_dir: Path, objective: str) -> Path:
    return run_dir / ALIGNMENT_DIRS[objective] if ALIGNMENT_DIRS[objective] else run_dir


def method_dir(run_dir: Path, method: str) -> Path:
    return run_dir if method == MAIN_METHOD else run_dir / "methods" / method


def stage_configs(experiment: Experiment, task: str) -> dict[str, tuple[str, dict, list[str]]]:
    """Stage name -> (LightningCLI subcommand, config, upstream stages), in run order."""
    run_dir = experiment.run_dir(task)
    a = experiment.alignment
    stages: dict[str, tuple[str, dict, list[str]]] = {}
    objectives = sorted(
        {METHODS[m].alignment for m in experiment.methods if METHODS[m].alignment} | {"recon"},
        key=OBJECTIVES.index,
    )
    for objective in objectives:
        name = ALIGNMENT_STAGES[objective]
        trainer = {"max_epochs": a.max_epochs}
        if objective == "translate":
            trainer = {"max_epochs": 1, "enable_checkpointing": False}  # closed form
        else:
            trainer["callbacks"] = [
                {
                    "class_path": "lightning.pytorch.callbacks.EarlyStopping",
                    "init_args": {"monitor": "val/recon_loss", "patience": a.patience},
                },
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "monitor": "val/recon_loss",
                        "save_top_k": 1,
                        "dirpath": str(run_dir / "checkpoints" / name),
                    },
                },
            ]
        model = {
            "objective": objective,
            "lambda_tr": a.lambda_tr,
            "lr": a.lr,
            "output_dir": str(alignment_dir(run_dir, objective)),
            "mi_estimator": a.mi_estimator,
            "mi_rank": a.mi_rank,
            "top_k": a.top_k,
            "window": list(a.window),
            "expert_window": list(a.expert_window),
            "select": a.select,
            "candidates": a.candidates,
            "translate": dict(a.translate),
        }
        if objective != "recon":
            model["pairs_file"] = str(run_dir / PAIRS_FILE)
        config = {
            "seed_everything": experiment.seed,
            "trainer": _trainer(experiment, run_dir, name, **trainer),
            "model": {"class_path": "AlignmentModule", "init_args": model},
            "data": _activations(experiment, task, a.items, corpus=True),
        }
        stages[name] = ("fit", config, [] if objective == "recon" else ["align"])
    r = experiment.rfm
    for method in experiment.methods:
        spec = METHODS[method]
        model = {
            "method": spec.extractor,
            "source": spec.source,
            "space": r.space,
            "pairs_file": str(run_dir / PAIRS_FILE),
            "iterations": r.iterations,
            "ridge": r.ridge,
            "bandwidth_scales": list(r.bandwidth_scales),
            "seed": experiment.seed,
            "output_dir": str(method_dir(run_dir, method)),
        }
        upstream = ["align"]
        if spec.alignment:
            model["alignment_file"] = str(alignment_dir(run_dir, spec.alignment) / ALIGNMENT_FILE)
            upstream.append(ALIGNMENT_STAGES[spec.alignment])
        epochs = r.iterations + 1 if spec.extractor == "rfm" else 1
        config = {
            "seed_everything": experiment.seed,
            "trainer": _trainer(
                experiment,
                run_dir,
                f"vectors_{method}",
                max_epochs=epochs,
                enable_checkpointing=False,
            ),
            "model": {"class_path": "RFMModule", "init_args": model},
            "data": _activations(experiment, task, "steering"),
        }
        stages[f"vectors_{method}"] = ("fit", config, sorted(set(upstream)))
    e = experiment.evaluation
    evaluation = {
        "seed_everything": experiment.seed,
        "trainer": _trainer(
            experiment,
            run_dir,
            "evaluate",
            callbacks=[
                {
                    "class_path": "SteeringEvaluator",
                    "init_args": {
                        "alphas": list(e.alphas),
                        "layer_choice": "dev" if a.select == "dev" else e.layer_choice,
                        "num_samples": e.num_samples,
                        "sample_tokens": e.sample_tokens,
                        "seed": experiment.seed,
                    },
                }
            ],
        ),
        "model": {
            "class_path": "SteeringModule",
            "init_args": {
                "target": experiment.target,
                "expert": experiment.expert if e.headroom else None,
                "methods": {
                    m: str((method_dir(run_dir, m) / STEERING_FILE).relative_to(run_dir))
                    for m in experiment.methods
                },
                "run_dir": str(run_dir),
                "positions": e.positions,
                "mode": e.mode,
                "calibration": e.calibration,
                "max_new_tokens": e.max_new_tokens,
                "batch_size": e.batch_size,
                "null_k": e.null_k,
                # A stream apart from the `random` method's (seeded with the experiment seed).
                "null_seed": experiment.seed + 1,
            },
        },
        "data": {
            "class_path": "TaskExamplesDataModule",
            "init_args": {
                "task": task,
                "data_root": experiment.data_root,
                "steer_size": experiment.splits.steer,
                "dev_size": experiment.splits.dev,
                "test_size": experiment.splits.test,
                "seed": experiment.seed,
                "batch_size": e.batch_size,
            },
        },
    }
    stages["evaluate"] = ("validate", evaluation, [f"vectors_{m}" for m in experiment.methods])
    return stages


def stage_outputs(experiment: Experiment, task: str, stage: str) -> list[Path]:
    run_dir = experiment.run_dir(task)
    if stage == "align":
        return [run_dir / ALIGNMENT_FILE, run_dir / PAIRS_FILE]
    objectives = {name: objective for objective, name in ALIGNMENT_STAGES.items()}
    if stage in objectives:
        return [alignment_dir(run_dir, objectives[stage]) / ALIGNMENT_FILE]
    if stage.startswith("vectors_"):
        return [method_dir(run_dir, stage.removeprefix("vectors_")) / STEERING_FILE]
    return [run_dir / METRICS_FILE]


# -- running ------------------------------------------------------------------------------------


def _fingerprint(text: str, upstream: list[str]) -> str:
    return hashlib.sha256(json.dumps([text, upstream]).encode()).hexdigest()[:16]


def _read_stages(run_dir: Path) -> dict[str, str]:
    path = run_dir / STAGES_FILE
    return load_json(path, "stages")["fingerprints"] if path.is_file() else {}


def plan(experiment: Experiment, task: str) -> list[tuple[str, str, Path, str, bool]]:
    """(stage, subcommand, config path, fingerprint, reuse?) per stage, writing nothing."""
    settings = experiment.for_task(task)
    done = _read_stages(settings.run_dir(task))
    fingerprints: dict[str, str] = {}
    rows = []
    stale: set[str] = set()
    for stage, (command, config, upstream) in stage_configs(settings, task).items():
        text = yaml.safe_dump(config, sort_keys=False)
        fingerprints[stage] = _fingerprint(text, [fingerprints[u] for u in upstream])
        outputs_exist = all(p.is_file() for p in stage_outputs(settings, task, stage))
        reuse = (
            done.get(stage) == fingerprints[stage]
            and outputs_exist
            and not stale.intersection(upstream)
        )
        if not reuse:
            stale.add(stage)
        path = settings.run_dir(task) / "stages" / f"{stage}.yaml"
        rows.append((stage, command, path, fingerprints[stage], reuse))
    return rows


def run_task(experiment: Experiment, task: str, force: bool = False) -> Path:
    """Run (or reuse) every stage of one task; returns the run directory."""
    settings = experiment.for_task(task)
    run_dir = settings.run_dir(task)
    configs = stage_configs(settings, task)
    done = _read_stages(run_dir)
    for stage, command, path, digest, reuse in plan(experiment, task):
        if reuse and not force:
            log.info("[%s] %s: reused (fingerprint %s)", task, stage, digest)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(configs[stage][1], sort_keys=False))
        log.info("[%s] %s: running `expertsteer %s --config %s`", task, stage, command, path)
        started = time.perf_counter()
        done.pop(stage, None)
        save_json(run_dir / STAGES_FILE, {"kind": "stages", "fingerprints": done})
        code = _run_stage(settings, command, path)
        if code != 0:
            why = str(code).removeprefix("expertsteer: error: ")
            raise ExperimentError(
                f"stage '{stage}' of task '{task}' failed ({why}); its config is {path}, "
                f"rerun it alone with `expertsteer {command} --config {path}`"
            )
        done[stage] = digest
        save_json(run_dir / STAGES_FILE, {"kind": "stages", "fingerprints": done})
        log.info("[%s] %s: done in %.1f s", task, stage, time.perf_counter() - started)
    return run_dir


def distributed(experiment: Experiment) -> bool:
    """Whether the stages run on several processes (then each stage gets its own process)."""
    devices = experiment.trainer.get("devices", 1)
    strategy = str(experiment.trainer.get("strategy", "auto"))
    num_nodes = experiment.trainer.get("num_nodes", 1)
    return str(devices) not in ("1", "[0]") or "ddp" in strategy or num_nodes != 1


def _run_stage(experiment: Experiment, command: str, path: Path) -> int | str:
    """Run one stage: in this process on one device; as `python -m expertsteer` when
    distributed, so that Lightning's launcher can re-execute exactly that stage per rank."""
    if distributed(experiment):
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        argv = [sys.executable, "-m", "expertsteer", command, "--config", str(path)]
        return subprocess.run(argv, env=env).returncode
    from expertsteer.cli import main

    try:
        main([command, "--config", str(path)])
    except SystemExit as exit_:
        return exit_.code if exit_.code not in (None, 0) else 0
    return 0


def _pythonpath() -> str:
    """The repository root first, so the stage packages import from any working directory."""
    root = str(Path(__file__).resolve().parents[1])
    rest = os.environ.get("PYTHONPATH")
    return root if not rest else f"{root}{os.pathsep}{rest}"


def run_experiment(experiment: Experiment, force: bool = False) -> dict[str, Path]:
    """Every task of the experiment, in order; task -> run directory."""
    check(experiment)
    return {task: run_task(experiment, task, force) for task in experiment.tasks}
