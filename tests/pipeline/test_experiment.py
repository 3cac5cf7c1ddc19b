"""`expertsteer run`: one YAML runs every stage on tiny models, writes the run directory,
reuses finished stages and reruns exactly what a config change invalidates; bad configs fail
before any model loads."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml

from expertsteer.artifacts import (
    ALIGNMENT_FILE,
    MI_HEATMAP_FILE,
    PAIRS_FILE,
    STEERING_FILE,
)
from expertsteer.evaluation.report import ALPHA_FIGURE, NULL_FIGURE, REPORT_FILE
from expertsteer.method.vectors import load_steering
from expertsteer.models.export import read_control_vector
from expertsteer.pipeline.cli import main
from expertsteer.pipeline.experiment import FIXED_METHODS, ExperimentError, load_experiment
from expertsteer.pipeline.stages import method_dir, plan, stage_configs
from expertsteer.pipeline.try_steering import RunSteering


def _tiny_experiment(tiny_dirs, tmp_path, **changes) -> dict:
    config = {
        "name": "tiny",
        "output_root": str(tmp_path / "runs"),
        "expert": str(tiny_dirs["expert"]),
        "target": str(tiny_dirs["target"]),
        "tasks": ["arithmetic"],
        "splits": {"steer": 16, "dev": 8, "test": 8},
        # The deeper part of the target: llama.cpp has no control vector for block 0.
        "alignment": {
            "max_epochs": 2,
            "window": [0.4, 1.0],
            # a generated corpus: no benchmark files needed
            "corpus": {"tasks": ["sentiment_concept"], "size": 30},
        },
        "rfm": {"iterations": 2},
        "evaluation": {
            "alphas": [0.5, 2.0],
            "max_new_tokens": 4,
            "num_samples": 1,
            "sample_tokens": 4,
        },
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }
    for key, value in changes.items():
        config[key] = value if not isinstance(value, dict) else {**config.get(key, {}), **value}
    return config


def _write(tmp_path, config, name="experiment.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def _rerun(path) -> set[str]:
    return {stage for stage, *_, reuse in plan(load_experiment(path), "arithmetic") if not reuse}


def test_run_writes_every_artifact_and_reuses_finished_stages(
    tiny_dirs, tmp_path, capsys, monkeypatch
):
    # A relative output root, as in the shipped configs: stage paths must not double up.
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, _tiny_experiment(tiny_dirs, tmp_path, output_root="runs"))
    main(["run", "--config", str(path)])
    run = Path("runs") / "tiny" / "arithmetic"
    for name in (ALIGNMENT_FILE, PAIRS_FILE, MI_HEATMAP_FILE, STEERING_FILE, REPORT_FILE):
        assert (run / name).is_file(), name
    assert (run / "translate" / ALIGNMENT_FILE).is_file()
    assert (run / "recon_translate" / ALIGNMENT_FILE).is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"none", "expert", *FIXED_METHODS}
    for method in FIXED_METHODS:
        entry = metrics["methods"][method]
        assert entry["alpha"] in (0.5, 2.0)
        assert entry["test"]["n"] == 8 and 0.0 <= entry["test"]["accuracy"] <= 1.0
        assert set(entry["dev_curve"][",".join(map(str, entry["layers"]))]) == {"0.5", "2"}
    assert load_steering(run / STEERING_FILE).metadata["alignment_objective"] == "recon"
    for method, objective in (
        ("expertsteer_translate", "translate"),
        ("expert_mean_diff_translate", "translate"),
        ("expertsteer_recon_translate", "recon+translate"),
    ):
        steering = load_steering(run / "methods" / method / STEERING_FILE)
        assert steering.metadata["alignment_objective"] == objective
        (entry,) = steering.metadata["transfer"]
        assert entry["alignment"] == objective and "cos_target_native" in entry["direction"]
    out = capsys.readouterr().out
    assert "| expertsteer |" in out and str(run / REPORT_FILE) in out
    report = (run / REPORT_FILE).read_text()
    assert "Headroom" in report and "accuracy_vs_alpha.png" in report
    habit = metrics["methods"]["none"]["habit_rate_ci"]
    assert "habit [95% CI]" in report and f"[{habit[0]:.2f}, {habit[1]:.2f}]" in report

    # The ExpertSteer vectors as a llama.cpp control vector, at the alpha chosen on dev.
    steering = load_steering(run / STEERING_FILE)
    chosen = metrics["methods"]["expertsteer"]["alpha"]
    main(["export-gguf", str(run), "out.gguf", "--model-hint", "llama"])
    info, directions = read_control_vector("out.gguf")
    (layer,) = steering.layers
    assert layer > 0 and info["general.architecture"] == "controlvector"
    assert set(directions) == {layer}
    expected = chosen * steering.norm_scale[layer] * steering.vectors[layer]
    torch.testing.assert_close(directions[layer], expected.float())

    (run / REPORT_FILE).unlink()
    main(["report", str(run)])
    assert (run / REPORT_FILE).read_text() == report

    # Steer your own prompt: the target unsteered and steered at the dev choice, any method.
    capsys.readouterr()
    main(["generate", "--steer", str(run), "--prompt", "2 + 2 =", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert f"steered (expertsteer, alpha {chosen:g}, layers [{layer}])" in out
    assert "> 2 + 2 =" in out and "unsteered" in out
    tried = RunSteering.load(run, "target_mean_diff", alpha=8.0)
    assert tried.alpha == 8.0 and tried.layers == metrics["methods"]["target_mean_diff"]["layers"]
    (plain, steered), *_ = tried.compare(["Tom has 3 apples and"], max_new_tokens=6)
    assert plain != steered

    # The vectors describe themselves: each method's dev choice is recorded beside its vectors,
    # so export-gguf and generate --steer need no metrics.json.
    for method in FIXED_METHODS:
        recorded = load_steering(method_dir(run, method) / STEERING_FILE).choice
        entry = metrics["methods"][method]
        assert (recorded["alpha"], recorded["layers"]) == (entry["alpha"], entry["layers"])
        assert recorded["positions"] == metrics["positions"]
    kept = (run / "metrics.json").read_bytes()
    (run / "metrics.json").unlink()
    main(["export-gguf", str(run), "again.gguf", "--model-hint", "llama"])
    torch.testing.assert_close(read_control_vector("again.gguf")[1][layer], directions[layer])
    capsys.readouterr()
    main(["generate", "--steer", str(run), "--prompt", "2 + 2 =", "--max-new-tokens", "3"])
    assert f"steered (expertsteer, alpha {chosen:g}, layers [{layer}])" in capsys.readouterr().out
    (run / "metrics.json").write_bytes(kept)
    # Artifacts get ordinary file permissions (0644 under umask 022), not mkstemp's 0600.
    umask = os.umask(0)
    os.umask(umask)
    for name in (ALIGNMENT_FILE, "mi.safetensors", STEERING_FILE):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~umask, name

    experiment = load_experiment(path)
    assert all(reuse for *_, reuse in plan(experiment, "arithmetic"))
    changed = _write(
        tmp_path,
        _tiny_experiment(tiny_dirs, tmp_path, output_root="runs", rfm={"ridge": 0.01}),
        "changed.yaml",
    )
    assert _rerun(changed) == {f"vectors_{m}" for m in FIXED_METHODS} | {"evaluate"}
    alphas = _write(
        tmp_path,
        _tiny_experiment(tiny_dirs, tmp_path, output_root="runs", evaluation={"alphas": [1.0]}),
        "alphas.yaml",
    )
    assert _rerun(alphas) == {"evaluate"}


def test_task_overrides_apply_to_their_task_only(tiny_dirs, tmp_path):
    config = _tiny_experiment(tiny_dirs, tmp_path)
    config["tasks"] = ["arithmetic", "sentiment_concept"]
    config["task_overrides"] = {"arithmetic": {"splits": {"test": 5}}}
    experiment = load_experiment(_write(tmp_path, config))
    arithmetic = stage_configs(experiment.for_task("arithmetic"), "arithmetic")
    assert arithmetic["evaluate"][1]["data"]["init_args"]["test_size"] == 5
    assert arithmetic["evaluate"][1]["data"]["init_args"]["dev_size"] == 8
    assert experiment.for_task("sentiment_concept").splits.test == 8


def test_evaluation_gets_the_null_and_a_signed_grid_by_default(tiny_dirs, tmp_path):
    config = _tiny_experiment(tiny_dirs, tmp_path)
    del config["evaluation"]["alphas"]
    experiment = load_experiment(_write(tmp_path, config))
    evaluate = stage_configs(experiment, "arithmetic")["evaluate"][1]
    alphas = evaluate["trainer"]["callbacks"][0]["init_args"]["choice"]["alphas"]
    assert min(alphas) < 0 < max(alphas) and 0 not in alphas
    assert sorted(alphas) == sorted(-a for a in alphas)  # both signs of every strength
    model = evaluate["model"]["init_args"]
    assert model["scoring"]["null_k"] == 6 and model["null_seed"] == experiment.seed + 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nope": 1}, "unknown option(s) ['nope']"),
        ({"rfm": {"ridge": 0.1, "bogus": 2}}, "unknown option(s) ['bogus'] in"),
        ({"methods": ["expertsteer", "magic"]}, "unknown method(s) ['magic']"),
        ({"tasks": ["no_such_task"]}, "no_such_task"),
        ({"target": "no-such-model"}, "no-such-model"),
        ({"task_overrides": {"sst2": {}}}, "not in tasks"),
        ({"evaluation": {"alphas": [-0.1, 0.0, 0.1]}}, "each non-zero (zero is `none`)"),
        ({"evaluation": {"null_k": -1}}, "evaluation.null_k must be an integer >= 0"),
    ],
)
def test_bad_experiment_configs_fail_before_any_model_loads(tiny_dirs, tmp_path, change, message):
    config = _tiny_experiment(tiny_dirs, tmp_path)
    config.update(change)
    with pytest.raises(Exception, match=None) as error:
        load_experiment(_write(tmp_path, config))
    assert message in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_missing_experiment_file_is_a_clear_error(tmp_path):
    with pytest.raises(ExperimentError, match="not found"):
        load_experiment(tmp_path / "missing.yaml")


def _user_task(tmp_path, fmt: str) -> Path:
    """A two-label classification task of 40 rows in a CSV or JSONL file beside its YAML."""
    rows = [
        {"text": f"review {i}: {'great fun' if i % 2 else 'dull mess'}", "label": i % 2}
        for i in range(40)
    ]
    data = tmp_path / "tasks" / f"reviews.{fmt}"
    data.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    else:  # two unanswered rows, dropped on purpose and counted in the report
        rows += [{"text": "review without a label"}, {"text": "another one"}]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": f"reviews_{fmt}",
        "type": "classification",
        "files": {"test": data.name},  # relative to the task YAML
        "fields": {"question": "text", "answer": "label"},
        "labels": ["negative", "positive"],
        "instruction": "Is this review positive or negative?",
        "skip_unanswered": fmt == "jsonl",
    }
    path = tmp_path / "tasks" / "reviews.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _user_experiment(tiny_dirs, tmp_path, fmt: str) -> tuple[Path, str]:
    task = str(_user_task(tmp_path, fmt))
    config = _tiny_experiment(
        tiny_dirs, tmp_path, tasks=[task], methods=["random", "target_mean_diff", "expertsteer"]
    )
    return _write(tmp_path, config), task


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_user_task_yaml_runs_end_to_end_in_a_directory_named_after_the_task(
    tiny_dirs, tmp_path, fmt
):
    path, task = _user_experiment(tiny_dirs, tmp_path, fmt)
    main(["run", "--config", str(path)])
    run = tmp_path / "runs" / "tiny" / f"reviews_{fmt}"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["methods"]["expertsteer"]["test"]["n"] == 8
    assert load_steering(run / STEERING_FILE).metadata["task"] == f"reviews_{fmt}"
    assert all(reuse for *_, reuse in plan(load_experiment(path), task))
    dropped = {"test": 2} if fmt == "jsonl" else {}
    assert {k: v for k, v in metrics["dropped_rows"].items() if v} == dropped
    assert ("2 in pool 'test'" in (run / REPORT_FILE).read_text()) == (fmt == "jsonl")


def test_bfloat16_capture_and_scoring_run_end_to_end_in_their_own_cache_entries(
    tiny_dirs, tmp_path
):
    task = str(_user_task(tmp_path, "csv"))
    config = _tiny_experiment(
        tiny_dirs,
        tmp_path,
        tasks=[task],
        methods=["target_mean_diff", "expertsteer_translate"],
        alignment={"model_dtype": "bfloat16"},
        evaluation={"model_dtype": "bfloat16", "null_k": 2},
    )
    stages = stage_configs(load_experiment(_write(tmp_path, config)), task)
    assert stages["align"][1]["data"]["init_args"]["model_dtype"] == "bfloat16"
    assert stages["evaluate"][1]["model"]["init_args"]["scoring"]["model_dtype"] == "bfloat16"
    main(["run", "--config", str(_write(tmp_path, config))])
    run = tmp_path / "runs" / "tiny" / "reviews_csv"
    metrics = json.loads((run / "metrics.json").read_text())
    for method in ("none", "target_mean_diff", "expertsteer_translate"):
        assert metrics["methods"][method]["test"]["n"] == 8
    assert len(metrics["null"]["gains"]) == 2
    # The default (auto = float32 on the CPU) leaves the data modules without the key and
    # scores in auto.
    default = stage_configs(
        load_experiment(_write(tmp_path, _tiny_experiment(tiny_dirs, tmp_path))), "arithmetic"
    )
    assert "model_dtype" not in default["align"][1]["data"]["init_args"]
    assert default["evaluate"][1]["model"]["init_args"]["scoring"]["model_dtype"] == "auto"


def test_damaged_outputs_rerun_and_stale_results_are_never_current(
    tiny_dirs, tmp_path, monkeypatch
):
    path, task = _user_experiment(tiny_dirs, tmp_path, "csv")
    main(["run", "--config", str(path)])
    run = tmp_path / "runs" / "tiny" / "reviews_csv"
    old_metrics = (run / "metrics.json").read_bytes()
    assert (run / ALPHA_FIGURE).is_file() and (run / NULL_FIGURE).is_file()

    # A truncated steering file is not "finished": its stage and the evaluation rerun.
    random_file = run / "methods" / "random" / STEERING_FILE
    random_file.write_bytes(random_file.read_bytes()[:-16])
    assert {s for s, *_, reuse in plan(load_experiment(path), task) if not reuse} == {
        "vectors_random",
        "evaluate",
    }

    # The rerun refits the vectors, then the evaluation fails: no metrics.json / report.md of
    # the previous vectors may stay behind as if they described the new ones.
    from expertsteer.pipeline import stages as module

    real = module._run_stage

    def fail_evaluation(settings, command, stage_path):
        return (
            "expertsteer: error: killed"
            if command == "validate"
            else real(settings, command, stage_path)
        )

    monkeypatch.setattr(module, "_run_stage", fail_evaluation)
    with pytest.raises(SystemExit, match="stage 'evaluate' of task"):
        main(["run", "--config", str(path)])
    assert not (run / "metrics.json").exists() and not (run / REPORT_FILE).exists()
    assert not (run / ALPHA_FIGURE).exists() and not (run / NULL_FIGURE).exists()

    # Even a restored old metrics.json is not taken as current by export-gguf or report.
    (run / "metrics.json").write_bytes(old_metrics)
    with pytest.raises(SystemExit, match="does not belong to the vectors"):
        main(["export-gguf", str(run), str(tmp_path / "out.gguf"), "--model-hint", "llama"])
    with pytest.raises(SystemExit, match="does not belong to the vectors"):
        main(["report", str(run)])
    assert not (tmp_path / "out.gguf").exists()


def test_a_second_run_of_the_same_experiment_is_refused_while_one_holds_the_lock(
    tiny_dirs, tmp_path, monkeypatch
):
    from expertsteer.cache import file_lock
    from expertsteer.pipeline.stages import LOCK_FILE, run_task

    experiment = load_experiment(_write(tmp_path, _tiny_experiment(tiny_dirs, tmp_path)))
    run = experiment.run_dir("arithmetic")
    monkeypatch.setattr(
        "expertsteer.pipeline.stages._run_stage", lambda *a: pytest.fail("a stage ran")
    )
    with file_lock(run / LOCK_FILE), pytest.raises(ExperimentError, match="another"):
        run_task(experiment, "arithmetic")


BAD_VALUES = [
    ({"evaluation": {"alphas": []}}, "evaluation.alphas"),
    ({"evaluation": {"alphas": [float("nan")]}}, "evaluation.alphas"),
    ({"evaluation": {"alphas": [float("inf")]}}, "evaluation.alphas"),
    ({"evaluation": {"alphas": [0]}}, "evaluation.alphas"),
    ({"evaluation": {"alphas": ["big"]}}, "evaluation.alphas"),
    ({"evaluation": {"alphas": [1e6]}}, "exceed"),
    ({"evaluation": {"positions": "middle"}}, "evaluation.positions"),
    ({"evaluation": {"max_new_tokens": 0}}, "evaluation.max_new_tokens"),
    ({"rfm": {"ridge": -1}}, "rfm.ridge"),
    ({"rfm": {"iterations": 0}}, "rfm.iterations"),
    ({"rfm": {"bandwidth_scales": []}}, "rfm.bandwidth_scales"),
    ({"alignment": {"lr": 0}}, "alignment.lr"),
    ({"alignment": {"mi_estimator": "kde"}}, "alignment.mi_estimator"),
    ({"splits": {"steer": 16.7}}, "splits.steer"),
    ({"splits": "many"}, "splits must be a mapping"),
    ({"position": "first"}, "position must be one of"),
    ({"name": "../escape"}, "name '../escape'"),
    ({"target": "qwen2.5-coder-0.5b-instrct"}, "Did you mean"),
    ({"target": "missing.gguf"}, "GGUF file not found"),
    ({"trainer": {"accelerator": "cpu", "devices": 1, "precison": 32}}, "precison"),
]


@pytest.mark.parametrize(("change", "message"), BAD_VALUES)
def test_dry_run_rejects_every_bad_value_with_one_line(
    tiny_dirs, tmp_path, capsys, change, message
):
    config = _tiny_experiment(tiny_dirs, tmp_path, **change)
    path = _write(tmp_path, config)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--config", str(path), "--dry-run"])
    text = str(exit_.value.code)
    assert text.startswith("expertsteer: error:") and message in text, text
    assert "\n" not in text and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_gpu_accelerator_without_a_gpu_is_refused_before_any_stage(tiny_dirs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    trainer = {"accelerator": "gpu", "devices": 1}
    path = _write(tmp_path, _tiny_experiment(tiny_dirs, tmp_path, trainer=trainer))
    with pytest.raises(ExperimentError, match="no CUDA GPU is visible"):
        load_experiment(path)


def test_unwritable_output_root_is_refused_before_any_stage(tiny_dirs, tmp_path):
    # Under a plain file: no folder can be made there, whoever runs the test (even root).
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = _tiny_experiment(tiny_dirs, tmp_path, output_root=str(blocker / "runs"))
    with pytest.raises(ExperimentError, match="not a writable folder"):
        load_experiment(_write(tmp_path, config))
