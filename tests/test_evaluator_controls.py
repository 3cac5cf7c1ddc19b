"""The controls every steering claim is measured against: the random-vector null distribution,
the threshold-only `none+bias`, instruction-bearing calibration prompts, p-values and the
report's conclusion line."""

import lightning as L
import pytest
import torch

from datamodules.paired_activations import PairedActivationDataModule
from expertsteer.artifacts import STEERING_FILE
from expertsteer.extractors import random_direction, random_unit_vectors
from expertsteer.vectors import load_steering
from lightning_modules.rfm import RFMModule


@pytest.fixture(scope="module")
def paired(tiny_dirs, tmp_path_factory):
    """Tiny paired activations (target 48-d x 3 layers) with labels."""
    module = PairedActivationDataModule(
        expert=str(tiny_dirs["expert"]),
        target=str(tiny_dirs["target"]),
        task="arithmetic",
        steer_size=24,
        dev_size=12,
        test_size=4,
        batch_size=16,
        cache=str(tmp_path_factory.mktemp("cache")),
    )
    module.prepare_data()
    module.setup("fit")
    return module


# -- the random method is a label-free control ------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_method_is_not_flipped_to_agree_with_the_labels(paired, tmp_path, seed):
    module = RFMModule(method="random", source="target", pairs=[[0, 1]], seed=seed)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=paired)
    vector = load_steering(tmp_path / STEERING_FILE).vectors[1].double()
    drawn = random_direction(torch.zeros(1, 48, dtype=torch.float64), None, seed=seed)
    torch.testing.assert_close(vector, drawn, atol=1e-6, rtol=0)


def test_random_unit_vectors_are_seeded_unit_and_prefix_stable():
    rows = random_unit_vectors(5, 48, seed=7)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(random_unit_vectors(3, 48, seed=7), rows[:3])
    assert not torch.allclose(random_unit_vectors(5, 48, seed=8), rows)
    with pytest.raises(ValueError, match="count and dim"):
        random_unit_vectors(0, 48, seed=0)
