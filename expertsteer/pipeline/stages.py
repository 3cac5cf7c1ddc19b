"""The stages of one experiment task and how they run: each stage is an ordinary LightningCLI
run (`expertsteer fit|validate --config <stage>.yaml`) whose config is written into
`<run>/stages/`; a stage is reused when its fingerprint (its config text and its upstream
stages' fingerprints) matches `stages.json` and its outputs are byte for byte what it wrote."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
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
from expertsteer.cache import LockedError, file_lock, sha256_file
from expertsteer.data.catalogue import resolve_task
from expertsteer.data.tasks import resolve_data_root
from expertsteer.data.token_pairs import CorpusConfig
from expertsteer.errors import ExpertSteerError
from expertsteer.evaluation.behaviour import BehaviourConfig
from expertsteer.evaluation.choice import ChoiceConfig
from expertsteer.evaluation.evaluate import ScoringConfig
from expertsteer.evaluation.report import ALPHA_FIGURE, AUROC_FIGURE, NULL_FIGURE, REPORT_FILE
from expertsteer.method.align import TrainingConfig
from expertsteer.method.conditioned import READER_FILE
from expertsteer.method.pair import MIConfig, PairingConfig
from expertsteer.method.rfm import VectorsConfig
from expertsteer.method.translate import TranslateConfig
from expertsteer.method.vectors import choice_path
from expertsteer.models.zoo import AUTO_DTYPE
from expertsteer.pipeline.experiment import (
    MAIN_METHOD,
    METHODS,
    Experiment,
    ExperimentError,
    check,
)
from expertsteer.pipeline.lightning_cli import parse_stage_config, run_stage

log = logging.getLogger(__name__)

STAGES_FILE = "stages.json"
ALIGNMENT_DIRS = {"recon": "", "translate": "translate", "recon+translate": "recon_translate"}
ALIGNMENT_STAGES = {
    "recon": "align",
    "translate": "align_translate",
    "recon+translate": "align_recon_translate",
}
"""Alignment objective (`expertsteer.method.align.OBJECTIVES`) -> its stage, in run order:
`recon` first, whose pairs.json the others read."""


# -- stage configs ------------------------------------------------------------------------------


def _init_args(settings: Any, cls: type) -> dict[str, Any]:
    """The fields of settings dataclass `cls`, read from `settings` (a `cls`, or an experiment
    section that extends it), as a stage's init args (YAML values: tuples become lists)."""
    return {f.name: _plain(getattr(settings, f.name)) for f in dataclasses.fields(cls)}


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


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
            "data_root": resolve_data_root(experiment.data_root),
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
        config["init_args"]["corpus"] = _init_args(experiment.alignment.corpus, CorpusConfig)
    # Written only when set: the data module's defaults (no budget, auto) otherwise.
    if experiment.alignment.max_batch_tokens is not None:
        config["init_args"]["max_batch_tokens"] = experiment.alignment.max_batch_tokens
    if experiment.alignment.model_dtype != AUTO_DTYPE:
        config["init_args"]["model_dtype"] = experiment.alignment.model_dtype
    return config


def alignment_dir(run_dir: Path, objective: str) -> Path:
    return run_dir / ALIGNMENT_DIRS[objective] if ALIGNMENT_DIRS[objective] else run_dir


def method_dir(run_dir: Path, method: str) -> Path:
    return run_dir if method == MAIN_METHOD else run_dir / "methods" / method


Stage = tuple[str, dict, list[str]]
"""(LightningCLI subcommand, config, upstream stages) of one stage."""


def stage_configs(experiment: Experiment, task: str) -> dict[str, Stage]:
    """Stage name -> (LightningCLI subcommand, config, upstream stages), in run order."""
    run_dir = experiment.run_dir(task)
    stages: dict[str, Stage] = {}
    for objective in _alignment_objectives(experiment):
        stages[ALIGNMENT_STAGES[objective]] = _alignment_stage(experiment, task, run_dir, objective)
    for method in experiment.methods:
        stages[f"vectors_{method}"] = _vectors_stage(experiment, task, run_dir, method)
    stages["evaluate"] = _evaluation_stage(experiment, task, run_dir)
    return stages


def _alignment_objectives(experiment: Experiment) -> list[str]:
    """The alignment objectives the methods need, `recon` always, in `ALIGNMENT_STAGES` order."""
    return sorted(
        {METHODS[m].alignment for m in experiment.methods if METHODS[m].alignment} | {"recon"},
        key=list(ALIGNMENT_STAGES).index,
    )


def _alignment_trainer(experiment: Experiment, run_dir: Path, objective: str) -> dict:
    """Trainer settings of an alignment stage: trained objectives stop early on the validation
    reconstruction loss and keep their best checkpoint; `translate` is one closed-form epoch."""
    if objective == "translate":
        return {"max_epochs": 1, "enable_checkpointing": False}  # closed form
    a = experiment.alignment
    return {
        "max_epochs": a.max_epochs,
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.EarlyStopping",
                "init_args": {"monitor": "val/recon_loss", "patience": a.patience},
            },
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "monitor": "val/recon_loss",
                    "save_top_k": 1,
                    "dirpath": str(run_dir / "checkpoints" / ALIGNMENT_STAGES[objective]),
                },
            },
        ],
    }


def _alignment_stage(experiment: Experiment, task: str, run_dir: Path, objective: str) -> Stage:
    """The `AlignmentModule` fit of one objective; every objective but `recon` reads the align
    stage's pairs."""
    a = experiment.alignment
    name = ALIGNMENT_STAGES[objective]
    model = {
        "objective": objective,
        "output_dir": str(alignment_dir(run_dir, objective)),
        "training": _init_args(a, TrainingConfig),
        "mi": _init_args(a.mi(), MIConfig),
        "pairing": _init_args(a, PairingConfig),
        "translate": _init_args(a.translate, TranslateConfig),
    }
    if objective != "recon":
        # The pairs are the align stage's; this stage's own selection is informational, so
        # it skips the translatability matrix the align stage already computed.
        model["pairs_file"] = str(run_dir / PAIRS_FILE)
        model["translate"]["matrix"] = False
        if a.select == "translatable":
            model["pairing"]["select"] = "lowest_mi"
    trainer = _alignment_trainer(experiment, run_dir, objective)
    config = {
        "seed_everything": experiment.seed,
        "trainer": _trainer(experiment, run_dir, name, **trainer),
        "model": {"class_path": "AlignmentModule", "init_args": model},
        "data": _activations(experiment, task, a.items, corpus=True),
    }
    return "fit", config, [] if objective == "recon" else ["align"]


def _vectors_stage(experiment: Experiment, task: str, run_dir: Path, method: str) -> Stage:
    """The `VectorsModule` fit of one method, on the align stage's pairs (and its alignment
    objective's map, for an expert method)."""
    r = experiment.rfm
    spec = METHODS[method]
    model = {
        "method": spec.extractor,
        "source": spec.source,
        "pairs_file": str(run_dir / PAIRS_FILE),
        "rfm": _init_args(r, VectorsConfig),
        "seed": experiment.seed,
        "output_dir": str(method_dir(run_dir, method)),
    }
    upstream = ["align"]
    if spec.alignment:
        model["alignment_file"] = str(alignment_dir(run_dir, spec.alignment) / ALIGNMENT_FILE)
        upstream.append(ALIGNMENT_STAGES[spec.alignment])
    if spec.reader:
        model["reader"] = spec.reader
        if experiment.evaluation.reader_block != "paired":
            # Written only when not the default: earlier conditioned runs keep their stages.
            model["reader_block"] = experiment.evaluation.reader_block
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
        "model": {"class_path": "VectorsModule", "init_args": model},
        "data": _activations(experiment, task, "classes" if spec.reader else "steering"),
    }
    return "fit", config, sorted(set(upstream))


def _evaluation_stage(experiment: Experiment, task: str, run_dir: Path) -> Stage:
    """The `validate` run of `SteeringModule` with the `SteeringEvaluator` callback, scoring
    every method's vectors."""
    e = experiment.evaluation
    choice = _init_args(e, ChoiceConfig)
    scoring = _init_args(e, ScoringConfig)
    if scoring["max_batch_tokens"] is None:
        # Written only when set, as the capture's budget: earlier runs keep their fingerprints.
        del scoring["max_batch_tokens"]
    if not any(METHODS[m].reader for m in experiment.methods):
        # Settings of conditioned methods only: runs without them keep their fingerprints.
        del scoring["shuffle_k"], choice["c_max"]
    if experiment.alignment.select == "dev":
        choice["layer_choice"] = "dev"
    callback = {
        "class_path": "SteeringEvaluator",
        "init_args": {"choice": choice, "seed": experiment.seed},
    }
    behaviour = resolve_task(task).type == "behaviour"
    if behaviour:
        callback = {
            "class_path": "BehaviourEvaluator",
            "init_args": {
                "choice": choice,
                "behaviour": _init_args(experiment.behaviour, BehaviourConfig),
                "seed": experiment.seed,
            },
        }
    config = {
        "seed_everything": experiment.seed,
        "trainer": _trainer(
            experiment,
            run_dir,
            "evaluate",
            callbacks=[callback],
        ),
        "model": {
            "class_path": "SteeringModule",
            "init_args": {
                "target": experiment.target,
                "expert": experiment.expert if e.headroom and not behaviour else None,
                "methods": {
                    m: str((method_dir(run_dir, m) / STEERING_FILE).relative_to(run_dir))
                    for m in experiment.methods
                },
                "run_dir": str(run_dir),
                "scoring": scoring,
                # A stream apart from the `random` method's (seeded with the experiment seed).
                "null_seed": experiment.seed + 1,
            },
        },
        "data": {
            "class_path": "TaskExamplesDataModule",
            "init_args": {
                "task": task,
                "data_root": resolve_data_root(experiment.data_root),
                "steer_size": experiment.splits.steer,
                "dev_size": experiment.splits.dev,
                "test_size": experiment.splits.test,
                "seed": experiment.seed,
                "batch_size": e.batch_size,
            },
        },
    }
    return "validate", config, [f"vectors_{m}" for m in experiment.methods]


def stage_outputs(experiment: Experiment, task: str, stage: str) -> list[Path]:
    run_dir = experiment.run_dir(task)
    if stage == "align":
        return [run_dir / ALIGNMENT_FILE, run_dir / PAIRS_FILE]
    objectives = {name: objective for objective, name in ALIGNMENT_STAGES.items()}
    if stage in objectives:
        return [alignment_dir(run_dir, objectives[stage]) / ALIGNMENT_FILE]
    if stage.startswith("vectors_"):
        method = stage.removeprefix("vectors_")
        written = [method_dir(run_dir, method) / STEERING_FILE]
        if METHODS[method].reader:
            written.append(method_dir(run_dir, method) / READER_FILE)
        return written
    return [run_dir / METRICS_FILE]


# -- running ------------------------------------------------------------------------------------


def _fingerprint(text: str, upstream: list[str]) -> str:
    return hashlib.sha256(json.dumps([text, upstream]).encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    """`stages.json`: what each finished stage was run with and what it wrote."""

    fingerprints: dict[str, str] = field(default_factory=dict)
    """Stage -> fingerprint of the config it finished with."""
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    """Stage -> output path (relative to the run directory) -> sha256 when it finished."""

    def forget(self, stage: str) -> None:
        self.fingerprints.pop(stage, None)
        self.outputs.pop(stage, None)

    def intact(self, run_dir: Path, stage: str, paths: list[Path]) -> bool:
        """Whether every output of `stage` is still the file the stage wrote (a truncated,
        edited or replaced file has another checksum)."""
        recorded = self.outputs.get(stage, {})
        return all(
            path.is_file() and recorded.get(_relative(run_dir, path)) == sha256_file(path)
            for path in paths
        )


def _relative(run_dir: Path, path: Path) -> str:
    return str(path.relative_to(run_dir))


def _read_stages(run_dir: Path) -> StageRecord:
    path = run_dir / STAGES_FILE
    if not path.is_file():
        return StageRecord()
    payload = load_json(path, "stages")
    return StageRecord(payload.get("fingerprints", {}), payload.get("outputs", {}))


def _save_stages(run_dir: Path, record: StageRecord) -> None:
    save_json(run_dir / STAGES_FILE, {"kind": "stages", **dataclasses.asdict(record)})


def _data_identity(settings: Experiment, task: str) -> str:
    """The content identity of every task the run reads (its own and the token corpus's)."""
    from expertsteer.data.catalogue import resolve_task
    from expertsteer.data.tasks import data_identity

    names = [task] + (settings.alignment.corpus.tasks if settings.alignment.corpus else [])
    return json.dumps(
        {name: data_identity(resolve_task(name), settings.data_root) for name in names}
    )


def _by_content(config: Any, data: str) -> Any:
    """`config` with every `data_root` replaced by `data`, the content identity of what is read
    there: a stage's fingerprint follows the data, not the spelling of its folder's path."""
    if isinstance(config, dict):
        return {
            key: data if key == "data_root" else _by_content(value, data)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [_by_content(value, data) for value in config]
    return config


def plan(experiment: Experiment, task: str) -> list[tuple[str, str, Path, str, bool]]:
    """(stage, subcommand, config path, fingerprint, reuse?) per stage, writing nothing. A
    stage is reused when its fingerprint matches, its outputs are byte for byte what it wrote
    (sha256 in `stages.json`) and no upstream stage reruns."""
    settings = experiment.for_task(task)
    run_dir = settings.run_dir(task)
    record = _read_stages(run_dir)
    fingerprints: dict[str, str] = {}
    rows = []
    stale: set[str] = set()
    data = _data_identity(settings, task)
    for stage, (command, config, upstream) in stage_configs(settings, task).items():
        text = yaml.safe_dump(_by_content(config, data), sort_keys=False)
        fingerprints[stage] = _fingerprint(text, [fingerprints[u] for u in upstream])
        reuse = (
            record.fingerprints.get(stage) == fingerprints[stage]
            and not stale.intersection(upstream)
            and record.intact(run_dir, stage, stage_outputs(settings, task, stage))
        )
        if not reuse:
            stale.add(stage)
        path = run_dir / "stages" / f"{stage}.yaml"
        rows.append((stage, command, path, fingerprints[stage], reuse))
    return rows


RESULT_FILES = (METRICS_FILE, REPORT_FILE, ALPHA_FIGURE, AUROC_FIGURE, NULL_FIGURE)
"""What the evaluation writes for the vectors it scored: removed before any stage reruns (with
the dev choice recorded beside each method's vectors), so that a failed or killed rerun never
leaves results or figures beside vectors they do not describe."""


def run_task(experiment: Experiment, task: str, force: bool = False) -> Path:
    """Run (or reuse) every stage of one task under the run directory's lock; returns the
    run directory."""
    settings = experiment.for_task(task)
    run_dir = settings.run_dir(task)
    configs = stage_configs(settings, task)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir), log_file(run_dir / "logs" / RUN_LOG):
        rows = plan(experiment, task)
        record = _read_stages(run_dir)
        rerun = [stage for stage, *_, reuse in rows if force or not reuse]
        for stage in rerun:
            record.forget(stage)
        if rerun:
            for name in RESULT_FILES:
                (run_dir / name).unlink(missing_ok=True)
            for steering in [run_dir / STEERING_FILE, *run_dir.glob(f"methods/*/{STEERING_FILE}")]:
                choice_path(steering).unlink(missing_ok=True)
        _save_stages(run_dir, record)
        for number, (stage, command, path, digest, _) in enumerate(rows, 1):
            header = f"[{task} {number}/{len(rows)}] {stage}"
            if stage not in rerun:
                log.info("%s: reused (fingerprint %s)", header, digest)
                continue
            _run_one(settings, task, stage, command, path, configs[stage][1], header)
            outputs = stage_outputs(settings, task, stage)
            record.fingerprints[stage] = digest
            record.outputs[stage] = {_relative(run_dir, o): sha256_file(o) for o in outputs}
            _save_stages(run_dir, record)
    return run_dir


def _run_one(
    settings: Experiment,
    task: str,
    stage: str,
    command: str,
    path: Path,
    config: dict,
    header: str,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log.info("%s: running `expertsteer %s --config %s`", header, command, path)
    started = time.perf_counter()
    code = _run_stage(settings, command, path)
    missing = [str(o) for o in stage_outputs(settings, task, stage) if not o.is_file()]
    if code == 0 and missing:
        code = f"it wrote no {', '.join(missing)}"
    if code != 0:
        why = str(code).removeprefix("expertsteer: error: ")
        raise ExperimentError(
            f"stage '{stage}' of task '{task}' failed ({why}); its config is {path}, "
            f"rerun it alone with `expertsteer {command} --config {path}`"
        )
    log.info("%s: done in %.1f s", header, time.perf_counter() - started)


RUN_LOG = "run.log"


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[None]:
    """Every log line of the block (per-batch detail included) appended to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


LOCK_FILE = "run.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Only one `expertsteer run` per run directory at a time; a second one fails at once."""
    try:
        with file_lock(run_dir / LOCK_FILE, wait=False):
            yield
    except LockedError as error:
        raise ExperimentError(
            f"another `expertsteer run` is working in {run_dir} ({error}); wait for it to "
            "finish, or give this experiment another name or output_root"
        ) from error


def current_metrics(run_dir: Path, alpha_option: bool = False) -> dict:
    """`metrics.json` of a run directory, only if it scored the vectors now there: the
    evaluation finished after every vectors stage and no recorded output has changed since.
    `alpha_option`: the caller takes `--alpha`, which the error then offers."""
    metrics_path = run_dir / METRICS_FILE
    if not (run_dir / STAGES_FILE).is_file():
        log.warning(
            "%s has no %s (stages run by hand): cannot check that %s belongs to its vectors",
            run_dir,
            STAGES_FILE,
            METRICS_FILE,
        )
        return load_json(metrics_path, "metrics")
    record = _read_stages(run_dir)
    changed = [
        stage
        for stage, outputs in record.outputs.items()
        if not record.intact(run_dir, stage, [run_dir / name for name in outputs])
    ]
    if "evaluate" not in record.fingerprints or changed:
        why = (
            f"outputs of {changed} changed since"
            if changed
            else "the last evaluation did not finish"
        )
        raise ExperimentError(
            f"{metrics_path} does not belong to the vectors in {run_dir} ({why}); rerun "
            "`expertsteer run` to evaluate them"
            + (" (or give the strength with --alpha)" if alpha_option else "")
        )
    return load_json(metrics_path, "metrics")


def validate_stage_configs(experiment: Experiment, task: str) -> None:
    """Build and parse every stage config of `task` as its LightningCLI run would (classes
    instantiated, no model loaded), so a bad value fails before the first stage starts."""
    settings = experiment.for_task(task)
    for stage, (_, config, upstream) in stage_configs(settings, task).items():
        try:
            # A stage fed by other stages' files is type-checked, not built, before they exist.
            parse_stage_config(config, build_model=not upstream or stage == "evaluate")
        except ExpertSteerError as error:
            raise ExperimentError(f"task '{task}', stage '{stage}': {error}") from error


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
    try:
        run_stage([command, "--config", str(path)], quiet=True)
    except SystemExit as exit_:
        return exit_.code if exit_.code not in (None, 0) else 0
    return 0


def _pythonpath() -> str:
    """The repository root first, so the stage packages import from any working directory."""
    root = str(Path(__file__).resolve().parents[2])
    rest = os.environ.get("PYTHONPATH")
    return root if not rest else f"{root}{os.pathsep}{rest}"


def run_experiment(experiment: Experiment, force: bool = False) -> dict[str, Path]:
    """Every task of the experiment, in order; task -> run directory. Every stage config of
    every task is parsed first."""
    check(experiment)
    for task in experiment.tasks:
        validate_stage_configs(experiment, task)
    return {task: run_task(experiment, task, force) for task in experiment.tasks}
