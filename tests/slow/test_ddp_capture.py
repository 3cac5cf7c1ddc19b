"""DDP with 2 CPU processes (gloo) shares out the capture and produces the same activation cache
as one process, byte for byte."""

import json
from pathlib import Path

import pytest

from tests.slow.ddp import run_script
from tests.tiny import tiny_pair

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("ddp_capture_script.py")


def _run(tmp_path, models, devices):
    cache = tmp_path / f"cache{devices}"
    ranks = run_script(SCRIPT, models, cache, devices, tmp_path / f"out{devices}")
    (entry,) = (cache / "activations").glob("*/meta.json")
    return entry.parent, ranks


def _in_order(names: list[str]) -> list[str]:
    """Shard files in the data module's order: steer, dev, test, then by index."""
    splits = ["steer", "dev", "test"]
    return sorted(names, key=lambda name: (splits.index(name.split("-")[0]), name))


def test_two_process_cache_is_byte_identical_and_stages_see_each_example_once(tmp_path):
    models = tiny_pair(tmp_path)
    single_dir, single = _run(tmp_path, models, 1)
    ddp_dir, ranks = _run(tmp_path, models, 2)
    assert single_dir.name == ddp_dir.name, "same fingerprint"
    shards = sorted(p.name for p in single_dir.glob("*.safetensors"))
    assert shards == sorted(p.name for p in ddp_dir.glob("*.safetensors"))
    for name in shards:
        assert (single_dir / name).read_bytes() == (ddp_dir / name).read_bytes(), name
    sha256 = [
        json.loads((d / "meta.json").read_text())["shard_sha256"] for d in (single_dir, ddp_dir)
    ]
    assert sha256[0] == sha256[1] and sorted(sha256[0]) == shards
    assert len(ranks) == 2
    # The capture was shared out: shard n of the entry (splits in order) by rank n % 2.
    assert sorted(single[0]["wrote"]) == shards
    expected = [[n for k, n in enumerate(_in_order(shards)) if k % 2 == r] for r in range(2)]
    assert [sorted(r["wrote"]) for r in ranks] == [sorted(e) for e in expected]
    assert all(abs(len(r["wrote"]) - len(shards) / 2) <= 0.5 for r in ranks), "about half each"
    # Closed-form stages read the whole split on every rank, once each example.
    assert {r["full_split"] for r in ranks} == {single[0]["full_split"]} == {14}
    assert {r["checksum"] for r in ranks} == {single[0]["checksum"]}
    # The dataloaders split the dev examples across ranks (the sampler may pad duplicates).
    union = set(ranks[0]["seen"]) | set(ranks[1]["seen"])
    assert union == set(single[0]["seen"]) and len(union) == 14
