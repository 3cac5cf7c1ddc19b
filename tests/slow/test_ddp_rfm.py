"""DDP with 2 CPU processes (gloo) fits the same steering vectors as one process."""

from pathlib import Path

import pytest
import torch

from expertsteer.artifacts import STEERING_FILE
from expertsteer.method.vectors import load_steering
from tests.slow.ddp import run_script
from tests.tiny import tiny_pair

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("ddp_rfm_script.py")


def _run(tmp_path, models, devices):
    out = tmp_path / f"out{devices}"
    ranks = run_script(SCRIPT, models, tmp_path / "cache", devices, out)
    return load_steering(out / STEERING_FILE), ranks


def test_two_process_rfm_gives_the_one_process_vectors(tmp_path):
    models = tiny_pair(tmp_path)
    single, (one,) = _run(tmp_path, models, 1)
    ddp, ranks = _run(tmp_path, models, 2)
    assert len(ranks) == 2
    assert {r["epochs"] for r in ranks} == {one["epochs"]} == {4}
    # Every rank solved the identical problem: the same vectors on both ranks ...
    assert ranks[0]["vectors"] == ranks[1]["vectors"]
    # ... and the same as one process (same data, same closed-form algebra).
    assert single.layers == ddp.layers == [1, 2]
    for layer in single.layers:
        torch.testing.assert_close(ddp.vectors[layer], single.vectors[layer], rtol=0, atol=1e-6)
    for fit_one, fit_ddp in zip(one["fits"], ranks[0]["fits"], strict=True):
        assert fit_ddp["best_iteration"] == fit_one["best_iteration"]
        assert fit_ddp["val_auroc"] == pytest.approx(fit_one["val_auroc"], abs=1e-9)
