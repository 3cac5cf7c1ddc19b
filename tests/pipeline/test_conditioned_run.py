"""A tiny-model `expertsteer run` of the conditioned methods on a two-label review task: the
method rows, their controls (shuffled, target_conditioned, the readers' own answers) and the
reader artifacts; the target-self reader reads target states only."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from expertsteer.data.tasks import Example
from expertsteer.evaluation.evaluate import ScoringConfig
from expertsteer.method.conditioned import READER_FILE, best_block, load_reading
from expertsteer.models.capture import capture
from expertsteer.models.causal_lm import CausalLM
from expertsteer.models.export import ExportError, export_gguf
from expertsteer.models.zoo import load_model
from expertsteer.pipeline.cli import main
from expertsteer.pipeline.experiment import FIXED_METHODS, ExperimentError, load_experiment
from expertsteer.pipeline.stages import method_dir, stage_configs
from expertsteer.pipeline.try_steering import RunSteering
from lightning_modules.steer import SteeringModule
from tests.tiny_task import review_task

CONDITIONED = [
    "target_conditioned",
    "expert_conditioned",
    "expert_conditioned_translate",
    "expert_conditioned_gate",
]


def _config(tiny_dirs, tmp_path, task: Path, methods: list[str]) -> dict:
    return {
        "name": "conditioned",
        "output_root": str(tmp_path / "runs"),
        "expert": str(tiny_dirs["expert"]),
        "target": str(tiny_dirs["target"]),
        "tasks": [str(task)],
        "methods": methods,
        "splits": {"steer": 16, "dev": 8, "test": 8},
        "alignment": {
            "max_epochs": 2,
            "window": [0.4, 1.0],
            "corpus": {"tasks": ["sentiment_concept"], "size": 30},
        },
        "evaluation": {
            "alphas": [-1.0, 1.0],
            "c_max": [1.0, 2.0],
            "null_k": 0,
            "shuffle_k": 3,
            "num_samples": 1,
            "sample_tokens": 3,
        },
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }


def test_a_tiny_run_writes_the_conditioned_rows_and_their_controls(tiny_dirs, tmp_path, capsys):
    task = review_task(tmp_path, "reviews", [k % 2 for k in range(40)])
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(_config(tiny_dirs, tmp_path, task, CONDITIONED)))
    main(["run", "--config", str(path)])
    run = tmp_path / "runs" / "conditioned" / "reviews"
    metrics = json.loads((run / "metrics.json").read_text())
    methods = metrics["methods"]
    assert {"none", "none+bias", "expert", "expert_probe", "target_probe", *CONDITIONED} == set(
        methods
    )
    for method in CONDITIONED:
        entry = methods[method]
        assert entry["c_max"] in (1.0, 2.0) and entry["alpha"] in (-1.0, 1.0)
        if method == "target_conditioned":
            # A control itself: no shuffled draws of its own, and never a gain.
            assert entry["shuffled"] is None and entry["p_vs_shuffled"] is None
            assert method not in metrics["conclusion"]["helps"]
        else:
            assert entry["shuffled"]["k"] == 3 and len(entry["shuffled"]["gains"]) == 3
            assert entry["p_vs_shuffled"] >= 1 / 4
        assert set(entry["dev_curves_by_c_max"]) == {"1", "2"}
        assert entry["test"]["n"] == 8
        reading = load_reading(method_dir(run, method) / READER_FILE)
        reader = "target" if method == "target_conditioned" else "expert"
        assert entry["reader"] == reader == reading.metadata["reader"]
        assert ("vs_target_conditioned" in entry) == (reader == "expert")
        recorded = json.loads((method_dir(run, method) / "steering.choice.json").read_text())
        assert (recorded["alpha"], recorded["c_max"]) == (entry["alpha"], entry["c_max"])
    # The expert reading is the same whatever carries the push.
    assert len({methods[m]["reader_layer"] for m in CONDITIONED[1:]}) == 1
    assert methods["expert_probe"]["test"]["n"] == 8
    report = (run / "report.md").read_text()
    assert "Input-dependent steering: its own controls" in report
    assert "expert_probe" in report and "p vs shuffled" in report
    assert metrics["comparisons"]["count"] > 0 and "shuffled" in metrics["conclusion"]["text"]

    # The target-self reader reads target states only: scored with no expert at all, and equal
    # to a plain capture of the target at its block.
    reading = load_reading(method_dir(run, "target_conditioned") / READER_FILE)
    target = CausalLM.from_loaded(load_model(str(tiny_dirs["target"])))
    examples = [
        Example("a", "warm and witty film", ("bad", "good"), 1, instruction="Rate this review.")
    ]
    module = SimpleNamespace(
        task_type="classification",
        readings={"target_conditioned": reading},
        expert_decoder=None,
        target_decoder=target,
        scoring=ScoringConfig(),
        _out_of_memory=lambda what: __import__("contextlib").nullcontext(),
    )
    scores = SteeringModule.reader_scores(module, examples)["target_conditioned"]
    from expertsteer.data.prompts import render_prompt

    layer = int(reading.metadata["layer"])
    states = capture(target, [render_prompt("classification", examples[0])], [layer], "last")
    torch.testing.assert_close(scores, reading.scores(states[layer]))

    # `generate --steer RUN --method expert_conditioned` reads each prompt with the expert
    # first: each prompt gets its own coefficient, the expert's reading at the dev choice.
    prompts = ["warm and witty film", "a dull, lifeless mess"]
    tried = RunSteering.load(run, "expert_conditioned")
    entry = methods["expert_conditioned"]
    assert (tried.alpha, tried.reader.c_max) == (entry["alpha"], entry["c_max"])
    expert_reading = load_reading(method_dir(run, "expert_conditioned") / READER_FILE)
    expert = CausalLM.from_loaded(load_model(str(tiny_dirs["expert"])))
    expert_layer = int(expert_reading.metadata["layer"])
    read = capture(expert, prompts, [expert_layer], "last")[expert_layer]
    expected = expert_reading.coefficients(expert_reading.scores(read), entry["c_max"])
    torch.testing.assert_close(tried.steered_by(prompts).coefficients, expected)
    assert len(tried.compare(prompts, max_new_tokens=2)) == 2
    main(["generate", "--steer", str(run), "--method", "expert_conditioned", "--prompt", "ok"])
    assert "steered (expert_conditioned" in capsys.readouterr().out
    with pytest.raises(ExportError, match="input-dependent"):
        export_gguf(method_dir(run, "expert_conditioned"), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_three_classes_read_by_a_probe_score_each_distinct_clip_bound_once(tiny_dirs, tmp_path):
    task = review_task(tmp_path, "moods", [k % 3 for k in range(60)], ("bad", "fair", "good"))
    config = _config(tiny_dirs, tmp_path, task, ["target_conditioned", "expert_conditioned_gate"])
    config["evaluation"] |= {"c_max": [2.0, 0.5, 1.0], "reader_block": "best"}
    config["splits"]["steer"] = 36  # 5-fold cross-validation: >= 5 steer items per class
    path = tmp_path / "experiment_moods.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["run", "--config", str(path)])
    run = tmp_path / "runs" / "conditioned" / "moods"
    methods = json.loads((run / "metrics.json").read_text())["methods"]
    for method in ("target_conditioned", "expert_conditioned_gate"):
        entry = methods[method]
        reading = load_reading(method_dir(run, method) / READER_FILE)
        assert reading.classes == 3
        # Each reader reads at the block of its model that cross-validates best on steer.
        accuracies = {int(b): a for b, a in reading.metadata["cv_accuracy"].items()}
        assert reading.metadata["block_choice"] == "best"
        assert entry["reader_layer"] == reading.metadata["layer"] == best_block(accuracies)
        assert len(accuracies) == (4 if entry["reader"] == "expert" else 3)
        # Probabilities minus their steer mean lie in [-1, 1]: bounds 1 and 2 give one push,
        # scored once; 0.5 clips and is scored on its own.
        assert set(entry["dev_curves_by_c_max"]) == {"0.5", "1"}
        assert entry["c_max"] in (0.5, 1.0) and entry["test"]["n"] == 8
    assert methods["expert_conditioned_gate"]["shuffled"]["k"] == 3


def test_conditioned_settings_leave_fixed_runs_alone_and_need_classes(tiny_dirs, tmp_path):
    task = review_task(tmp_path, "reviews", [k % 2 for k in range(40)])
    config = _config(tiny_dirs, tmp_path, task, list(FIXED_METHODS))
    path = tmp_path / "fixed.yaml"
    path.write_text(yaml.safe_dump(config))
    experiment = load_experiment(path)
    stages = stage_configs(experiment.for_task(str(task)), str(task))
    text = yaml.safe_dump({name: stage[1] for name, stage in stages.items()})
    # Without conditioned methods no stage config changes (their fingerprints stay).
    assert "shuffle_k" not in text and "c_max" not in text and "reader" not in text
    assert "item_kind: classes" not in text
    config["methods"] = ["expert_conditioned"]
    config["evaluation"]["reader_block"] = "best"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ExperimentError, match="16 steer items are too few"):
        load_experiment(path)
    config["evaluation"]["reader_block"] = "paired"
    config["tasks"] = ["arithmetic"]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ExperimentError, match="conditioned steering needs"):
        load_experiment(path)
