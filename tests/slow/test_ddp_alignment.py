"""DDP with 2 CPU processes (gloo): the alignment stage gives the one-process MI matrix and
pairs, and auto-encoders of equal quality."""

import json
from pathlib import Path

import pytest
import torch

from expertsteer.artifacts import MI_FILE, PAIRS_FILE, load_artifact
from tests.slow.ddp import run_script
from tests.tiny import tiny_pair

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("ddp_alignment_script.py")


def _run(tmp_path, models, devices):
    out = tmp_path / f"out{devices}"
    ranks = run_script(SCRIPT, models, tmp_path / "cache", devices, out)
    mi, _ = load_artifact(out / MI_FILE, "mi")
    return mi["mi"], json.loads((out / PAIRS_FILE).read_text()), ranks


def test_two_process_alignment_matches_one_process(tmp_path):
    models = tiny_pair(tmp_path)
    mi_one, pairs_one, (one,) = _run(tmp_path, models, 1)
    mi_ddp, pairs_ddp, ranks = _run(tmp_path, models, 2)
    assert len(ranks) == 2
    # Both ranks hold the same weights' MI (computed from the whole dev split on each).
    assert ranks[0]["mi"] == ranks[1]["mi"]
    assert ranks[0]["dev_recon_loss"] == ranks[1]["dev_recon_loss"]

    # MI equal within 2% (the trained encoders differ only by the optimisation path: 2 ranks
    # see other mini-batches) and the same pairs.
    torch.testing.assert_close(mi_ddp, mi_one, rtol=0.02, atol=1e-3)

    def layers(payload):
        return [(p["expert_layer"], p["target_layer"]) for p in payload["pairs"]]

    assert layers(pairs_ddp) == layers(pairs_one), (mi_one, mi_ddp)
    # Auto-encoders of equal quality: dev reconstruction loss within 2%.
    assert abs(ranks[0]["dev_recon_loss"] - one["dev_recon_loss"]) <= 0.02 * one["dev_recon_loss"]
