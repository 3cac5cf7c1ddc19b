"""A float32 run reproduces on another CPU generation and another thread count: the same
experiment (capture, alignment, pairing, every vector fit, the evaluation) run once as is and
once with 1 thread and PyTorch's and oneDNN's kernels capped at AVX2 (no AVX-512, no native
bfloat16: an older CPU, emulated) chooses the same pairs, alphas and layers, and scores every
test item the same. The promise docs/results.md states for the float32 capture."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.slow.ddp import ROOT
from tests.tiny import tiny_pair

pytestmark = pytest.mark.slow

OLDER_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}


def _run(tmp_path, models, name: str, environment: dict[str, str]) -> dict:
    config = {
        "name": name,
        "output_root": str(tmp_path / "runs"),
        "expert": str(models["expert"]),
        "target": str(models["target"]),
        "tasks": ["arithmetic"],
        "splits": {"steer": 24, "dev": 12, "test": 10},
        "alignment": {"max_epochs": 3, "window": [0.4, 1.0], "model_dtype": "float32"},
        "rfm": {"iterations": 2},
        "evaluation": {"alphas": [-2.0, 0.5, 2.0], "max_new_tokens": 4, "null_k": 3},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EXPERTSTEER_CACHE": str(tmp_path / f"cache_{name}"),
        **environment,
    }
    command = [sys.executable, "-m", "expertsteer", "run", "--config", str(path)]
    subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=900)
    run = tmp_path / "runs" / name / "arithmetic"
    return json.loads((run / "metrics.json").read_text())


def test_a_float32_run_reproduces_with_avx2_kernels_and_one_thread(tmp_path):
    models = tiny_pair(tmp_path / "models")
    here = _run(tmp_path, models, "here", {"OMP_NUM_THREADS": "2"})
    older = _run(tmp_path, models, "older", OLDER_CPU)
    assert here["environment"]["threads"] == 2 and older["environment"]["threads"] == 1
    assert here["environment"]["capture_dtype"] == ["float32"]
    for method, entry in here["methods"].items():
        other = older["methods"][method]
        assert (other.get("alpha"), other.get("layers")) == (
            entry.get("alpha"),
            entry.get("layers"),
        )
        assert other["test"]["accuracy"] == entry["test"]["accuracy"], method
    assert older["test_items"] == here["test_items"]
    assert older["null"]["gains"] == here["null"]["gains"]
    assert older["conclusion"] == here["conclusion"]
