"""A user's behaviour task from YAML, checked by `expertsteer tasks --check` and run end to end on
tiny models: the `behaviour` section of metrics.json, the trade-off plot and the report; the
dev rule chooses before any test prompt is continued."""

import json

import yaml

from expertsteer.evaluation.behaviour_report import TRADEOFF_FIGURE
from expertsteer.evaluation.report import REPORT_FILE
from expertsteer.pipeline.cli import main
from lightning_modules import behaviour as behaviour_module


def _behaviour_task(tmp_path) -> str:
    """Sea texts (label 1) vs fire texts (label 0) and neutral prompts, keywords scorer."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [f"calm blue sea number {i}, waves on the sand,1" for i in range(20)]
    rows += [f"loud red fire number {i}, smoke in the hall,0" for i in range(20)]
    (folder / "concept.csv").write_text("text,more,label\n" + "\n".join(rows) + "\n")
    prompts = [{"text": f"On day {i} the visitor"} for i in range(14)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    spec = {
        "name": "sea_steer",
        "type": "behaviour",
        "scorer": "keywords",
        "scorer_options": {"words": ["sea", "waves"]},
        "instruction": "Write about the sea.",
        "files": {"concept": "concept.csv", "prompts": "prompts.jsonl"},
        "fields": {"question": "text", "answer": "label"},
    }
    path = folder / "sea.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_tasks_check_shows_a_behaviour_task(tmp_path, capsys):
    main(["tasks", "--check", _behaviour_task(tmp_path)])
    out = capsys.readouterr().out
    assert "task 'sea_steer' (behaviour, scorer keywords): 40 concept texts" in out
    assert "(20 label 1, 20 label 0), 14 prompts" in out


def test_behaviour_run_writes_its_section_plot_and_report(tiny_dirs, tmp_path, monkeypatch):
    task = _behaviour_task(tmp_path)
    config = {
        "name": "tiny",
        "output_root": str(tmp_path / "runs"),
        "expert": str(tiny_dirs["expert"]),
        "target": str(tiny_dirs["target"]),
        "tasks": [task],
        "methods": ["random", "target_mean_diff", "expertsteer"],
        "position": "mean",
        "splits": {"steer": 16, "dev": 6, "test": 6},
        "alignment": {
            "max_epochs": 2,
            "window": [0.4, 1.0],
            "corpus": {"tasks": ["sentiment_concept"], "size": 30},
        },
        "rfm": {"iterations": 2},
        "evaluation": {"alphas": [-2.0, 0.5, 2.0], "null_k": 3, "n_boot": 200},
        "behaviour": {"max_new_tokens": 4, "samples": 2, "batch_size": 16, "num_examples": 2},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))

    # The dev rule must choose from dev continuations alone: record every prompt continued,
    # and check at each choice that no test prompt has been.
    continued: list[str] = []
    choices: list[int] = []
    real_continue, real_choose = behaviour_module.continue_prompts, behaviour_module.choose

    def spy_continue(decoder, rows, *args, **kwargs):
        continued.extend(row.prompt_id for row in rows)
        return real_continue(decoder, rows, *args, **kwargs)

    def spy_choose(*args, **kwargs):
        choices.append(len(continued))
        assert not any(prompt.startswith("prompts/") and prompt in test_ids for prompt in continued)
        return real_choose(*args, **kwargs)

    test_ids: set[str] = set()
    monkeypatch.setattr(behaviour_module, "continue_prompts", spy_continue)
    monkeypatch.setattr(behaviour_module, "choose", spy_choose)
    real_evaluate = behaviour_module.BehaviourEvaluator.evaluate

    def evaluate(self, pl_module, datamodule):
        test_ids.update(example.id for example in datamodule.splits()["test"])
        return real_evaluate(self, pl_module, datamodule)

    monkeypatch.setattr(behaviour_module.BehaviourEvaluator, "evaluate", evaluate)
    main(["run", "--config", str(path)])

    assert len(choices) == 3 + 3  # every method and every null draw, before any test prompt
    assert test_ids and test_ids <= set(continued)
    run = tmp_path / "runs" / "tiny" / "sea_steer"
    metrics = json.loads((run / "metrics.json").read_text())
    section = metrics["behaviour"]
    assert section["n_test_prompts"] == 6 and section["n_dev_prompts"] == 6
    assert set(section["methods"]) == {
        "none",
        "prompt",
        "random",
        "target_mean_diff",
        "expertsteer",
    }
    keys = {
        "concept",
        "concept_ci",
        "share",
        "perplexity",
        "distinct2",
        "degenerate_rate",
        "alpha",
        "layers",
        "p_vs_null",
        "p_vs_none",
    }
    for method in ("random", "target_mean_diff", "expertsteer"):
        entry = section["methods"][method]
        assert keys <= set(entry)
        assert entry["alpha"] in (-2.0, 0.5, 2.0)
        assert entry["n"] == 6 * 3  # greedy + 2 samples per test prompt
        assert 1 / 4 <= entry["p_vs_null"] <= 1.0
    assert section["null"]["k"] == 3 and len(section["null"]["scores"]) == 3
    assert {"median", "p95"} <= set(section["null"])
    assert section["methods"]["prompt"]["instruction"] == "Write about the sea."
    assert (run / TRADEOFF_FIGURE).stat().st_size > 0
    report = (run / REPORT_FILE).read_text()
    assert "| null median / p95 (K=3) |" in report and f"]({TRADEOFF_FIGURE})" in report
    assert len(section["samples"]) == 2 and "none" in section["samples"][0]["outputs"]
    # The report rebuilds from metrics.json alone.
    (run / REPORT_FILE).unlink()
    (run / TRADEOFF_FIGURE).unlink()
    main(["report", str(run)])
    assert (run / REPORT_FILE).read_text() == report and (run / TRADEOFF_FIGURE).is_file()
