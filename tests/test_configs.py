"""Every shipped YAML is exercised."""

from pathlib import Path

import lightning
import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("trainer/*.yaml")), ids=lambda p: p.name)
def test_trainer_presets_build_a_trainer(path, tmp_path):
    settings = yaml.safe_load(path.read_text())
    trainer = lightning.Trainer(default_root_dir=tmp_path, logger=False, **settings)
    assert trainer.num_devices == settings["devices"]
