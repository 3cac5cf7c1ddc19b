"""Tasks: raw benchmark rows -> `Example`s with a prompt, options or a gold answer, and a type.

A task is described by a `TaskSpec`: where the rows come from (local files read through the
`datasets` builders, or a hub dataset id when online), how fields map onto an example, and the
task type. Built-in benchmarks (`expertsteer.data.catalogue`) are specs too; a user-defined task is
a YAML file with the same keys and needs no code.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertsteer.cache import sha256_file
from expertsteer.errors import ExpertSteerError

log = logging.getLogger(__name__)

TASK_TYPES = ("choice", "yesno", "classification", "numeric", "concept", "behaviour")
BEHAVIOUR_POOLS = ("concept", "prompts")
"""Pools of a behaviour task: labelled concept texts (fitting) and unlabelled prompts (scoring)."""
ANSWER_FORMATS = ("index", "index1", "letter", "text", "number", "label")
LETTERS = "ABCDEFGHIJ"
# A task name names a run directory: no separators, no leading dot (`..` would escape it).
TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}


DATA_ENV = "EXPERTSTEER_DATA"
DEFAULT_DATA_ROOT = "../shared/data/benchmarks"


class TaskError(ExpertSteerError):
    """A task definition or its data is unusable."""


class MissingFieldError(ValueError):
    """A row has no value (or an empty one) for a field the task reads."""

    def __init__(self, field_path: str) -> None:
        super().__init__(f"field '{field_path}' is missing or empty")
        self.field = field_path


@dataclass(frozen=True)
class Example:
    """One evaluation or steering item."""

    id: str
    """Stable identifier, unique within the task."""
    question: str
    """Question, instruction or (for concept sets) the text itself."""
    choices: tuple[str, ...] = ()
    """Option texts or label words; empty for numeric tasks."""
    answer: float | int | None = None
    """Index into `choices`, the numeric gold answer, or the concept label (0/1)."""
    context: str = ""
    """Passage shown before the question, if any."""
    instruction: str = ""
    """Task instruction shown on the line before the question ("What is the sentiment of this
    movie review?"); kept apart from the item's content so that calibration prompts can blank
    the content and keep the instruction."""


@dataclass
class FieldMap:
    """Which raw field holds each part of an example (dotted paths reach nested fields)."""

    question: str = "question"
    """Field of the question / instruction / text."""
    context: str | None = None
    """Field of a passage shown before the question."""
    choices: str | list[str] | None = None
    """A field holding a list of options, or a list of fields, one option each."""
    answer: str = "answer"
    """Field of the gold answer (see `TaskSpec.answer_format`)."""
    id: str | None = None
    """Field of a unique id; default: the row's position in its file."""


@dataclass
class TaskSpec:
    """Where a task's rows come from and how they become examples."""

    name: str
    """Task name used in configs and reports."""
    type: str
    """One of choice, yesno, classification, numeric, concept, behaviour."""
    files: dict[str, list[str]] = field(default_factory=dict)
    """Pool name (e.g. train, test) -> local files; relative paths resolve against data_root."""
    hub: dict[str, Any] | None = None
    """Hub dataset: {path, name (optional), splits: {pool: hub split}}; used when no files."""
    format: str | None = None
    """datasets builder (json, csv, parquet, text); default: from the file suffix."""
    read_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the datasets builder (e.g. delimiter, encoding)."""
    fields: FieldMap = field(default_factory=FieldMap)
    """Field mapping of a raw row."""
    answer_format: str = "index"
    """index (0-based), index1 (1-based), letter (A..), text (an option), number, label."""
    labels: list[str] | None = None
    """Label words of yesno / classification tasks, in index order."""
    label_values: list[Any] | None = None
    """Raw answer values matching `labels` one to one, when the data does not use the words."""
    instruction: str | None = None
    """Text placed before every question."""
    row_parser: str | None = None
    """Name of a built-in row converter for layouts a field map cannot express."""
    pool_loader: str | None = None
    """Name of a built-in reader for files the datasets builders cannot read as rows."""
    loader_options: dict[str, Any] = field(default_factory=dict)
    """Parameters of the pool loader (e.g. MMLU subjects, generator count and seed)."""
    scorer: str | None = None
    """Behaviour tasks: how a continuation is scored for the concept (`sentiment`,
    `python_code`, `keywords` or `callable`, see `expertsteer.evaluation.scorers`)."""
    scorer_options: dict[str, Any] = field(default_factory=dict)
    """Parameters of the scorer (keywords: `words`, `patterns`; callable: `function`)."""
    skip_unanswered: bool = False
    """Drop rows whose answer field is empty (counted in the log) instead of failing."""
    hub_fallback: TaskSpec | None = field(default=None, repr=False, compare=False)
    """Built-in tasks: the same task read from its hub dataset (a spec in the hub's schema),
    used when the local files are absent and the hub is reachable. Not a task YAML key."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TASK_NAME.fullmatch(self.name):
            raise TaskError(
                f"task name {self.name!r} must be letters, digits, '_', '.', '+' or '-' (not "
                "starting with '.'): it names the run directory"
            )
        if isinstance(self.fields, dict):
            try:
                self.fields = FieldMap(**self.fields)
            except TypeError as error:
                known = [f.name for f in dataclasses.fields(FieldMap)]
                raise TaskError(f"task '{self.name}': fields: {error}; known: {known}") from error
        if self.type not in TASK_TYPES:
            raise TaskError(
                f"task '{self.name}': type must be one of {TASK_TYPES}, got '{self.type}'"
            )
        if self.answer_format not in ANSWER_FORMATS:
            raise TaskError(
                f"task '{self.name}': answer_format must be one of "
                f"{ANSWER_FORMATS}, got '{self.answer_format}'"
            )
        if self.type in ("yesno", "classification") and not self.labels:
            raise TaskError(f"task '{self.name}': a {self.type} task needs `labels`")
        if (
            self.label_values is not None
            and self.type != "behaviour"
            and len(self.label_values) != len(self.labels or [])
        ):
            raise TaskError(f"task '{self.name}': label_values and labels differ in length")
        self.files = {
            pool: [paths] if isinstance(paths, str) else list(paths)
            for pool, paths in self.files.items()
        }
        if not self.files and not self.hub and self.pool_loader is None:
            raise TaskError(f"task '{self.name}': give `files` or a `hub` dataset")
        self._check_behaviour()

    def _check_behaviour(self) -> None:
        """A behaviour task names a usable scorer (a bad callable path fails here, before any
        model loads) and reads its two pools; other tasks take no scorer."""
        if self.type != "behaviour":
            if self.scorer is not None:
                raise TaskError(f"task '{self.name}': `scorer` applies to behaviour tasks only")
            return
        from expertsteer.evaluation.scorers import ScorerError, make_scorer

        if self.scorer is None:
            raise TaskError(
                f"task '{self.name}': a behaviour task needs a `scorer` (sentiment, "
                "python_code, keywords or callable)"
            )
        try:
            make_scorer(self.scorer, self.scorer_options)
        except ScorerError as error:
            raise TaskError(f"task '{self.name}': {error}") from error
        if self.files and self.pool_loader is None:
            missing = [pool for pool in BEHAVIOUR_POOLS if pool not in self.files]
            extra = sorted(set(self.files) - set(BEHAVIOUR_POOLS))
            if missing or extra:
                raise TaskError(
                    f"task '{self.name}': a behaviour task reads exactly the pools "
                    f"{list(BEHAVIOUR_POOLS)} (concept texts with a 0/1 label, prompts to "
                    f"continue); got {sorted(self.files)}"
                )


@dataclass
class Task:
    """A loaded task: examples per source pool (e.g. train / test)."""

    name: str
    """Task name."""
    type: str
    """Task type (see `TASK_TYPES`)."""
    pools: dict[str, list[Example]]
    """Pool name -> examples, in file order."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Pool name -> rows left out on purpose (no gold answer, a layout the parser skips)."""

    def all_examples(self) -> list[Example]:
        return [example for pool in self.pools.values() for example in pool]


RowParser = Callable[[dict, int, TaskSpec], Example | None]
PoolLoader = Callable[[TaskSpec, Path], dict[str, list[dict]]]
ROW_PARSERS: dict[str, RowParser] = {}
POOL_LOADERS: dict[str, PoolLoader] = {}


def row_parser(name: str) -> Callable[[RowParser], RowParser]:
    """Register a converter from one raw row to an `Example` (or None to drop the row)."""

    def register(fn: RowParser) -> RowParser:
        ROW_PARSERS[name] = fn
        return fn

    return register


def pool_loader(name: str) -> Callable[[PoolLoader], PoolLoader]:
    """Register a reader returning raw rows per pool for files of an unusual layout."""

    def register(fn: PoolLoader) -> PoolLoader:
        POOL_LOADERS[name] = fn
        return fn

    return register


def _get(row: dict, path: str) -> Any:
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(path)
        value = value[key]
    return value


def _present(row: dict, path: str) -> Any:
    """The value at `path`; a missing or null one (datasets fills absent keys with None) is
    an error naming the field."""
    try:
        value = _get(row, path)
    except KeyError:
        raise MissingFieldError(path) from None
    if value is None:
        raise MissingFieldError(path)
    return value


def _text(row: dict, path: str) -> str:
    """The stripped text at `path`, which must be present and non-empty."""
    text = str(_present(row, path)).strip()
    if not text:
        raise MissingFieldError(path)
    return text


def _datasets_offline() -> bool:
    """HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set: no dataset is read from the hub."""
    flags = (os.environ.get(name, "").lower() for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(flag in {"1", "true", "yes", "on"} for flag in flags)


def resolve_data_root(explicit: str | Path | None = None) -> str:
    """Folder of the built-in benchmark files: `explicit` when given, else `$EXPERTSTEER_DATA`,
    else `../shared/data/benchmarks` (relative to the working directory). Built-in tasks whose
    files are not there load from their hub dataset (`data_source`)."""
    if explicit is not None:
        return str(explicit)
    return os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT


def local_paths(spec: TaskSpec, data_root: str | Path) -> list[Path]:
    """The files (or folders) of `spec`; relative ones resolve against `data_root`."""
    root = Path(data_root).expanduser()
    return [
        Path(name) if Path(name).is_absolute() else root / name
        for names in spec.files.values()
        for name in names
    ]


@functools.cache
def _hub_connection_error() -> str | None:
    """Why the hub endpoint cannot be reached in 3 s (None when it can). A refused name or
    connection fails here at once, where `datasets` would retry for ~25 s."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as error:
        return f"no connection to {url.hostname}: {error}"
    return None


def hub_unreachable() -> str | None:
    """Why the hub cannot serve datasets now (offline flags, no connection), or None."""
    if _datasets_offline():
        return "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    return _hub_connection_error()


def data_source(spec: TaskSpec, data_root: str | Path | None = None) -> TaskSpec:
    """The spec to read: `spec` itself when its local files exist (the hub is then never
    contacted), else its hub fallback when the hub is reachable. Otherwise one error naming
    the local path looked for, the variable that moves it, and the hub dataset."""
    root = resolve_data_root(data_root)
    missing = [path for path in local_paths(spec, root) if not path.exists()]
    if not missing or spec.hub_fallback is None:
        return spec
    hub_id = spec.hub_fallback.hub["path"]
    reason = hub_unreachable()
    if reason is not None:
        raise TaskError(
            f"task '{spec.name}': data not found: no {missing[0]} under the data root {root} "
            f"(give data_root, or set {DATA_ENV}, to the folder holding the benchmark files), "
            f"and its hub dataset '{hub_id}' is out of reach ({reason})"
        )
    log.info(
        "task '%s': no local files under %s; reading hub dataset '%s'", spec.name, root, hub_id
    )
    return spec.hub_fallback


def data_identity(spec: TaskSpec, data_root: str | Path | None = None) -> str:
    """What `spec` reads, by content: the sha256 of each local file (relative name and bytes;
    a folder's files in sorted order), or the hub dataset it falls back to. The same data
    under another spelling of its folder gives the same identity."""
    root = resolve_data_root(data_root)
    source = data_source(spec, root)
    if source is not spec:
        return json.dumps(source.hub, sort_keys=True)
    digest = hashlib.sha256()
    for path, name in zip(local_paths(spec, root), _file_names(spec), strict=True):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            relative = name if file == path else f"{name}/{file.relative_to(path).as_posix()}"
            digest.update(f"{relative}\0{sha256_file(file)}\0".encode())
    return digest.hexdigest()


def _file_names(spec: TaskSpec) -> list[str]:
    return [name for names in spec.files.values() for name in names]


def resolve_paths(spec: TaskSpec, names: list[str], data_root: Path) -> list[Path]:
    """Absolute, existing data files of `spec`; a missing one is named with the fix."""
    paths = [Path(name) if Path(name).is_absolute() else data_root / name for name in names]
    for name, path in zip(names, paths, strict=True):
        if path.is_dir():
            raise TaskError(
                f"task '{spec.name}': data file {path} is a directory; name the data file in it"
            )
        if not path.is_file():
            fix = (
                "set data_root to the folder holding the benchmark files"
                if not Path(name).is_absolute()
                else "paths in a task YAML are relative to the YAML's folder"
            )
            raise TaskError(f"task '{spec.name}': data file {path} does not exist ({fix})")
    return paths


def load_rows(
    spec: TaskSpec, paths: list[Path], builder: str | None = None, **options: Any
) -> list[dict]:
    """Rows of local files through a `datasets` builder (json, csv, parquet, text)."""
    import datasets

    builder = builder or spec.format or FORMATS.get(paths[0].suffix)
    if builder is None:
        raise TaskError(
            f"task '{spec.name}': cannot tell the format of {paths[0]}; set "
            "`format` (json, csv, parquet, text)"
        )
    names = ", ".join(map(str, paths))
    empty = [str(p) for p in paths if p.stat().st_size == 0]
    if empty:
        raise TaskError(f"task '{spec.name}': data file {', '.join(empty)} is empty (0 bytes)")
    settings = {**spec.read_options, **options}
    if builder in ("json", "csv", "text") and "encoding" not in settings:
        for path in paths:
            _check_utf8(spec, path)
    try:
        dataset = datasets.load_dataset(
            builder,
            data_files=[str(p) for p in paths],
            split="train",
            **settings,
        )
        return dataset.to_list()
    except Exception as error:
        raise TaskError(
            f"task '{spec.name}': could not read {names} as {builder}: {_root_cause(error)}"
        ) from error


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception (datasets wraps reader errors in its own)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _check_utf8(spec: TaskSpec, path: Path) -> None:
    """A text data file read without an `encoding` must be UTF-8 (the reader's own error
    names neither the file nor the fix)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(1 << 20)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                raise TaskError(
                    f"task '{spec.name}': {path} is not UTF-8 text (byte "
                    f"{offset + error.start}: {error.reason}); re-save it as UTF-8 or set "
                    "read_options: {encoding: <its encoding>} in the task"
                ) from error
            if not block:
                return
            offset += len(block)


def read_rows(spec: TaskSpec, data_root: Path) -> dict[str, list[dict]]:
    """Raw rows per pool, through the `datasets` builders (or a registered pool loader)."""
    if spec.pool_loader:
        if spec.pool_loader not in POOL_LOADERS:
            raise TaskError(
                f"task '{spec.name}': unknown pool_loader '{spec.pool_loader}'; "
                f"known: {sorted(POOL_LOADERS)}"
            )
        return POOL_LOADERS[spec.pool_loader](spec, data_root)
    if not spec.files:
        return _read_hub(spec)
    return {pool: [row for _, row in rows] for pool, rows in _located_rows(spec, data_root).items()}


def _located_rows(spec: TaskSpec, data_root: Path) -> dict[str, list[tuple[str, dict]]]:
    """Rows per pool, each with where it came from ("<file>, data row <n>", 1-based)."""
    if spec.pool_loader or not spec.files:
        return {
            pool: [(f"pool '{pool}', row {i}", row) for i, row in enumerate(rows)]
            for pool, rows in read_rows(spec, data_root).items()
        }
    located: dict[str, list[tuple[str, dict]]] = {}
    for pool, names in spec.files.items():
        located[pool] = [
            (f"{path}, data row {i + 1}", row)
            for path in resolve_paths(spec, names, data_root)
            for i, row in enumerate(load_rows(spec, [path]))
        ]
    return located


def _read_hub(spec: TaskSpec) -> dict[str, list[dict]]:
    import datasets

    hub = spec.hub or {}
    if _datasets_offline():
        raise TaskError(
            f"task '{spec.name}' reads the hub dataset '{hub.get('path')}', but the "
            "hub is offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); point `files` "
            "at a local copy instead"
        )
    pools = {}
    for pool, split in hub.get("splits", {"test": "test"}).items():
        try:
            dataset = datasets.load_dataset(hub["path"], hub.get("name"), split=split)
        except Exception as error:
            raise TaskError(
                f"task '{spec.name}': could not load hub dataset "
                f"'{hub['path']}' split '{split}': {error}"
            ) from error
        pools[pool] = dataset.to_list()
    return pools


def parse_row(row: dict, index: int, spec: TaskSpec) -> Example | None:
    """Generic converter driven by the spec's field map and answer format."""
    fields = spec.fields
    question = _text(row, fields.question)
    context = _text(row, fields.context) if fields.context else ""
    if isinstance(fields.choices, list):
        choices = tuple(_text(row, name) for name in fields.choices)
    elif fields.choices:
        options = _present(row, fields.choices)
        if isinstance(options, str) or not isinstance(options, list | tuple):
            raise ValueError(f"field '{fields.choices}' must hold a list of options")
        choices = tuple(str(option).strip() for option in options)
    else:
        choices = tuple(spec.labels or ())
    raw = _get(row, fields.answer)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if spec.skip_unanswered:
            return None
        raise MissingFieldError(fields.answer)
    answer = resolve_answer(raw, choices, spec)
    ident = str(_get(row, fields.id)) if fields.id else str(index)
    return Example(
        id=ident,
        question=question,
        choices=choices,
        answer=answer,
        context=context,
        instruction=spec.instruction or "",
    )


def parse_behaviour_row(row: dict, index: int, spec: TaskSpec, pool: str) -> Example:
    """A behaviour task's row: a concept text with its 0/1 label (`label_values` maps other
    values: [value of 0, value of 1]), or a prompt to continue (no label)."""
    fields = spec.fields
    text = _text(row, fields.question)
    ident = str(_get(row, fields.id)) if fields.id else str(index)
    if pool == "prompts":
        return Example(id=ident, question=text, instruction=spec.instruction or "")
    raw = _present(row, fields.answer)
    values = spec.label_values if spec.label_values is not None else [0, 1]
    matches = [k for k, value in enumerate(values) if value == raw or str(value) == str(raw)]
    if len(values) != 2 or not matches:
        raise ValueError(
            f"concept label {raw!r} is not one of {values} (give label_values: "
            "[<value of label 0>, <value of label 1>])"
        )
    return Example(id=ident, question=text, answer=matches[0], instruction=spec.instruction or "")


def resolve_answer(raw: Any, choices: tuple[str, ...], spec: TaskSpec) -> int | float:
    """Turn a raw answer value into an option index (or a number for numeric tasks)."""
    if spec.type == "numeric" or spec.answer_format == "number":
        return parse_number(raw)
    if spec.label_values is not None:
        return spec.label_values.index(raw)
    if spec.answer_format == "index":
        return int(raw)
    if spec.answer_format == "index1":
        return int(raw) - 1
    if spec.answer_format == "letter":
        return LETTERS.index(str(raw).strip().upper())
    text = str(raw).strip().lower()
    return [choice.lower() for choice in choices].index(text)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(raw: Any) -> float:
    """A number from a gold answer such as `72`, `1,200`, `3.5 cm` or `#### 18`."""
    if isinstance(raw, int | float):
        return float(raw)
    found = _NUMBER.findall(str(raw))
    if not found:
        raise ValueError(f"no number in {raw!r}")
    return float(found[-1].replace(",", ""))


def load_task(spec: TaskSpec, data_root: str | Path | None = None) -> Task:
    """Read and convert every pool of `spec` (local files under `resolve_data_root(data_root)`,
    or the hub dataset of a built-in task whose files are absent, see `data_source`); rows that
    fail to convert raise `TaskError`."""
    data_root = resolve_data_root(data_root)
    spec = data_source(spec, data_root)
    if spec.row_parser and spec.row_parser not in ROW_PARSERS:
        raise TaskError(
            f"task '{spec.name}': unknown row_parser '{spec.row_parser}'; known: "
            f"{sorted(ROW_PARSERS)}"
        )
    parser = ROW_PARSERS[spec.row_parser] if spec.row_parser else parse_row
    pools: dict[str, list[Example]] = {}
    dropped: dict[str, int] = {}
    for pool, rows in _located_rows(spec, Path(data_root)).items():
        examples = []
        for index, (where, row) in enumerate(rows):
            try:
                if spec.type == "behaviour" and not spec.row_parser:
                    example = parse_behaviour_row(row, index, spec, pool)
                else:
                    example = parser(row, index, spec)
            except MissingFieldError as error:
                raise TaskError(
                    f"task '{spec.name}', {where}: field '{error.field}' is missing or empty "
                    f"(the row has {sorted(row)}); fix the row, or the field map"
                    + (
                        ", or set skip_unanswered: true"
                        if error.field == spec.fields.answer
                        else ""
                    )
                ) from error
            except (KeyError, ValueError, IndexError, TypeError) as error:
                raise TaskError(
                    f"task '{spec.name}', {where}: cannot "
                    f"convert ({type(error).__name__}: {error}); check the field "
                    f"map against the row {sorted(row)}"
                ) from error
            if example is not None:
                examples.append(dataclasses.replace(example, id=f"{pool}/{example.id}"))
        if not rows:
            raise TaskError(f"task '{spec.name}': pool '{pool}' has no rows (empty data)")
        if not examples:
            raise TaskError(
                f"task '{spec.name}': pool '{pool}' has no usable rows (all {len(rows)} dropped)"
            )
        if len(examples) < len(rows):
            dropped[pool] = len(rows) - len(examples)
            log.warning(
                "task '%s', pool '%s': %d of %d rows dropped (no gold answer or a layout the "
                "parser skips)",
                spec.name,
                pool,
                dropped[pool],
                len(rows),
            )
        pools[pool] = examples
    _check_unique_ids(spec.name, pools)
    return Task(spec.name, spec.type, pools, dropped)


def _check_unique_ids(name: str, pools: dict[str, list[Example]]) -> None:
    seen: set[str] = set()
    for examples in pools.values():
        for example in examples:
            if example.id in seen:
                raise TaskError(f"task '{name}': duplicate example id '{example.id}'")
            seen.add(example.id)


def spec_from_yaml(path: str | Path) -> TaskSpec:
    """A user-defined task from a YAML file with the `TaskSpec` keys."""
    import yaml

    path = Path(path)
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise TaskError(
            f"task file {path} is not UTF-8 text (byte {error.start}: {error.reason}); "
            "re-save it as UTF-8"
        ) from None
    except (OSError, yaml.YAMLError) as error:
        raise TaskError(f"cannot read task file {path}: {error}") from error
    if not isinstance(settings, dict):
        raise TaskError(f"task file {path} must hold a mapping of TaskSpec keys")
    known = {f.name for f in dataclasses.fields(TaskSpec)} - {"hub_fallback"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TaskError(f"task file {path}: unknown key(s) {unknown}; known: {sorted(known)}")
    files = settings.get("files") or {}
    settings["files"] = {
        pool: [
            str((path.parent / p).resolve()) if not Path(p).is_absolute() else p
            for p in ([paths] if isinstance(paths, str) else paths)
        ]
        for pool, paths in files.items()
    }
    return TaskSpec(**settings)
