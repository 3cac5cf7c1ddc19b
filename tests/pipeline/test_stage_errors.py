"""Stage configs that cannot work fail with one clear message before any model loads or any
activation is captured: missing artifact, artifact of another model pair or task, a layer the
model does not have."""

from pathlib import Path

import pytest
import torch

import datamodules.paired_activations as paired_activations
import lightning_modules.steer as steer_module
from expertsteer.artifacts import STEERING_FILE
from expertsteer.method.vectors import SteeringVectors, save_steering
from expertsteer.models.zoo import weights_identity
from expertsteer.pipeline.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load or capture during the test is a failure of 'errors come first'."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration error was reported")

    monkeypatch.setattr(steer_module, "load_model", forbidden)
    monkeypatch.setattr(paired_activations.PairedActivationDataModule, "_capture", forbidden)


def _artifact(path: Path, target: Path, layer: int = 1, **metadata) -> Path:
    vector = torch.zeros(48)
    vector[0] = 1.0
    info = {
        "target_model_id": str(target),
        "target_weights_sha256": weights_identity(str(target)),
        "task": "arithmetic",
        **metadata,
    }
    return save_steering(path, SteeringVectors({layer: vector}, {layer: 2.0}, metadata=info))


def _validate(tiny_dirs, run: Path) -> list[str]:
    return [
        "validate",
        "--config",
        str(CONFIGS / "steer.yaml"),
        f"--model.init_args.target={tiny_dirs['target']}",
        f"--model.init_args.expert={tiny_dirs['expert']}",
        f"--model.init_args.run_dir={run}",
        f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}",
    ]


def _error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return str(exit_.value.code)


def test_missing_steering_artifact(tiny_dirs, tmp_path, no_model_loads):
    message = _error(_validate(tiny_dirs, tmp_path))
    assert "artifact not found" in message and STEERING_FILE in message


def test_artifact_of_another_target(tiny_dirs, tmp_path, no_model_loads):
    _artifact(tmp_path / STEERING_FILE, tiny_dirs["expert"])
    assert "target_model_id" in _error(_validate(tiny_dirs, tmp_path))


def test_artifact_of_another_task(tiny_dirs, tmp_path, no_model_loads):
    _artifact(tmp_path / STEERING_FILE, tiny_dirs["target"], task="sst2")
    message = _error(_validate(tiny_dirs, tmp_path))
    assert "fitted on task 'sst2'" in message and "'arithmetic'" in message


def test_artifact_steering_a_layer_the_target_lacks(tiny_dirs, tmp_path, no_model_loads):
    _artifact(tmp_path / STEERING_FILE, tiny_dirs["target"], layer=99)
    assert "steers target layer 99" in _error(_validate(tiny_dirs, tmp_path))


def test_rfm_pair_with_a_missing_layer_fails_before_capture(tiny_dirs, tmp_path, no_model_loads):
    argv = [
        "fit",
        "--config",
        str(CONFIGS / "rfm.yaml"),
        f"--data.init_args.expert={tiny_dirs['expert']}",
        f"--data.init_args.target={tiny_dirs['target']}",
        "--model.init_args.pairs_file=null",
        "--model.init_args.pairs=[[0, 99]]",
        "--model.init_args.alignment_file=null",
        "--model.init_args.source=target",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    with pytest.raises(ValueError, match="target layer 99 is not among the captured"):
        main(argv)
