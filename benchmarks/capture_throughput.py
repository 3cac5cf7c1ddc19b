"""Model preparation and hidden-state capture speed on the packaged models, in one process.

For each model: first conversion time (into a fresh temporary cache), cached reload time, and
tokens/s of the nnsight capture (all layers, last prompt token) against a plain transformers
forward over the same left-padded batches: with `output_hidden_states` through the LM head,
and through the base model only. Prints a Markdown table with the ratios.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/capture_throughput.py [--prompts 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from expertsteer.models.capture import capture
from expertsteer.models.causal_lm import CausalLM, left_pad_positions
from expertsteer.models.zoo import load_model

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/benchmarks/arc/ARC-Easy/test.json"


def arc_prompts(path: Path, count: int) -> list[str]:
    rows = json.loads(path.read_text())
    return [row["instruction"] for row in rows[:count]]


def timed(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def plain_forward(decoder: CausalLM, prompts: list[str], batch_size: int, head: bool) -> None:
    model = decoder.hf_model if head else decoder.hf_model.base_model
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            encoding = decoder.encode(prompts[start : start + batch_size])
            positions = left_pad_positions(encoding["attention_mask"])
            model(**encoding, position_ids=positions, output_hidden_states=True)


def token_count(decoder: CausalLM, prompts: list[str], batch_size: int) -> tuple[int, int]:
    real = padded = 0
    for start in range(0, len(prompts), batch_size):
        mask = decoder.encode(prompts[start : start + batch_size])["attention_mask"]
        real += int(mask.sum())
        padded += mask.numel()
    return real, padded


def conversion_seconds(name: str) -> float:
    previous = os.environ.get("EXPERTSTEER_CACHE")
    with tempfile.TemporaryDirectory() as fresh:
        os.environ["EXPERTSTEER_CACHE"] = fresh
        try:
            started = time.perf_counter()
            load_model(name)
            return time.perf_counter() - started
        finally:
            if previous is None:
                del os.environ["EXPERTSTEER_CACHE"]
            else:
                os.environ["EXPERTSTEER_CACHE"] = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-conversion", action="store_true")
    args = parser.parse_args()
    prompts = arc_prompts(args.data, args.prompts)
    torch.set_num_threads(os.cpu_count() or 1)

    rows = []
    for name in args.models:
        convert_s = float("nan") if args.skip_conversion else conversion_seconds(name)
        load_model(name)  # make sure the user cache holds it before timing a cached load
        started = time.perf_counter()
        decoder = CausalLM.from_loaded(load_model(name))
        reload_s = time.perf_counter() - started
        real, padded = token_count(decoder, prompts, args.batch_size)
        capture(decoder, prompts[: args.batch_size], batch_size=args.batch_size)  # warm-up
        nnsight_s = timed(
            lambda d=decoder: capture(d, prompts, batch_size=args.batch_size), args.repeats
        )
        full_s = timed(
            lambda d=decoder: plain_forward(d, prompts, args.batch_size, True), args.repeats
        )
        base_s = timed(
            lambda d=decoder: plain_forward(d, prompts, args.batch_size, False), args.repeats
        )
        rows.append((name, convert_s, reload_s, real, padded, nnsight_s, full_s, base_s))
        del decoder

    print(
        f"\n{args.prompts} ARC-Easy prompts (chat template), batch {args.batch_size}, "
        f"all layers, last token; median of {args.repeats}; {torch.get_num_threads()} threads\n"
    )
    print(
        "| model | first conversion s | cached load s | real / padded tokens | "
        "nnsight capture tok/s | HF forward+hidden (LM head) tok/s | HF base forward tok/s | "
        "capture / HF-with-head | capture / HF-base |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, convert_s, reload_s, real, padded, nnsight_s, full_s, base_s in rows:
        print(
            f"| {name} | {convert_s:.1f} | {reload_s:.2f} | {real} / {padded} | "
            f"{real / nnsight_s:.0f} | {real / full_s:.0f} | {real / base_s:.0f} | "
            f"{full_s / nnsight_s:.2f}x | {base_s / nnsight_s:.2f}x |"
        )


if __name__ == "__main__":
    main()
