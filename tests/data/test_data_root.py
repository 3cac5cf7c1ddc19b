"""Data root resolution and the hub fallback of built-in tasks (offline: `load_dataset` is
replaced by in-memory rows in each hub dataset's schema)."""

import json
from pathlib import Path

import pytest

from expertsteer.data import tasks
from expertsteer.data.catalogue import BUILTIN, HUB_SPECS
from expertsteer.data.tasks import DATA_ENV, LETTERS, TaskError, load_task, resolve_data_root

DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"
needs_shared = pytest.mark.skipif(not DATA_ROOT.is_dir(), reason=f"{DATA_ROOT} is absent")


class _Rows:
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def to_list(self) -> list[dict]:
        return list(self.rows)


def _serve(monkeypatch, path: str, config: str | None, splits: dict[str, list[dict]]) -> list:
    """Replace the hub with `splits` of dataset `path`; returns the calls made."""
    import datasets

    calls = []

    def load_dataset(name, config_name=None, split=None, **_):
        calls.append((name, config_name, split))
        assert (name, config_name) == (path, config)
        return _Rows(splits[split])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(tasks, "_hub_connection_error", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def _sst2_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        label, text = line.split(" ", 1)
        rows.append({"text": text, "label": int(label), "label_text": "?"})
    return rows


def test_data_root_is_the_option_then_the_variable_then_the_default(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert resolve_data_root() == "../shared/data/benchmarks"
    monkeypatch.setenv(DATA_ENV, "/data/bench")
    assert resolve_data_root() == "/data/bench"
    assert resolve_data_root("elsewhere") == "elsewhere"


@needs_shared
def test_sst2_from_the_hub_gives_the_examples_of_the_local_files(monkeypatch, tmp_path):
    local = load_task(BUILTIN["sst2"], DATA_ROOT)
    splits = {
        split: _sst2_rows(DATA_ROOT / "sst2" / f"stsa.binary.{name}")
        for split, name in (("test", "test"), ("train", "train"), ("validation", "dev"))
    }
    calls = _serve(monkeypatch, "SetFit/sst2", None, splits)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))  # an empty data root: nothing local
    hub = load_task(BUILTIN["sst2"])
    assert calls and hub.pools == local.pools


@needs_shared
def test_gsm8k_and_openbookqa_from_the_hub_match_the_local_files(monkeypatch, tmp_path):
    def jsonl(name):
        return [json.loads(line) for line in (DATA_ROOT / name).read_text().splitlines()]

    local, local_obqa = (load_task(BUILTIN[n], DATA_ROOT) for n in ("gsm8k", "openbookqa"))
    gsm = {"test": jsonl("gsm8k/test.jsonl"), "train": jsonl("gsm8k/train.jsonl")}
    _serve(monkeypatch, "openai/gsm8k", "main", gsm)
    assert load_task(BUILTIN["gsm8k"], tmp_path).pools == local.pools

    obqa = {
        pool: [
            {
                "id": f"q{e.id}",
                "question_stem": e.question,
                "choices": {"text": list(e.choices), "label": list(LETTERS[: len(e.choices)])},
                "answerKey": LETTERS[e.answer],
            }
            for e in examples
        ]
        for pool, examples in local_obqa.pools.items()
    }
    _serve(monkeypatch, "allenai/openbookqa", "main", obqa)
    assert load_task(BUILTIN["openbookqa"], tmp_path).pools == local_obqa.pools


@needs_shared
def test_boolq_from_the_hub_matches_the_local_question_text(monkeypatch, tmp_path):
    local = load_task(BUILTIN["boolq"], DATA_ROOT)
    splits = {
        hub_split: [
            {"question": e.question[0].lower() + e.question[1:-1], "answer": bool(e.answer)}
            for e in local.pools[pool]
        ]
        for pool, hub_split in HUB_SPECS["boolq"].hub["splits"].items()
    }
    _serve(monkeypatch, "google/boolq", None, splits)
    assert load_task(BUILTIN["boolq"], tmp_path).pools == local.pools


def test_local_files_never_contact_the_hub(monkeypatch, tmp_path):
    (tmp_path / "gsm8k").mkdir()
    row = {"question": "1 + 1?", "answer": "#### 2"}
    for name in ("test", "train"):
        (tmp_path / "gsm8k" / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_hub():
        raise AssertionError("the hub was contacted although the files are local")

    monkeypatch.setattr(tasks, "_hub_connection_error", no_hub)
    task = load_task(BUILTIN["gsm8k"], tmp_path)
    assert task.pools["test"][0].answer == 2.0


def test_missing_everywhere_is_one_error_naming_path_variable_and_hub(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(TaskError) as error:
        load_task(BUILTIN["sst2"])
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "sst2" / "stsa.binary.test") in message
    assert DATA_ENV in message and "SetFit/sst2" in message and "HF_HUB_OFFLINE" in message


def test_an_experiment_without_data_fails_before_any_stage(tiny_dirs, tmp_path, monkeypatch):
    """`expertsteer run` checks the task's and the token corpus's data in one line first."""
    import yaml

    from expertsteer.pipeline.cli import main

    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    config = {
        "output_root": str(tmp_path / "runs"),
        "expert": str(tiny_dirs["expert"]),
        "target": str(tiny_dirs["target"]),
        "tasks": ["arithmetic"],
        "alignment": {"corpus": {"tasks": ["sentiment_concept", "gsm8k"]}},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--config", str(path)])
    assert "task 'gsm8k'" in str(exit_.value.code) and "openai/gsm8k" in str(exit_.value.code)
    assert not (tmp_path / "runs").exists()
