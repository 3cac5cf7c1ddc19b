"""DDP with 2 CPU processes (gloo) produces the same activation cache as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import save_tiny

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("ddp_capture_script.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, models, devices):
    cache, out = tmp_path / f"cache{devices}", tmp_path / f"out{devices}"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(models["expert"]),
            str(models["target"]),
            str(cache),
            str(devices),
            str(out),
        ],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    (entry,) = (cache / "activations").glob("*/meta.json")
    return entry.parent, [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def test_two_process_cache_is_byte_identical_and_stages_see_each_example_once(tmp_path):
    models = {
        "expert": save_tiny(tmp_path / "expert", "qwen2", seed=1),
        "target": save_tiny(tmp_path / "target", "llama", chat=False, seed=2),
    }
    single_dir, single = _run(tmp_path, models, 1)
    ddp_dir, ranks = _run(tmp_path, models, 2)
    assert single_dir.name == ddp_dir.name, "same fingerprint"
    shards = sorted(p.name for p in single_dir.glob("*.safetensors"))
    assert shards == sorted(p.name for p in ddp_dir.glob("*.safetensors"))
    for name in shards:
        assert (single_dir / name).read_bytes() == (ddp_dir / name).read_bytes(), name
    assert len(ranks) == 2
    # Closed-form stages read the whole split on every rank, once each example.
    assert {r["full_split"] for r in ranks} == {single[0]["full_split"]} == {14}
    assert {r["checksum"] for r in ranks} == {single[0]["checksum"]}
    # The dataloaders split the dev examples across ranks (the sampler may pad duplicates).
    union = set(ranks[0]["seen"]) | set(ranks[1]["seen"])
    assert union == set(single[0]["seen"]) and len(union) == 14
