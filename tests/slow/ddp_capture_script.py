"""Run the paired DataModule under a Lightning Trainer with N CPU processes (gloo).

Usage: python ddp_capture_script.py EXPERT_DIR TARGET_DIR CACHE_DIR DEVICES OUT_DIR
Each rank writes OUT_DIR/rank<k>.json: the dev ids its dataloader served, the number of
examples `split_tensors("dev")` returned, and the activation shards this rank wrote.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from datamodules import paired_activations
from tests.slow.ddp import cpu_trainer
from tests.tiny_data import tiny_datamodule

WRITTEN: list[str] = []


def _recording_write(path, *args):
    WRITTEN.append(path.name)
    _write_shard(path, *args)


_write_shard = paired_activations.write_shard
paired_activations.write_shard = _recording_write


class Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def validation_step(self, batch, batch_idx):
        self.seen.extend(batch["id"])

    def on_validation_end(self) -> None:
        dev = self.trainer.datamodule.split_tensors("dev")
        record = {
            "seen": self.seen,
            "full_split": len(dev["id"]),
            "checksum": float(dev["expert"].double().sum()),
            "wrote": WRITTEN,
        }
        out = Path(sys.argv[5]) / f"rank{self.global_rank}.json"
        out.write_text(json.dumps(record))


def main() -> None:
    expert, target, cache, devices = sys.argv[1:5]
    torch.manual_seed(0)
    module = tiny_datamodule(
        {"expert": expert, "target": target},
        cache,
        steer_size=10,
        dev_size=7,
        test_size=6,
        shard_size=4,
        batch_size=2,
    )
    trainer = cpu_trainer(devices)
    trainer.validate(Recorder(), datamodule=module)


if __name__ == "__main__":
    main()
