"""Does anything of the expert reach the target? Transfer diagnostics before any steering.

For each task: capture paired states (sequence-level steer / dev items, and token-level pairs of
a generic corpus plus the task's steer items), fit the paper's `recon` auto-encoders over
several encoder seeds and the target-tied `translate` ridge maps, pick the pair, and report per
alignment:

* held-out R^2 of the map at the pair (and with shuffled pairs), on steer items' positions and
  on the dev split's sequence-level states;
* for mean-difference and RFM directions fitted on encoded expert states: cosine with the
  target's own direction from the same extractor, beside the 95th percentile of |cosine| of
  mapped random expert directions (the null); dev AUROC of target dev states projected on the
  mapped, the target-native and random directions.

    python benchmarks/transfer_diagnostics.py --tasks sst2 financial_phrasebank
    python benchmarks/transfer_diagnostics.py --capture-only   # fill the caches first

Writes a JSON file with every figure (`--out`) and prints one table per task.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from datamodules.paired_activations import PairedActivationDataModule
from expertsteer.data.token_pairs import CorpusConfig
from expertsteer.evaluation.transfer import (
    direction_diagnostics,
    mapped_random_directions,
    native_direction,
)
from expertsteer.method.align import TrainingConfig
from expertsteer.method.extractors import extract
from expertsteer.method.pair import MIConfig
from expertsteer.method.translate import TranslateConfig
from expertsteer.models.zoo import DEFAULT_EXPERT, DEFAULT_TARGET
from lightning_modules.alignment import AlignmentModule

DATA_ROOT = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks")


def datamodule(args: argparse.Namespace, task: str) -> PairedActivationDataModule:
    return PairedActivationDataModule(
        expert=args.expert,
        target=args.target,
        task=task,
        data_root=args.data_root,
        steer_size=args.steer,
        dev_size=args.dev,
        test_size=args.test,
        seed=0,
        capture_splits=["steer", "dev"],
        corpus=CorpusConfig(size=args.corpus_size, steer_items=not args.no_steer_items),
        model_dtype=args.model_dtype,
    )


def fit_alignment(
    data: PairedActivationDataModule,
    objective: str,
    seed: int,
    root: Path,
    pairs: list[list[int]] | None = None,
    matrix: bool = False,
) -> AlignmentModule:
    """One alignment stage as the experiment runs it (recon: early stopping on the dev
    reconstruction loss, best checkpoint kept; translate: one closed-form epoch)."""
    L.seed_everything(seed, verbose=False)
    module = AlignmentModule(
        objective=objective,
        pairs=pairs,
        training=TrainingConfig(lr=3e-3),
        mi=MIConfig(mi_rank=16),
        translate=TranslateConfig(matrix=matrix),
    )
    callbacks = []
    if objective == "recon":
        callbacks = [
            EarlyStopping(monitor="val/recon_loss", patience=5),
            ModelCheckpoint(dirpath=root / "ckpt", monitor="val/recon_loss", save_top_k=1),
        ]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=40 if objective == "recon" else 1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=objective == "recon",
        callbacks=callbacks,
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=data)
    return module


def diagnose(module: AlignmentModule, pair: tuple[int, int], seed: int = 0) -> dict:
    """Map R^2 and direction diagnostics of `module`'s encoder at `pair` (capture indices)."""
    data = module.trainer.datamodule
    steer, dev = data.split_tensors("steer"), data.split_tensors("dev")
    i, j = pair
    aligner = module.autoencoders.double().cpu()
    y, y_dev = steer["label"], dev["label"]
    target, target_dev = steer["target"][:, j].double(), dev["target"][:, j].double()
    with torch.no_grad():
        codes = aligner.encode(i, steer["expert"][:, i].double())
        codes_dev = aligner.encode(i, dev["expert"][:, i].double())
    null = mapped_random_directions(
        lambda v: aligner.encode_direction(i, v), aligner.expert_std[i], seed=seed
    )
    directions = {}
    for method in ("mean_diff", "rfm"):
        center = codes.mean(0)
        mapped = extract(method, codes - center, y, codes_dev - center, y_dev, seed=seed)
        native = native_direction(method, target, y, target_dev, y_dev, seed=seed)
        directions[method] = direction_diagnostics(
            mapped, native, null, target, y, target_dev, y_dev, seed=seed
        )
    module.autoencoders.float()
    return {**module.map_r2(i, j), "directions": directions}


def task_rows(args: argparse.Namespace, task: str, root: Path) -> dict:
    data = datamodule(args, task)
    started = time.perf_counter()
    data.prepare_data()
    data.setup("fit")
    tokens = data.token_pairs()
    timing = {"capture_s": round(time.perf_counter() - started, 1)}
    meta = AlignmentModule.describe(data)
    real = lambda pair: [meta["expert_layers"][pair[0]], meta["target_layers"][pair[1]]]  # noqa: E731
    rows, pairs = [], {}
    for seed in range(args.recon_seeds):
        started = time.perf_counter()
        module = fit_alignment(data, "recon", seed, root / task / f"recon{seed}", matrix=seed == 0)
        timing.setdefault("recon_fit_s", []).append(round(time.perf_counter() - started, 1))
        if seed == 0:
            pairs["lowest_mi"] = module.selected_pairs[0]
            r2 = module.r2
            window = r2.nan_to_num(-math.inf)
            flat = int(window.argmax())
            pairs["translatable"] = divmod(flat, r2.shape[1])
            mi = {"mi": module.mi, "mi_shuffled": module.mi_shuffled}
        for name, pair in pairs.items():
            rows.append(
                {
                    "alignment": f"recon seed {seed}",
                    "pair_by": name,
                    "pair": real(pair),
                    **diagnose(module, pair),
                }
            )
    for name, pair in pairs.items():
        started = time.perf_counter()
        module = fit_alignment(
            data, "translate", 0, root / task / f"translate_{name}", pairs=[real(pair)]
        )
        timing.setdefault("translate_fit_s", []).append(round(time.perf_counter() - started, 1))
        rows.append(
            {
                "alignment": "translate",
                "pair_by": name,
                "pair": real(pair),
                **diagnose(module, pair),
            }
        )
    i, j = pairs["lowest_mi"]
    return {
        "task": task,
        "positions": int(tokens["positions"]),
        "heldout_positions": int(tokens["heldout"].sum()),
        "steer_positions": int((tokens["source"] == 1).sum()),
        "token_capture_s": tokens["capture_seconds"],
        "timing": timing,
        "mi_at_lowest_mi_pair": float(mi["mi"][i, j]),
        "mi_shuffled_at_lowest_mi_pair": float(mi["mi_shuffled"][i, j]),
        "mi_range": [float(mi["mi"].nanquantile(0.05)), float(mi["mi"].nanquantile(0.95))],
        "mi_shuffled_range": [
            float(mi["mi_shuffled"].nanquantile(0.05)),
            float(mi["mi_shuffled"].nanquantile(0.95)),
        ],
        "rows": rows,
    }


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def print_table(result: dict) -> None:
    print(
        f"\n## {result['task']}: {result['positions']} paired positions "
        f"({result['steer_positions']} from steer items, {result['heldout_positions']} held "
        f"out); MI at the lowest-MI pair {result['mi_at_lowest_mi_pair']:.3f} nats, shuffled "
        f"{result['mi_shuffled_at_lowest_mi_pair']:.3f}\n"
    )
    print(
        "| alignment | pair (by) | R2 held-out | R2 shuffled | R2 steer items | R2 dev items "
        "| extractor | cos native | null p95 | AUROC mapped | native | random |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        for method, d in row["directions"].items():
            print(
                f"| {row['alignment']} | {row['pair'][0]}->{row['pair'][1]} ({row['pair_by']}) "
                f"| {_f(row.get('heldout_r2'))} | {_f(row.get('shuffled_r2'))} "
                f"| {_f(row.get('steer_items_r2'))} | {_f(row.get('dev_items_r2'))} | {method} "
                f"| {d['cos_target_native']:.3f} | {d['null_cos_p95']:.3f} "
                f"| {d['auroc_mapped']:.3f} | {d['auroc_native']:.3f} | {d['auroc_random']:.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "financial_phrasebank", "arc_easy"])
    parser.add_argument("--expert", default=DEFAULT_EXPERT)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--data-root", default=os.environ.get("EXPERTSTEER_DATA", DATA_ROOT))
    parser.add_argument("--steer", type=int, default=200)
    parser.add_argument("--dev", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--corpus-size", type=int, default=500)
    parser.add_argument("--recon-seeds", type=int, default=5)
    parser.add_argument(
        "--model-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="capture dtype (auto: bfloat16 on CUDA, else float32; bfloat16 ~2x faster on a "
        "CPU with native bfloat16, benchmarks/capture_dtype.py)",
    )
    parser.add_argument(
        "--no-steer-items",
        action="store_true",
        help="fit the maps on the generic corpus only (the task's steer items left out)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/transfer_diagnostics.json"))
    parser.add_argument("--work", type=Path, default=Path("runs/transfer_diagnostics"))
    parser.add_argument("--capture-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    results = []
    for task in args.tasks:
        if args.capture_only:
            started = time.perf_counter()
            datamodule(args, task).prepare_data()
            print(json.dumps({"task": task, "capture_s": round(time.perf_counter() - started)}))
            continue
        results.append(task_rows(args, task, args.work))
        print_table(results[-1])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "settings": vars(args) | {"out": str(args.out), "work": str(args.work)},
                    "tasks": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
