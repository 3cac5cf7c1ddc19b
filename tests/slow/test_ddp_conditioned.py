"""Input-dependent steering under DDP: `expertsteer run` of the conditioned methods with
`trainer: {strategy: ddp, devices: 2}` (gloo, CPU) gives the one-process run's readers, dev
choices, test rows and `shuffled` control. Test batches are sharded across the ranks while the
shuffled control permutes coefficients across *all* test items, so each rank must read every
item and the gathered records must line up with the one-process run.

The methods compared are those whose parts do not depend on the auto-encoders (trained on
differently shuffled shards under DDP): the target-self reader and the `gate` variant (the
expert reads, the target's own direction pushes)."""

import json
from pathlib import Path

import pytest
import torch

from expertsteer.method.conditioned import READER_FILE, load_reading
from expertsteer.pipeline.stages import method_dir
from tests.pipeline.test_conditioned_run import _config
from tests.slow.ddp import run_experiment
from tests.tiny import tiny_pair
from tests.tiny_task import review_task

pytestmark = pytest.mark.slow

METHODS = ["target_conditioned", "expert_conditioned_gate"]


def _run(tmp_path, models, task, name: str, trainer: dict) -> Path:
    config = _config(models, tmp_path, task, METHODS)
    # 9 test items: two ranks pad one duplicate, which must not enter the metrics.
    config |= {"name": name, "splits": {"steer": 16, "dev": 8, "test": 9}}
    config["evaluation"] |= {"shuffle_k": 4, "sample_tokens": 2}
    config["trainer"] = {"accelerator": "cpu", "enable_progress_bar": False, **trainer}
    return run_experiment(tmp_path, config, task.stem)


def test_two_process_conditioned_run_matches_one_process(tmp_path):
    models = tiny_pair(tmp_path / "models")
    task = review_task(tmp_path, "reviews", [k % 2 for k in range(48)])
    single = _run(tmp_path, models, task, "single", {"devices": 1})
    ddp = _run(tmp_path, models, task, "ddp", {"devices": 2, "strategy": "ddp"})

    metrics = [json.loads((run / "metrics.json").read_text()) for run in (single, ddp)]
    assert metrics[0]["n_test"] == metrics[1]["n_test"] == 9
    for method in METHODS:
        # Readers are fitted on the same captured states: the same direction and midpoint.
        one, two = (load_reading(method_dir(run, method) / READER_FILE) for run in (single, ddp))
        assert one.metadata["layer"] == two.metadata["layer"]
        torch.testing.assert_close(one.weight, two.weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one.steer_scores, two.steer_scores, atol=1e-4, rtol=1e-5)
        assert (one.midpoint, one.half) == pytest.approx((two.midpoint, two.half), rel=1e-5)

        a, b = (m["methods"][method] for m in metrics)
        assert (a["alpha"], a["c_max"], a["layers"]) == (b["alpha"], b["c_max"], b["layers"])
        assert a["test"]["n"] == b["test"]["n"] == 9
        # Sharding changes padding: allow one item of float-noise flip.
        assert abs(a["test"]["accuracy"] - b["test"]["accuracy"]) <= 1 / 9 + 1e-9, method
        if method == "expert_conditioned_gate":
            # The same seeded permutations of the same coefficients, over all 9 items on both.
            gains = [m["methods"][method]["shuffled"]["gains"] for m in metrics]
            assert len(gains[0]) == len(gains[1]) == 4
            assert gains[0] == pytest.approx(gains[1], abs=1 / 9 + 1e-9)
    for probe in ("expert_probe", "target_probe"):
        a, b = (m["methods"][probe]["test"] for m in metrics)
        assert a["n"] == b["n"] == 9 and a["accuracy"] == pytest.approx(b["accuracy"])
