"""Paired capture of one benchmark's prompts on the packaged pair, against plain forwards.

Captures last-token states at every layer of the expert and the target for `--prompts`
prompts (steer + dev + test splits) into a fresh temporary cache through the DataModule, then
runs plain transformers forwards (base model, `output_hidden_states`) over the same prompts
and batches. Prints wall time, tokens/s, bytes on disk and the ratio.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/paired_capture.py --task sst2 --prompts 500
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from datamodules.paired_activations import PairedActivationDataModule as DataModule
from expertsteer.models.causal_lm import CausalLM, left_pad_positions
from expertsteer.models.zoo import DEFAULT_EXPERT, DEFAULT_TARGET, load_model

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def plain_forward_seconds(decoder: CausalLM, prompts: list[str], batch_size: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            encoding = decoder.encode(prompts[start : start + batch_size])
            positions = left_pad_positions(encoding["attention_mask"])
            decoder.hf_model.base_model(
                **encoding, position_ids=positions, output_hidden_states=True
            )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-root", default=str(DATA_ROOT))
    args = parser.parse_args()
    steer, dev = args.prompts * 3 // 5, args.prompts // 5
    with tempfile.TemporaryDirectory() as cache:
        module = DataModule(
            expert=DEFAULT_EXPERT,
            target=DEFAULT_TARGET,
            task=args.task,
            data_root=args.data_root,
            item_kind="prompts",
            steer_size=steer,
            dev_size=dev,
            test_size=args.prompts - steer - dev,
            capture_batch_size=args.batch_size,
            cache=cache,
        )
        for name in (DEFAULT_EXPERT, DEFAULT_TARGET):
            load_model(name)  # conversion is not part of the capture measurement
        started = time.perf_counter()
        module.prepare_data()
        capture_s = time.perf_counter() - started
        entry = module.cache_path()
        disk = sum(p.stat().st_size for p in entry.iterdir())
        prompts = [item.prompt for split in module.split_items().values() for item in split]

    rows = []
    for name in (DEFAULT_EXPERT, DEFAULT_TARGET):
        decoder = CausalLM.from_loaded(load_model(name))
        tokens = sum(
            int(decoder.encode(prompts[i : i + args.batch_size])["attention_mask"].sum())
            for i in range(0, len(prompts), args.batch_size)
        )
        rows.append((name, tokens, plain_forward_seconds(decoder, prompts, args.batch_size)))
        del decoder
    tokens = sum(r[1] for r in rows)
    plain_s = sum(r[2] for r in rows)
    print(
        f"\n{len(prompts)} {args.task} prompts, both models, all layers, last token, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    for name, count, seconds in rows:
        print(
            f"  plain forward {name}: {count} tokens in {seconds:.1f} s "
            f"({count / seconds:.0f} tok/s)"
        )
    print(
        f"paired capture (DataModule.prepare_data, incl. model loads): {capture_s:.1f} s, "
        f"{tokens / capture_s:.0f} tok/s over {tokens} tokens"
    )
    print(
        f"plain transformers forwards, same prompts: {plain_s:.1f} s, {tokens / plain_s:.0f} tok/s"
    )
    print(f"ratio capture / plain wall time: {capture_s / plain_s:.2f}")
    print(f"cache on disk: {disk / 1e6:.1f} MB ({disk} bytes)")


if __name__ == "__main__":
    main()
