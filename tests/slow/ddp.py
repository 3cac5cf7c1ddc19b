"""Shared plumbing of the DDP tests: a stage script run with N processes, a CPU Trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import yaml

ROOT = Path(__file__).resolve().parents[2]


def run_script(
    script: Path, models: dict[str, Path], cache: Path, devices: int, out: Path
) -> list[dict]:
    """Run `script EXPERT TARGET CACHE DEVICES OUT` and return each rank's `rank<k>.json`."""
    out.mkdir()
    command = [sys.executable, str(script), str(models["expert"]), str(models["target"])]
    command += [str(cache), str(devices), str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=600)
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def cpu_trainer(devices: str | int, **settings) -> L.Trainer:
    """A quiet CPU Trainer: DDP (gloo) over `devices` processes, or one process."""
    return L.Trainer(
        accelerator="cpu",
        devices=int(devices),
        strategy="ddp" if int(devices) > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        **settings,
    )


def run_experiment(tmp_path: Path, config: dict, task: str) -> Path:
    """`expertsteer run` of `config` in a fresh process (one thread, its own cache under
    `tmp_path`); the run directory of `task`."""
    name = config["name"]
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
    return Path(config["output_root"]) / name / task
