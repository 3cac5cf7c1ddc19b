"""Every shipped YAML is exercised: trainer presets build a Trainer; each stage config parses
through the LightningCLI and a tiny-model version of it runs (`fast_dev_run` where it applies)."""

import json
from pathlib import Path

import lightning
import pytest
import yaml

from expertsteer.artifacts import ALIGNMENT_FILE, MI_HEATMAP_FILE, PAIRS_FILE, STEERING_FILE
from expertsteer.evaluation.report import REPORT_FILE
from expertsteer.method.align import load_alignment
from expertsteer.method.vectors import load_steering
from expertsteer.pipeline.cli import main
from expertsteer.pipeline.experiment import load_experiment
from expertsteer.pipeline.lightning_cli import lightning_cli
from expertsteer.pipeline.stages import plan

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"
STAGES = sorted(p.name for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("trainer/*.yaml")), ids=lambda p: p.name)
def test_trainer_presets_build_a_trainer(path, tmp_path):
    settings = yaml.safe_load(path.read_text())
    trainer = lightning.Trainer(default_root_dir=tmp_path, logger=False, **settings)
    assert trainer.num_devices == settings["devices"]


# Configs whose modules read an earlier stage's artifact when built get an inline stand-in.
STANDALONE = {
    name: ["--model.init_args.pairs_file=null", "--model.init_args.pairs=[[1, 1]]"]
    for name in ("align_recon_translate.yaml", "align_translate.yaml")
}


@pytest.mark.parametrize("name", STAGES)
def test_stage_configs_parse_with_short_class_names(name):
    cli = lightning_cli(["--config", str(CONFIGS / name), *STANDALONE.get(name, [])], run=False)
    assert (
        type(cli.model).__name__
        == yaml.safe_load((CONFIGS / name).read_text())["model"]["class_path"].rsplit(".", 1)[-1]
    )
    assert cli.trainer is not None


def _tiny(tiny_dirs, run, cache, **data):
    """Overrides that point a stage config at the tiny models and a temporary run dir."""
    settings = {
        "expert": str(tiny_dirs["expert"]),
        "target": str(tiny_dirs["target"]),
        "steer_size": 24,
        "dev_size": 12,
        "test_size": 4,
        "cache": str(cache),
        **data,
    }
    args = [f"--data.init_args.{key}={value}" for key, value in settings.items()]
    return [
        *args,
        f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}",
        "--trainer.enable_progress_bar=false",
    ]


def test_stage_configs_run_end_to_end_on_tiny_models(tiny_dirs, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    align = ["fit", "--config", str(CONFIGS / "align.yaml"), *_tiny(tiny_dirs, run, cache)]
    main([*align, "--trainer.max_epochs=3", "--model.init_args.pairing.window=[0.0, 1.0]"])
    for name in (ALIGNMENT_FILE, PAIRS_FILE, MI_HEATMAP_FILE):
        assert (run / name).is_file(), name
    recon_translate = ["fit", "--config", str(CONFIGS / "align_recon_translate.yaml")]
    recon_translate += _tiny(tiny_dirs, run / "recon_translate", cache)
    main(
        [
            *recon_translate,
            "--trainer.fast_dev_run=true",
            f"--model.init_args.pairs_file={run / PAIRS_FILE}",
        ]
    )
    translate = ["fit", "--config", str(CONFIGS / "align_translate.yaml")]
    translate += _tiny(tiny_dirs, run / "translate", cache, task="arithmetic")
    main(
        [
            *translate,
            f"--model.init_args.pairs_file={run / PAIRS_FILE}",
            "--model.init_args.pairing.window=[0.0, 1.0]",
            "--data.init_args.corpus.tasks=[multiarith]",
            "--data.init_args.corpus.size=30",
            f"--data.init_args.data_root={DATA_ROOT}",
        ]
    )
    _, translated = load_alignment(run / "translate" / ALIGNMENT_FILE)
    assert translated["objective"] == "translate" and translated["corpus_positions"] > 100
    rfm = ["fit", "--config", str(CONFIGS / "rfm.yaml"), *_tiny(tiny_dirs, run, cache)]
    rfm += [
        f"--model.init_args.alignment_file={run / ALIGNMENT_FILE}",
        f"--model.init_args.pairs_file={run / PAIRS_FILE}",
        "--model.init_args.rfm.iterations=2",
        "--trainer.max_epochs=3",
    ]
    main(rfm)
    steering = load_steering(run / STEERING_FILE)
    assert steering.metadata["method"] == "rfm" and steering.width == 48
    assert len(steering.metadata["fits"][0]["val_auroc"]) == 3
    assert steering.metadata["capture_dtype"] == "float32"  # recorded for the environment
    steer = ["validate", "--config", str(CONFIGS / "steer.yaml")]
    steer += [
        f"--model.init_args.target={tiny_dirs['target']}",
        f"--model.init_args.expert={tiny_dirs['expert']}",
        f"--model.init_args.run_dir={run}",
        "--model.init_args.scoring.max_new_tokens=4",
        "--data.init_args.steer_size=24",
        "--data.init_args.dev_size=12",
        "--data.init_args.test_size=4",
        f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}",
        "--trainer.enable_progress_bar=false",
    ]
    main(steer)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"none", "expert", "expertsteer"}
    assert metrics["n_dev"] == 12 and metrics["n_test"] == 4
    assert (run / REPORT_FILE).is_file()


EXPERIMENTS = sorted(CONFIGS.glob("experiments/*.yaml"))


def _reads_at_best_block(config: dict) -> bool:
    return (config.get("evaluation") or {}).get("reader_block") == "best"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_configs_load_and_run_on_tiny_models(path, tiny_dirs, tmp_path):
    """Each shipped experiment, with tiny models and sizes, runs every stage on its first
    task (real benchmark data) and writes the report."""
    experiment = load_experiment(path)
    assert plan(experiment, experiment.tasks[0])
    config = yaml.safe_load(path.read_text())
    task = config["tasks"][0]
    config |= {
        "tasks": [task],
        "output_root": str(tmp_path / "runs"),
        "expert": str(tiny_dirs["expert"]),
        "target": str(tiny_dirs["target"]),
        # reader_block: best cross-validates readers in 5 folds: >= 20 steer items (2 classes).
        "splits": {"steer": 24 if _reads_at_best_block(config) else 16, "dev": 8, "test": 8},
        "task_overrides": {},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }
    config["alignment"] |= {"max_epochs": 2, "window": [0.0, 1.0]}
    if config["alignment"].get("corpus") is not None:
        config["alignment"]["corpus"] = {**config["alignment"]["corpus"], "size": 40}
    config["rfm"] |= {"iterations": 2}
    config["evaluation"] |= {"alphas": [0.5], "num_samples": 1, "sample_tokens": 4}
    if "behaviour" in config:
        config["behaviour"] |= {"max_new_tokens": 3, "samples": 1}
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(config))
    main(["run", "--config", str(tiny)])
    run = tmp_path / "runs" / config["name"] / task
    metrics = json.loads((run / "metrics.json").read_text())
    scored = metrics["behaviour"]["methods"] if "behaviour" in metrics else metrics["methods"]
    assert set(config["methods"]) < set(scored)
    assert (run / REPORT_FILE).is_file()


def test_unknown_option_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "rfm.yaml"), "--model.init_args.nope=1"])
    assert "nope" in capsys.readouterr().err
