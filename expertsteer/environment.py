"""What a run ran on: library versions, dtypes, threads, CPU and device.

Recorded in every `metrics.json` (`environment`) because the same config does not give the same
numbers everywhere: a bfloat16 capture rounds differently on a CPU with native bfloat16
instructions than on one that emulates them, and float32 reductions depend on the thread count.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "nnsight", "lightning")
# CPU flags of native bfloat16 arithmetic: x86 (AVX512-BF16, AMX) and Arm (BF16).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in `path`; (platform's name, no flags) without it."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model or platform.processor() or platform.machine(), flags


def native_bfloat16(flags: set[str]) -> bool:
    """Whether CPU `flags` include native bfloat16 arithmetic."""
    return any(flag in flags for flag in BF16_FLAGS)


def environment(
    device: torch.device | str,
    seed: int,
    capture_dtypes: list[str],
    scoring_dtype: str,
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> dict[str, Any]:
    """The run's environment as a JSON-able dict (see the module docstring)."""
    device = torch.device(device)
    model, flags = _cpuinfo(cpuinfo)
    entry: dict[str, Any] = {
        "versions": {package: _version(package) for package in PACKAGES},
        "python": platform.python_version(),
        "capture_dtype": sorted(set(capture_dtypes)) or ["unknown"],
        "scoring_dtype": scoring_dtype,
        "threads": torch.get_num_threads(),
        "cpu": model,
        "cpu_native_bfloat16": native_bfloat16(flags),
        "device": str(device),
        "seed": seed,
    }
    if device.type == "cuda":
        entry["gpu"] = torch.cuda.get_device_name(device)
    return entry


def describe_environment(entry: dict[str, Any]) -> str:
    """One line for the report."""
    versions = ", ".join(f"{name} {v}" for name, v in entry["versions"].items() if v)
    native = "native" if entry["cpu_native_bfloat16"] else "no native"
    device = entry["device"] + (f" ({entry['gpu']})" if entry.get("gpu") else "")
    return (
        f"{versions}; capture {'/'.join(entry['capture_dtype'])}, scoring "
        f"{entry['scoring_dtype']}; {entry['threads']} threads; CPU {entry['cpu']} ({native} "
        f"bfloat16); device {device}; seed {entry['seed']}."
    )
