"""Cost of steering on the packaged SmolLM2, in one process.

Generation (batch of ARC-Easy prompts, greedy, exactly `--new-tokens` new tokens each): tokens/s
unsteered and steered through `expertsteer.method.steer` (nnsight), against plain transformers
`generate` unsteered and steered by the `steering-vectors` library (forward hooks), with the same
vector (a random unit direction at a middle block, alpha * s_j). Scoring: items/s of option
log-likelihoods (4 options per ARC item) by `steered_logits`, unsteered and steered. Behaviour
generation: tokens/s of `expertsteer.evaluation.behaviour.continue_prompts` (plain-text
continuations with per-row additions, scored for perplexity) over a grid of `--configs` steered
configurations x `--batch-size` prompts in shared batches, against the same prompts unsteered,
as a ratio. Input-dependent steering (`--conditioned-only`, also run by default): the same
items scored with a per-item push (`Intervention.coefficients`) plus what it costs to read each
item with the expert first (`expertsteer.models.capture.capture` at `--reader-layer`, the
paired expert block of the run), against the unsteered target scoring the items.

Runs are interleaved and repeated so that load from other processes on a shared CPU hits every
method alike; medians are reported. `steering-vectors` is a benchmark-only dependency:

    .venv/bin/pip install --no-deps steering-vectors==0.12.2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/steering_throughput.py [--repeats 5]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/steering_throughput.py --behaviour-only
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/steering_throughput.py --conditioned-only \\
        --reader-layer 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from expertsteer.evaluation.behaviour import Row, continue_prompts
from expertsteer.method.steer import (
    Intervention,
    mean_residual_norms,
    prompt_lengths,
    steered_generate_ids,
    steered_logits,
)
from expertsteer.models.causal_lm import CausalLM
from expertsteer.models.zoo import load_model

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/benchmarks/arc/ARC-Easy/test.json"
OPTIONS = [f"the correct answer is answer{k}" for k in range(1, 5)]


def arc_prompts(path: Path, count: int) -> list[str]:
    rows = json.loads(path.read_text())
    return [row["instruction"] for row in rows[:count]]


def interleaved(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per method; each repeat runs every method once, in turn."""
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in methods.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) for name, times in samples.items()}


def score(decoder: CausalLM, prompts: list[str], intervention: Intervention | None, batch: int):
    """Summed log-likelihood of each option text after each prompt: [items, options]. A
    conditioned intervention has one coefficient row per prompt."""
    rows = [(prompt, option) for prompt in prompts for option in OPTIONS]
    totals = []
    for start in range(0, len(rows), batch):
        questions, answers = zip(*rows[start : start + batch], strict=True)
        encoding = decoder.encode(list(questions), list(answers))
        lengths = prompt_lengths(decoder, list(questions), list(answers))
        steering = intervention
        if intervention is not None and intervention.conditioned:
            items = [k // len(OPTIONS) for k in range(start, start + len(questions))]
            steering = intervention.for_rows(items)
        log_probs = steered_logits(decoder, encoding, steering, lengths)
        ids = encoding["input_ids"]
        picked = log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        real = encoding["attention_mask"].sum(-1, keepdim=True)
        # Column t + 1 of a row is an answer token when its rank among real tokens >= length.
        rank = encoding["attention_mask"].cumsum(-1)[:, 1:] - 1
        answer = (rank >= lengths[:, None]) & (rank < real)
        totals.append((picked * answer).sum(-1))
    return torch.cat(totals).reshape(len(prompts), len(OPTIONS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--items", type=int, default=8, help="ARC items scored (4 options)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--layer", type=int, default=None, help="default: the middle block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", type=int, default=4, help="behaviour: steered configs")
    parser.add_argument(
        "--behaviour-only", action="store_true", help="only the behaviour generation"
    )
    parser.add_argument(
        "--conditioned-only", action="store_true", help="only input-dependent steering's cost"
    )
    parser.add_argument("--expert", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument(
        "--reader-layer", type=int, default=None, help="expert block read (default: middle)"
    )
    # On a CPU shared with other busy processes, two OpenMP threads ran a forward 4x slower
    # than one (threads spin at barriers while a sibling is descheduled).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    decoder = CausalLM.from_loaded(load_model(args.model))
    layer = decoder.num_layers // 2 if args.layer is None else args.layer
    prompts = arc_prompts(args.data, max(args.batch_size, args.items))
    batch = prompts[: args.batch_size]
    scales = mean_residual_norms(decoder, prompts, [layer])
    vector = torch.nn.functional.normalize(
        torch.randn(decoder.hidden_size, generator=torch.Generator().manual_seed(0)), dim=0
    )
    if args.behaviour_only:
        behaviour_generation(decoder, prompts, layer, scales[layer], vector, args)
        return
    if args.conditioned_only:
        conditioned_scoring(decoder, prompts[: args.items], layer, scales, vector, args)
        return
    from steering_vectors import SteeringVector

    ours = Intervention({layer: vector}, scales, alpha=args.alpha, positions="all")
    peer = SteeringVector({layer: args.alpha * scales[layer] * vector}, "decoder_block")

    encoding = decoder.encode(batch)
    width = encoding["input_ids"].shape[1]
    # min_new_tokens: every method generates the same number of tokens, whatever EOS does.
    fixed = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    pad = decoder.tokenizer.pad_token_id

    def hf_generate() -> torch.Tensor:
        with torch.inference_mode():
            ids = decoder.hf_model.generate(**encoding, pad_token_id=pad, **fixed)
        return ids[:, width:]

    def peer_generate() -> torch.Tensor:
        with peer.apply(decoder.hf_model):
            return hf_generate()

    generation = {
        "transformers, unsteered": hf_generate,
        "steering-vectors, steered": peer_generate,
        "expertsteer, unsteered": lambda: steered_generate_ids(
            decoder, batch, None, args.new_tokens, min_new_tokens=args.new_tokens
        ),
        "expertsteer, steered": lambda: steered_generate_ids(
            decoder, batch, ours, args.new_tokens, min_new_tokens=args.new_tokens
        ),
    }
    same = torch.equal(
        generation["steering-vectors, steered"](), generation["expertsteer, steered"]()
    )
    changed = not torch.equal(hf_generate(), generation["expertsteer, steered"]())
    gen_s = interleaved(generation, args.repeats)

    tokens = args.batch_size * args.new_tokens
    print(
        f"\n{args.model}: batch {args.batch_size} x {args.new_tokens} new tokens (greedy), "
        f"block {layer}, alpha {args.alpha} (s_j = {scales[layer]:.2f}), median of "
        f"{args.repeats} interleaved runs, {torch.get_num_threads()} threads\n"
    )
    print("| generation | s | tokens/s |")
    print("|---|---|---|")
    for name, seconds in gen_s.items():
        print(f"| {name} | {seconds:.3f} | {tokens / seconds:.1f} |")
    ours_cost = gen_s["expertsteer, steered"] / gen_s["expertsteer, unsteered"] - 1
    peer_cost = gen_s["steering-vectors, steered"] / gen_s["transformers, unsteered"] - 1
    print(
        f"\nsteering cost: expertsteer {ours_cost:+.1%}, steering-vectors {peer_cost:+.1%}; "
        f"expertsteer steered / steering-vectors steered throughput: "
        f"{gen_s['steering-vectors, steered'] / gen_s['expertsteer, steered']:.2f}x; "
        f"nnsight / transformers unsteered: "
        f"{gen_s['transformers, unsteered'] / gen_s['expertsteer, unsteered']:.2f}x"
    )
    print(f"same tokens as steering-vectors: {same}; steering changed the tokens: {changed}\n")
    sys.stdout.flush()
    items = prompts[: args.items]
    scoring = {
        "unsteered": lambda: score(decoder, items, None, args.batch_size),
        "steered": lambda: score(decoder, items, ours, args.batch_size),
    }
    score_s = interleaved(scoring, args.repeats)

    print(
        f"| scoring ({args.items} items x {len(OPTIONS)} options, batch {args.batch_size}) "
        "| s | items/s |"
    )
    print("|---|---|---|")
    for name, seconds in score_s.items():
        print(f"| {name} | {seconds:.3f} | {args.items / seconds:.1f} |")
    print(f"\nscoring steering cost: {score_s['steered'] / score_s['unsteered'] - 1:+.1%}")
    behaviour_generation(decoder, prompts, layer, scales[layer], vector, args)
    conditioned_scoring(decoder, items, layer, scales, vector, args)


def conditioned_scoring(
    decoder: CausalLM,
    items: list[str],
    layer: int,
    scales: dict[int, float],
    vector: torch.Tensor,
    args: argparse.Namespace,
) -> None:
    """Per item: the expert's reading (a forward up to `--reader-layer`, last prompt token)
    and option scoring with a per-item push, against unsteered and fixed-vector scoring."""
    from expertsteer.models.capture import capture

    expert = CausalLM.from_loaded(load_model(args.expert))
    reader = expert.num_layers // 2 if args.reader_layer is None else args.reader_layer
    coefficients = torch.linspace(-1.0, 1.0, len(items), dtype=torch.float64)[:, None]
    fixed = Intervention({layer: vector}, scales, alpha=args.alpha, positions="all")
    conditioned = Intervention(
        {layer: vector[None]}, scales, args.alpha, "all", coefficients=coefficients
    )
    runs = {
        "target, unsteered": lambda: score(decoder, items, None, args.batch_size),
        "target, fixed vector": lambda: score(decoder, items, fixed, args.batch_size),
        "target, per-item push": lambda: score(decoder, items, conditioned, args.batch_size),
        "expert reading": lambda: capture(
            expert, items, [reader], "last", batch_size=args.batch_size
        ),
    }
    seconds = interleaved(runs, args.repeats)
    n = len(items)
    print(
        f"\n| input-dependent steering ({n} items x {len(OPTIONS)} options, batch "
        f"{args.batch_size}; expert {args.expert} read at block {reader} of "
        f"{expert.num_layers}) | s/item | vs unsteered |"
    )
    print("|---|---|---|")
    base = seconds["target, unsteered"]
    for name, value in seconds.items():
        print(f"| {name} | {value / n:.4f} | {value / base:.2f}x |")
    total = seconds["expert reading"] + seconds["target, per-item push"]
    print(
        f"\nexpert_conditioned per item (reading + per-item push) / unsteered target scoring: "
        f"{total / base:.2f}x (extra {(total - base) / n:.4f} s per item)"
    )


def behaviour_generation(
    decoder: CausalLM,
    prompts: list[str],
    layer: int,
    scale: float,
    vector: torch.Tensor,
    args: argparse.Namespace,
) -> None:
    """Steered against unsteered tokens/s of behaviour continuations: `--configs` alphas x the
    batch's prompts in one call (rows carry their own additions), and the same rows unsteered."""
    openings = [" ".join(p.split(": ", 1)[-1].split()[:8]) for p in prompts[: args.batch_size]]
    alphas = [args.alpha * (k + 1) / args.configs for k in range(args.configs)]
    steered = [
        Row(str(k), text, {layer: a * scale * vector.double()})
        for a in alphas
        for k, text in enumerate(openings)
    ]
    plain = [Row(row.prompt_id, row.text) for row in steered]
    size = len(steered)

    def run(rows: list[Row]) -> list:
        return continue_prompts(
            decoder, rows, args.new_tokens, batch_size=size, min_new_tokens=args.new_tokens
        )

    times = interleaved({"unsteered": lambda: run(plain), "steered": lambda: run(steered)}, 3)
    tokens = size * args.new_tokens
    print(
        f"\n| behaviour generation ({args.configs} configs x {len(openings)} prompts x "
        f"{args.new_tokens} tokens, one batch, with perplexity) | s | tokens/s |"
    )
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.3f} | {tokens / seconds:.1f} |")
    print(f"\nsteered / unsteered tokens/s: {times['unsteered'] / times['steered']:.2f}")


if __name__ == "__main__":
    main()
