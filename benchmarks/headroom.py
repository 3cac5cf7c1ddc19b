"""The expert's headroom over the unsteered target per task, and what reading each input costs.

Input-dependent steering (`expert_conditioned`) can only pass on what the expert knows about an
input; this measures that room before any steering run: on the test items an experiment would
score (the same seeded split, sizes and seed from its YAML), both models unsteered, with the
evaluation's own scorer (label-word option log-likelihood, content-free calibration), and the
paired bootstrap interval and p-value of expert minus target. No alignment, vectors or dev
grid: two scoring passes per task.

With `--cost` it also times, per item, one unsteered target scoring forward (what every
evaluated item costs) against the expert's extra work under conditioned steering: one forward of
the prompt stopped at the reader's block (`expertsteer.models.capture.capture`, last prompt
token), here at the middle of the expert's blocks.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python \\
        benchmarks/headroom.py --config configs/experiments/expert_conditioned.yaml \\
        --tasks sst2 financial_phrasebank fiqa_sa boolq pubmedqa headline_price_up --cost

Prints a Markdown table and writes `--out` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from expertsteer.data.catalogue import resolve_task
from expertsteer.data.prompts import render_prompt
from expertsteer.data.splits import SplitSizes, make_splits
from expertsteer.data.tasks import load_task
from expertsteer.evaluation.evaluate import evaluate
from expertsteer.evaluation.stats import bootstrap_ci, paired_bootstrap_ci, paired_bootstrap_p
from expertsteer.models.capture import capture
from expertsteer.models.causal_lm import CausalLM
from expertsteer.models.zoo import load_model, resolve_dtype
from expertsteer.pipeline.experiment import load_experiment

TASKS = ("sst2", "financial_phrasebank", "fiqa_sa", "boolq", "pubmedqa", "headline_price_up")
"""The built-in yes/no and classification tasks."""


def _decoder(name: str, dtype: str) -> CausalLM:
    import torch

    return CausalLM.from_loaded(load_model(name, dtype=resolve_dtype(dtype, torch.device("cpu"))))


def headroom(
    expert: CausalLM, target: CausalLM, task_name: str, settings: Any, cost: bool
) -> dict[str, Any]:
    """Both models' test accuracy on one task and the paired expert - target difference."""
    task = load_task(resolve_task(task_name), settings.data_root)
    sizes = SplitSizes(settings.splits.steer, settings.splits.dev, settings.splits.test)
    examples = make_splits(task, sizes, settings.seed)["test"]
    batch = settings.evaluation.batch_size
    timings = {}
    results = {}
    for side, decoder in (("target", target), ("expert", expert)):
        started = time.perf_counter()
        results[side] = evaluate(decoder, task.type, examples, batch_size=batch)
        timings[side] = (time.perf_counter() - started) / len(examples)
    a, b = results["expert"].correct.double(), results["target"].correct.double()
    difference, low, high = paired_bootstrap_ci(a, b, n_boot=2000, seed=0)
    row = {
        "task": task.name,
        "type": task.type,
        "n": len(examples),
        "target": bootstrap_ci(b, n_boot=2000, seed=0),
        "expert": bootstrap_ci(a, n_boot=2000, seed=0),
        "headroom": {"difference": difference, "low": low, "high": high},
        "p": paired_bootstrap_p(a, b, n_boot=2000, seed=0),
        "seconds_per_item": timings,
    }
    if cost:
        prompts = [render_prompt(task.type, e) for e in examples]
        layer = expert.num_layers // 2
        started = time.perf_counter()
        capture(expert, prompts, [layer], "last", batch_size=batch)
        row["seconds_per_item"]["expert_reading"] = (time.perf_counter() - started) / len(prompts)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (models, splits, seed)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--cost", action="store_true", help="also time the expert's reading")
    parser.add_argument("--out", default="headroom.json")
    args = parser.parse_args()
    settings = load_experiment(args.config)
    dtype = settings.evaluation.model_dtype
    expert, target = _decoder(settings.expert, dtype), _decoder(settings.target, dtype)
    rows = []
    for task in args.tasks:
        rows.append(headroom(expert, target, task, settings, args.cost))
        # Written after every task: a long run that stops keeps what it measured.
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
        print(json.dumps(rows[-1]), flush=True)
    print("| task | n | target acc % | expert acc % | expert - target, points [95% CI] | p |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        h = row["headroom"]
        print(
            f"| {row['task']} | {row['n']} | {100 * row['target'][0]:.1f} | "
            f"{100 * row['expert'][0]:.1f} | {100 * h['difference']:+.1f} "
            f"[{100 * h['low']:+.1f}, {100 * h['high']:+.1f}] | {row['p']:.3f} |"
        )
    if args.cost:
        print("\n| task | target forward s/item | expert reading s/item | extra |")
        print("|---|---|---|---|")
        for row in rows:
            t = row["seconds_per_item"]
            print(
                f"| {row['task']} | {t['target']:.3f} | {t['expert_reading']:.3f} | "
                f"{100 * t['expert_reading'] / t['target']:.0f}% |"
            )


if __name__ == "__main__":
    main()
