"""Alignment and MI pairing on the packaged pair, with one benchmark's prompts.

Captures (or reuses) last-prompt-token states of every layer of the expert and the target,
trains the batched auto-encoders with the AlignmentModule under a Lightning Trainer (early
stopping on `val/recon_loss`), then times the MI matrix over all expert x target layer pairs
with each estimator and prints the explained variance per layer, the chosen pairs and where the
heatmap is.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/alignment_packaged.py --task sst2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from datamodules.paired_activations import PairedActivationDataModule as DataModule
from expertsteer.method.align import TrainingConfig, explained_variance
from expertsteer.method.pair import MIConfig, PairingConfig, mi_matrix, select_pairs
from expertsteer.models.zoo import DEFAULT_EXPERT, DEFAULT_TARGET
from lightning_modules.alignment import AlignmentModule

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--expert", default=DEFAULT_EXPERT)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--steer", type=int, default=300)
    parser.add_argument("--dev", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-align"))
    args = parser.parse_args()

    data = DataModule(
        expert=args.expert,
        target=args.target,
        task=args.task,
        data_root=str(DATA_ROOT),
        item_kind="prompts",
        steer_size=args.steer,
        dev_size=args.dev,
        test_size=args.test,
        batch_size=64,
    )
    started = time.perf_counter()
    data.prepare_data()
    print(f"activations ready in {time.perf_counter() - started:.1f} s: {data.cache_path()}")

    module = AlignmentModule(training=TrainingConfig(lr=3e-3), output_dir=str(args.out))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.max_epochs,
        default_root_dir=args.out,
        logger=False,
        enable_progress_bar=False,
        callbacks=[
            EarlyStopping(monitor="val/recon_loss", patience=6),
            ModelCheckpoint(dirpath=args.out / "checkpoints", monitor="val/recon_loss"),
        ],
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - started
    dev = data.split_tensors("dev")
    with torch.no_grad():
        variance = explained_variance(module.autoencoders.cpu().float(), dev["expert"].float())
        encoded = module.mi_states(dev["expert"].float())
    print(
        f"\nauto-encoders ({module.autoencoders.num_layers} layers): {trainer.current_epoch} "
        f"epochs in {fit_seconds:.1f} s (fit incl. MI at each validation end)"
    )
    print(
        f"dev explained variance per layer: min {variance.min():.4f}, "
        f"median {variance.median():.4f}, max {variance.max():.4f}"
    )
    print("  " + " ".join(f"{v:.3f}" for v in variance.tolist()))
    expert_layers, target_layers = data.keys()[0].layers, data.keys()[1].layers
    depth = {"num_expert_layers": data.dims()["expert"][1]}
    depth["num_target_layers"] = data.dims()["target"][1]
    report = {"fit_seconds": fit_seconds, "explained_variance": variance.tolist()}
    for estimator in ("gaussian", "ksg"):
        started = time.perf_counter()
        mi = mi_matrix(encoded, dev["target"].float(), MIConfig(estimator=estimator))
        seconds = time.perf_counter() - started
        pairs = select_pairs(
            mi,
            PairingConfig(top_k=3),
            expert_layers=expert_layers,
            target_layers=target_layers,
            **depth,
        )
        chosen = [(expert_layers[i], target_layers[j], round(float(mi[i, j]), 4)) for i, j in pairs]
        print(
            f"\nMI {estimator}: {mi.shape[0]}x{mi.shape[1]} pairs in {seconds:.2f} s; "
            f"range {mi.nan_to_num(nan=float('inf')).min():.3f}..{mi.nan_to_num(nan=0).max():.3f}"
        )
        print(f"  3 lowest-MI pairs in the target window (expert, target, MI): {chosen}")
        report[estimator] = {"seconds": seconds, "pairs": chosen, "mi": mi.tolist()}
    print(f"\npairs.json: {json.loads((args.out / 'pairs.json').read_text())['pairs']}")
    print(f"heatmap: {args.out / 'mi_heatmap.png'}")
    (args.out / "bench.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
