"""Inputs a new user gets wrong, each answered by one clear line before any work (found by
trying the CLI as a new user would): strengths out of range, bad token budgets, config files
that are empty, not UTF-8 or a folder, a data file that is a folder, duplicated or one-class task
files, splits the data cannot fill, and the same data under another spelling of its path."""

import json

import pytest
import torch

from expertsteer.data.tasks import TaskError, TaskSpec, data_identity, load_task, spec_from_yaml
from expertsteer.method.vectors import SteeringVectors, save_steering
from expertsteer.models.export import ExportError, export_gguf
from expertsteer.pipeline.cli import main
from expertsteer.pipeline.experiment import ExperimentError, load_experiment
from expertsteer.pipeline.stages import current_metrics, plan
from tests.pipeline.test_experiment import _tiny_experiment, _write
from tests.tiny_task import text_task


@pytest.mark.parametrize(
    ("alpha", "message"),
    [("nan", "must be finite"), ("1e30", "exceeds"), ("-1e38", "exceeds"), ("x", "number")],
)
@pytest.mark.parametrize("command", ["generate", "export-gguf"])
def test_a_strength_out_of_range_is_one_line_before_any_work(
    tmp_path, capsys, command, alpha, message
):
    args = {
        "generate": ["generate", "--steer", str(tmp_path), "--prompt", "hi"],
        "export-gguf": ["export-gguf", str(tmp_path), str(tmp_path / "out.gguf")],
    }[command]
    with pytest.raises(SystemExit) as exit_:
        main([*args, f"--alpha={alpha}"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --alpha" in error and message in error
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("tokens", ["-5", "0", "2.5"])
def test_a_token_budget_below_one_is_refused(capsys, tokens):
    with pytest.raises(SystemExit):
        main(["generate", "--model", "x", "--prompt", "hi", f"--max-new-tokens={tokens}"])
    assert "argument --max-new-tokens" in capsys.readouterr().err


def test_export_refuses_a_strength_that_would_write_inf(tmp_path):
    path = tmp_path / "steering.safetensors"
    vector = torch.nn.functional.normalize(torch.randn(8), dim=0)
    save_steering(path, SteeringVectors({3: vector}, {3: 50.0}, metadata={"method": "x"}))
    with pytest.raises(ExportError, match="exceeds"):
        export_gguf(path, tmp_path / "out.gguf", alpha=1e38)
    assert not (tmp_path / "out.gguf").exists()


def test_config_files_that_are_empty_not_utf8_or_a_folder_are_named(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing here\n")
    with pytest.raises(ExperimentError, match="is empty"):
        load_experiment(empty)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ExperimentError, match="not UTF-8"):
        load_experiment(latin)
    with pytest.raises(ExperimentError, match="is a directory"):
        load_experiment(tmp_path)
    with pytest.raises(TaskError, match="not UTF-8"):
        spec_from_yaml(latin)


def test_a_data_file_that_is_a_folder_is_not_called_missing(tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    spec = TaskSpec(
        name="t",
        type="classification",
        labels=["a", "b"],
        fields={"question": "text", "answer": "label"},
        files={"test": str(tmp_path / "folder.jsonl")},
    )
    with pytest.raises(TaskError, match="is a directory"):
        load_task(spec)


def test_tasks_check_names_duplicates_and_contradictions(tmp_path, capsys):
    rows = [{"text": f"Review {i}.", "y": ["bad", "good"][i % 2]} for i in range(6)]
    rows += [rows[0], rows[1], {"text": "Review 2.", "y": "good"}]
    main(["tasks", "--check", str(text_task(tmp_path, rows))])
    out = capsys.readouterr().out
    assert "2 repeated rows (kept once)" in out and "1 texts with contradicting" in out
    assert "contradicting: 'Review 2.'" in out and "warning: every example" not in out


def test_tasks_check_warns_about_a_one_class_task(tmp_path, capsys):
    rows = [{"text": f"Review {i}.", "y": "good"} for i in range(6)]
    main(["tasks", "--check", str(text_task(tmp_path, rows))])
    assert "warning: every example has the same gold answer" in capsys.readouterr().out


def test_dry_run_reports_the_split_sizes_the_data_really_gives(tiny_dirs, tmp_path, capsys):
    config = _tiny_experiment(tiny_dirs, tmp_path, splits={"steer": 16, "dev": 5000, "test": 8})
    main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"])
    out = capsys.readouterr().out
    assert "arithmetic: splits (held/asked) steer 16/16, dev " in out and "test 8/8" in out
    assert "split 'dev' has" in out and "of the 5000 examples asked" in out
    config = _tiny_experiment(tiny_dirs, tmp_path, splits={"steer": 16, "dev": 8, "test": 5000})
    with pytest.raises(SystemExit, match="split 'steer' is empty"):
        main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"])


def test_the_same_data_under_another_spelling_of_its_path_keeps_every_fingerprint(
    tiny_dirs, tmp_path, monkeypatch
):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.chdir(tmp_path)
    spelled = [str(data), "data", "./data/", f"{tmp_path}/data/../data"]
    fingerprints = []
    for root in spelled:
        config = _tiny_experiment(tiny_dirs, tmp_path, data_root=root)
        experiment = load_experiment(_write(tmp_path, config))
        fingerprints.append([row[3] for row in plan(experiment, "arithmetic")])
    assert all(f == fingerprints[0] for f in fingerprints)


def test_data_identity_follows_the_content_of_the_files(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "r.jsonl").write_text('{"text": "a", "label": "x"}\n')
    spec = TaskSpec(
        name="t",
        type="classification",
        labels=["x", "y"],
        fields={"question": "text", "answer": "label"},
        files={"test": "mine/r.jsonl"},
    )
    monkeypatch.chdir(tmp_path)
    first = data_identity(spec, str(tmp_path))
    assert data_identity(spec, ".") == first
    (tmp_path / "mine" / "r.jsonl").write_text('{"text": "b", "label": "x"}\n')
    assert data_identity(spec, ".") != first


def test_a_stale_report_does_not_offer_an_option_report_lacks(tmp_path):
    (tmp_path / "stages.json").write_text(json.dumps({"kind": "stages", "fingerprints": {}}))
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ExperimentError) as error:
        current_metrics(tmp_path)
    assert "--alpha" not in str(error.value)
    with pytest.raises(ExperimentError, match="--alpha"):
        current_metrics(tmp_path, alpha_option=True)


def test_the_api_refuses_the_same_strengths_as_the_cli():
    vectors = SteeringVectors({3: torch.ones(8) / 8**0.5}, {3: 50.0}, metadata={"method": "x"})
    for alpha in (1e30, float("nan"), -21.0):
        with pytest.raises(ValueError, match="exceeds|finite"):
            vectors.resolve(alpha=alpha)
    assert vectors.resolve(alpha=-20.0)[0] == -20.0
