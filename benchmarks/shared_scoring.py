"""Steered option scoring from shared forwards against plain forwards, on the packaged SmolLM2.

The evaluation stage scores every dev item under every configuration (methods and null draws x
signed alphas). This script times, on ARC-Easy items in letter mode (the default for choice
tasks: one forward row per item), with a grid of random unit vectors at block j:

* `plain`: unsteered forwards of the items (`score_options` without steering), items/s;
* `separate`: one nnsight-steered forward per configuration (the path before sharing);
* `trunk`: shared forwards, blocks 0..j once per batch and each configuration from there;
* `trunk+prefix`: also the common prefix (chat template, task instruction) from stored keys /
  values, forwarded once per configuration (the store is warm, as in an evaluation, where it is
  filled by the first batch; the cold first call is printed too).

Each steered figure is scored (item x configuration) pairs per second, and its ratio to plain
items per second. Branching at block j of an L-block model leaves (L - j) / L of a forward per
pair, so the trunk alone can reach at most L / (L - j) pairs per plain forward: the limit the
last line compares with. The prefix saves tokens as well, so the shared path can pass it.
The scores of every path are checked against `separate` (max |difference| printed).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/shared_scoring.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from expertsteer.data.catalogue import BUILTIN
from expertsteer.data.prompts import render_prompt
from expertsteer.data.tasks import load_task
from expertsteer.evaluation.branching import PrefixStore
from expertsteer.evaluation.calibration import option_completions
from expertsteer.evaluation.options import OptionScores, score_options, score_options_grid
from expertsteer.method.steer import Intervention, mean_residual_norms
from expertsteer.models.causal_lm import CausalLM
from expertsteer.models.zoo import load_model

ALPHAS = (-0.9, -0.3, -0.1, 0.1, 0.3, 0.9)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--vectors", type=int, default=2, help="random vectors x 6 alphas")
    parser.add_argument("--layer", type=int, default=None, help="block j (default: middle)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--config-batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's dtype"
    )
    parser.add_argument(
        "--quick", action="store_true", help="4 items, 1 vector, one repeat (< 1 min)"
    )
    args = parser.parse_args()
    if args.quick:
        args.items, args.vectors, args.repeats, args.config_batches = 4, 1, 1, [2]
    return args


def grid(decoder: CausalLM, prompts: list[str], layer: int, count: int) -> list[Intervention]:
    """`count` seeded random unit vectors at `layer` x the signed alpha grid."""
    scales = mean_residual_norms(decoder, prompts, [layer], skip_first=1)
    generator = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(
        torch.randn(count, decoder.hidden_size, generator=generator), dim=1
    )
    return [
        Intervention({layer: vector}, scales, alpha=alpha, positions="all")
        for vector in vectors
        for alpha in ALPHAS
    ]


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` calls, and the last call's result."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def max_difference(a: list[OptionScores], b: list[OptionScores]) -> float:
    return max(float((x.total - y.total).abs().max()) for x, y in zip(a, b, strict=True))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    decoder = CausalLM.from_loaded(load_model(args.model, dtype=args.dtype))
    task = load_task(BUILTIN[args.task])
    examples = task.pools["test"][: args.items]
    prompts = [render_prompt(task.type, example) for example in examples]
    options = [option_completions(task.type, example, "letter") for example in examples]
    layer = decoder.num_layers // 2 if args.layer is None else args.layer
    interventions = grid(decoder, prompts, layer, args.vectors)
    items, configs, size = len(prompts), len(interventions), args.batch_size

    def separate() -> list[OptionScores]:
        return [score_options(decoder, prompts, options, iv, size) for iv in interventions]

    def shared(store: PrefixStore | None, config_batch: int) -> list[OptionScores]:
        return score_options_grid(
            decoder, prompts, options, interventions, size, True, store, config_batch
        )

    score_options(decoder, prompts, options, None, size)  # warm-up
    plain_s, _ = timed(lambda: score_options(decoder, prompts, options, None, size), 3)
    forwards = items / plain_s
    pairs = items * configs
    print(f"{args.model}: {decoder.num_layers} blocks, steering block {layer}; {items} items")
    print(f"{configs} configurations ({args.vectors} vectors x {len(ALPHAS)} alphas)")
    print(f"plain forwards: {forwards:.2f} items/s")
    separate_s, reference = timed(separate, args.repeats)
    print(f"separate: {pairs / separate_s:.2f} pairs/s, ratio {pairs / separate_s / forwards:.2f}")
    best = 0.0
    for config_batch in args.config_batches:
        trunk_s, trunk = timed(lambda cb=config_batch: shared(None, cb), args.repeats)
        store = PrefixStore()
        cold_s, _ = timed(lambda cb=config_batch, st=store: shared(st, cb), 1)
        warm_s, warm = timed(lambda cb=config_batch, st=store: shared(st, cb), args.repeats)
        difference = max(max_difference(trunk, reference), max_difference(warm, reference))
        ratio = pairs / warm_s / forwards
        best = max(best, ratio)
        print(
            f"config_batch {config_batch}: trunk {pairs / trunk_s:.2f} pairs/s (ratio "
            f"{pairs / trunk_s / forwards:.2f}); trunk+prefix {pairs / warm_s:.2f} pairs/s (ratio "
            f"{ratio:.2f}; cold first call {pairs / cold_s:.2f}); max |score - separate| "
            f"{difference:.1e}"
        )
    limit = decoder.num_layers / (decoder.num_layers - layer)
    cost = (decoder.num_layers - layer) / decoder.num_layers
    print(
        f"limit: a pair costs (L - j) / L = {cost:.3f} of a forward, {limit:.2f} pairs per forward"
    )
    print(f"ratio {best:.2f} of the limit {limit:.2f}")


if __name__ == "__main__":
    main()
