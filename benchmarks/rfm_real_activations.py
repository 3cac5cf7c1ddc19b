"""RFM against the baselines on real expert activations: correct vs wrong answers.

Captures (or reuses from the cache) last-token states of the packaged pair on one task's
steering items — prompt + correct answer (1) vs prompt + a wrong answer (0) — then, for each
requested expert layer, in the expert's raw space:

* RFM (`fit_rfm`, default settings): dev AUROC of the KRR predictor per iteration (the selected
  bandwidth) and dev AUROC of projections on its top AGOP eigenvector;
* mean-difference (CAA), PCA of differences and a logistic probe: dev AUROC of projections on
  their direction (and, for the probe, of its own logits).

Numbers are on the dev split; the test split is not touched.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rfm_real_activations.py --task arc_easy
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from datamodules.paired_activations import PairedActivationDataModule as DataModule
from expertsteer.method.extractors import extract
from expertsteer.method.rfm import RFMConfig, auroc, fit_rfm
from expertsteer.models.zoo import DEFAULT_EXPERT, DEFAULT_TARGET

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--expert", default=DEFAULT_EXPERT)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12, 18])
    parser.add_argument("--steer", type=int, default=200)
    parser.add_argument("--dev", type=int, default=100)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    data = DataModule(
        expert=args.expert,
        target=args.target,
        task=args.task,
        data_root=str(DATA_ROOT),
        steer_size=args.steer,
        dev_size=args.dev,
        test_size=args.test,
    )
    started = time.perf_counter()
    data.prepare_data()
    data.setup("fit")
    print(f"activations ready in {time.perf_counter() - started:.1f} s: {data.cache_path()}")
    steer, dev = data.split_tensors("steer"), data.split_tensors("dev")
    layers = data.keys()[0].layers
    print(f"steer items {len(steer['id'])}, dev items {len(dev['id'])} (half correct, half wrong)")
    results = {}
    for layer in args.layers:
        index = layers.index(layer)
        x, y = steer["expert"][:, index].double(), steer["label"]
        xv, yv = dev["expert"][:, index].double(), dev["label"]
        tic = time.perf_counter()
        fit = fit_rfm(x, y, xv, yv, RFMConfig())
        seconds = time.perf_counter() - tic
        centred = xv - x.mean(0)
        row = {
            "rfm_predictor_auroc_per_iteration": [round(v, 4) for v in fit.val_auroc],
            "rfm_best_iteration": fit.best_iteration,
            "rfm_bandwidth": fit.bandwidth,
            "rfm_direction_auroc": auroc(centred @ fit.direction, yv),
            "rfm_seconds": seconds,
        }
        for method in ("mean_diff", "pca_diff", "logistic", "random"):
            direction = extract(method, x, y, xv, yv)
            row[f"{method}_direction_auroc"] = auroc(centred @ direction, yv)
        results[layer] = row
        print(f"\nexpert layer {layer}:")
        print(
            f"  RFM predictor dev AUROC per iteration: {row['rfm_predictor_auroc_per_iteration']}"
        )
        print(
            f"  (best iteration {fit.best_iteration}, bandwidth {fit.bandwidth:.4g}, "
            f"{seconds:.1f} s)"
        )
        print("  | direction | dev AUROC of projections |")
        print("  |---|---|")
        for name in ("rfm", "mean_diff", "pca_diff", "logistic", "random"):
            print(f"  | {name} | {row[f'{name}_direction_auroc']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
