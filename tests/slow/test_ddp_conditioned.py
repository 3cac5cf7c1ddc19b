"""Input-dependent steering under DDP: `expertsteer run` of the conditioned methods with
`trainer: {strategy: ddp, devices: 2}` (gloo, CPU) gives the one-process run's readers, dev
choices, test rows and `shuffled` control. Test batches are sharded across the ranks while the
shuffled control permutes coefficients across *all* test items, so each rank must read every
item and the gathered records must line up with the one-process run.

The methods compared are those whose parts do not depend on the auto-encoders (trained on
differently shuffled shards under DDP): the target-self reader and the `gate` variant (the
expert reads, the target's own direction pushes)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from expertsteer.method.conditioned import READER_FILE, load_reading
from expertsteer.pipeline.stages import method_dir
from tests.slow.ddp import ROOT
from tests.tiny import tiny_pair
from tests.tiny_task import review_task

pytestmark = pytest.mark.slow

METHODS = ["target_conditioned", "expert_conditioned_gate"]


def _run(tmp_path, models, task, name: str, trainer: dict) -> dict:
    config = {
        "name": name,
        "output_root": str(tmp_path / "runs"),
        "expert": str(models["expert"]),
        "target": str(models["target"]),
        "tasks": [str(task)],
        "methods": METHODS,
        # 9 test items: two ranks pad one duplicate, which must not enter the metrics.
        "splits": {"steer": 16, "dev": 8, "test": 9},
        "alignment": {"max_epochs": 2, "window": [0.4, 1.0]},
        "evaluation": {
            "alphas": [-1.0, 1.0],
            "c_max": [1.0, 2.0],
            "null_k": 0,
            "shuffle_k": 4,
            "num_samples": 1,
            "sample_tokens": 2,
        },
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, **trainer},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EXPERTSTEER_CACHE": str(tmp_path / f"cache_{name}"),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "expertsteer", "run", "--config", str(path)]
    subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=900)
    return {"dir": tmp_path / "runs" / name / task.stem}


def test_two_process_conditioned_run_matches_one_process(tmp_path):
    models = tiny_pair(tmp_path / "models")
    task = review_task(tmp_path, "reviews", [k % 2 for k in range(48)])
    single = _run(tmp_path, models, task, "single", {"devices": 1})["dir"]
    ddp = _run(tmp_path, models, task, "ddp", {"devices": 2, "strategy": "ddp"})["dir"]

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
