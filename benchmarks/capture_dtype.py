"""Capture in bfloat16 against float32 on this machine: throughput and how far the states move.

For each packaged model (default: the demo's target and expert), the script captures the
steering items of a task (prompt + correct / wrong answer, chat template, the last token: what
the fitting stages capture) through the project's nnsight capture path, once in float32 and
once in bfloat16, and prints

* tokens per second of each dtype and their ratio (the capture cost of `model_dtype`);
* the median over items of |h_bf16 - h_fp32| / |h_fp32| per block (min and max over blocks);
* the cosine between the two dtypes' mean-difference directions (correct minus wrong answer),
  the smallest over blocks: the quantity a steering vector is built from.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/capture_dtype.py --items 48
"""

from __future__ import annotations

import argparse
import time

import torch

from expertsteer.data.catalogue import resolve_task
from expertsteer.data.prompts import steering_items
from expertsteer.data.splits import SplitSizes, make_splits
from expertsteer.data.tasks import load_task
from expertsteer.method.extractors import mean_difference
from expertsteer.models.capture import capture
from expertsteer.models.causal_lm import CausalLM
from expertsteer.models.zoo import DEFAULT_EXPERT, DEFAULT_TARGET, load_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[DEFAULT_TARGET, DEFAULT_EXPERT])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--items", type=int, default=48, help="steer examples (x2 texts)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    return parser.parse_args()


def timed_capture(decoder: CausalLM, items: list, batch_size: int) -> tuple[dict, float]:
    start = time.perf_counter()
    states = capture(
        decoder,
        [item.prompt for item in items],
        completions=[item.completion for item in items],
        batch_size=batch_size,
    )
    return states, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = load_task(resolve_task(args.task))
    examples = make_splits(task, SplitSizes(steer=args.items, dev=1, test=1))["steer"]
    items = steering_items(task, examples)
    labels = torch.tensor([item.label for item in items])
    print(
        f"{args.task}: {len(items)} steering texts, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    for name in args.models:
        runs = {}
        for dtype in ("float32", "bfloat16"):
            decoder = CausalLM.from_loaded(load_model(name, dtype=dtype))
            tokens = sum(
                decoder.token_lengths([i.prompt for i in items], [i.completion for i in items])
            )
            capture(decoder, [items[0].prompt], completions=[items[0].completion])  # warm-up
            states, seconds = timed_capture(decoder, items, args.batch_size)
            runs[dtype] = (states, tokens / seconds)
        reference, fast = runs["float32"][0], runs["bfloat16"][0]
        errors, cosines = [], []
        for layer, exact in reference.items():
            rough = fast[layer].float()
            errors.append(float(((rough - exact).norm(dim=1) / exact.norm(dim=1)).median()))
            pair = (mean_difference(exact, labels), mean_difference(rough, labels))
            cosines.append(float(torch.nn.functional.cosine_similarity(*pair, dim=0)))
        fp32, bf16 = runs["float32"][1], runs["bfloat16"][1]
        print(
            f"{name}: float32 {fp32:.0f} tokens/s, bfloat16 {bf16:.0f} tokens/s "
            f"(ratio {bf16 / fp32:.2f}); median relative state error per block "
            f"{min(errors):.4f}-{max(errors):.4f}; mean-difference cos >= {min(cosines):.4f}"
        )


if __name__ == "__main__":
    main()
