"""Fit an AlignmentModule under a Lightning Trainer with N CPU processes (gloo).

Usage: python ddp_alignment_script.py EXPERT_DIR TARGET_DIR CACHE_DIR DEVICES OUT_DIR
Rank 0 writes the alignment artifacts into OUT_DIR; every rank writes OUT_DIR/rank<k>.json with
its final dev reconstruction loss (whole dev split) and the MI matrix it computed.
"""

import json
import sys
from pathlib import Path

import torch

from expertsteer.method.align import TrainingConfig
from expertsteer.method.pair import MIConfig
from lightning_modules.alignment import AlignmentModule
from tests.slow.ddp import cpu_trainer
from tests.tiny_data import tiny_datamodule


def main() -> None:
    expert, target, cache, devices, out = sys.argv[1:6]
    torch.manual_seed(0)
    data = tiny_datamodule(
        {"expert": expert, "target": target},
        cache,
        item_kind="prompts",
        steer_size=120,
        dev_size=200,
        # Same global batch (16) and so the same number of optimiser steps as one process.
        batch_size=16 // int(devices),
    )
    module = AlignmentModule(
        training=TrainingConfig(lr=1e-2), mi=MIConfig(mi_rank=4), output_dir=out
    )
    trainer = cpu_trainer(devices, max_epochs=60)
    trainer.fit(module, datamodule=data)
    dev = data.split_tensors("dev")["expert"].float()
    with torch.no_grad():
        loss = float(module.autoencoders.cpu().float().reconstruction_loss(dev).mean())
    record = {"dev_recon_loss": loss, "mi": module.mi.tolist(), "pairs": module.selected_pairs}
    (Path(out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
