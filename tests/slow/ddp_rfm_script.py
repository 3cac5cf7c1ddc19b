"""Fit a VectorsModule (RFM) under a Lightning Trainer with N CPU processes (gloo).

Usage: python ddp_rfm_script.py EXPERT_DIR TARGET_DIR CACHE_DIR DEVICES OUT_DIR
Writes OUT_DIR/steering.safetensors (rank 0) and OUT_DIR/rank<k>.json: the vector every rank
holds and the epochs it ran.
"""

import json
import sys
from pathlib import Path

import torch

from expertsteer.method.rfm import VectorsConfig
from lightning_modules.vectors import VectorsModule
from tests.slow.ddp import cpu_trainer
from tests.tiny_data import tiny_datamodule


def main() -> None:
    expert, target, cache, devices, out = sys.argv[1:6]
    torch.manual_seed(0)
    data = tiny_datamodule(
        {"expert": expert, "target": target}, cache, steer_size=30, dev_size=15, batch_size=8
    )
    module = VectorsModule(
        source="target", pairs=[[0, 1], [0, 2]], rfm=VectorsConfig(iterations=3), output_dir=out
    )
    trainer = cpu_trainer(devices, max_epochs=50)
    trainer.fit(module, datamodule=data)
    steering = module.steering_vectors()
    record = {
        "epochs": trainer.current_epoch,
        "vectors": {str(k): v.tolist() for k, v in steering.vectors.items()},
        "fits": steering.metadata["fits"],
    }
    (Path(out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
