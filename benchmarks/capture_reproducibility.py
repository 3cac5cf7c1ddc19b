"""How far captured states move with the thread count and the CPU's instruction set, per dtype.

A run is reproducible on another machine only if its captured states are: this script captures
the same steering items (a task's prompt + correct / wrong answer, last token: what the fitting
stages capture) through the project's capture path under several settings, each in a fresh
process, and compares every setting with the reference of its dtype (all threads, this CPU's
full instruction set):

* threads: 1 instead of all (float32 and bfloat16 reductions split differently);
* another CPU generation, emulated: PyTorch's kernels capped at AVX2
  (`ATEN_CPU_CAPABILITY=avx2`) and oneDNN's at AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`), which takes
  away AVX-512 and native bfloat16 (AVX512-BF16 / AMX) as on an older CPU;
* the other dtype (bfloat16 vs float32), for scale.

Printed per model and setting: the median and largest relative state error per block
(|h - h_ref| / |h_ref|, median over items; min-max over blocks) and the smallest cosine over
blocks between the two settings' mean-difference directions.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/capture_reproducibility.py --items 24
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from expertsteer.models.zoo import DEFAULT_EXPERT, DEFAULT_TARGET

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SETTINGS = {
    # name: (dtype, threads (None: all), extra environment)
    "float32": ("float32", None, {}),
    "float32, 1 thread": ("float32", 1, {}),
    "float32, AVX2 only": ("float32", None, AVX2),
    "bfloat16": ("bfloat16", None, {}),
    "bfloat16, 1 thread": ("bfloat16", 1, {}),
    "bfloat16, AVX2 only": ("bfloat16", None, AVX2),
}


def capture_states(model: str, task: str, items: int, dtype: str, out: Path) -> None:
    """Capture the steering items' last-token states of `model` into `out` (one process)."""
    from expertsteer.data.catalogue import resolve_task
    from expertsteer.data.prompts import steering_items
    from expertsteer.data.splits import SplitSizes, make_splits
    from expertsteer.data.tasks import load_task
    from expertsteer.models.capture import capture
    from expertsteer.models.causal_lm import CausalLM
    from expertsteer.models.zoo import load_model

    loaded = load_task(resolve_task(task))
    examples = make_splits(loaded, SplitSizes(steer=items, dev=1, test=1))["steer"]
    chosen = steering_items(loaded, examples)
    decoder = CausalLM.from_loaded(load_model(model, dtype=dtype))
    states = capture(
        decoder, [i.prompt for i in chosen], completions=[i.completion for i in chosen]
    )
    tensors = {f"layer.{layer}": value.float().contiguous() for layer, value in states.items()}
    tensors["labels"] = torch.tensor([i.label for i in chosen])
    save_file(tensors, str(out))


def _run_setting(model: str, args: argparse.Namespace, name: str, folder: Path) -> Path:
    dtype, threads, extra = SETTINGS[name]
    out = folder / f"{abs(hash((model, name)))}.safetensors"
    env = {**os.environ, **extra}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, __file__, "--capture", model, dtype, str(out)]
    command += ["--task", args.task, "--items", str(args.items)]
    subprocess.run(command, env=env, check=True)
    return out


def _compare(reference: dict, other: dict) -> dict[str, float]:
    from expertsteer.method.extractors import mean_difference

    labels = reference["labels"]
    errors, cosines = [], []
    for key, exact in reference.items():
        if not key.startswith("layer."):
            continue
        moved = other[key]
        errors.append(float(((moved - exact).norm(dim=1) / exact.norm(dim=1)).median()))
        pair = (mean_difference(exact, labels), mean_difference(moved, labels))
        cosines.append(float(torch.nn.functional.cosine_similarity(*pair, dim=0)))
    return {"error_min": min(errors), "error_max": max(errors), "cos_min": min(cosines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[DEFAULT_TARGET, DEFAULT_EXPERT])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--items", type=int, default=24, help="steer examples (x2 texts)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--capture", nargs=3, metavar=("MODEL", "DTYPE", "OUT"), help="internal")
    args = parser.parse_args()
    if args.capture:
        model, dtype, out = args.capture
        capture_states(model, args.task, args.items, dtype, Path(out))
        return
    print(
        f"{args.task}: {2 * args.items} steering texts; reference per dtype: "
        f"{torch.get_num_threads()} threads, this CPU's full instruction set"
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            states = {
                name: load_file(str(_run_setting(model, args, name, Path(folder))))
                for name in SETTINGS
            }
            for name, (dtype, *_) in SETTINGS.items():
                reference = "bfloat16" if name == "float32" else dtype
                if name == reference:
                    continue
                row = {"model": model, "setting": name, "reference": reference}
                row |= _compare(states[reference], states[name])
                rows.append(row)
                print(
                    f"{model:30} {name:20} vs {reference:9}: relative state error per block "
                    f"{row['error_min']:.2e}-{row['error_max']:.2e}; mean-difference cos >= "
                    f"{row['cos_min']:.6f}"
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
