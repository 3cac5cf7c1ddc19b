"""Time a Recursive Feature Machine fit (T AGOP iterations) over a grid of sizes, against the
vectorised float64 NumPy reference and the `xrfm` package, on the same data in one process.

For every (n, d): seconds of `expertsteer.method.rfm.fit_rfm` at one bandwidth (the median pairwise
distance, factor 1: the like-for-like number) and with the default four-bandwidth grid, its peak
memory (CPU: growth of the resident set over the post-data level, measured in a fresh child
process per size; CUDA: `torch.cuda.max_memory_allocated` growth), the NumPy reference
(`benchmarks/rfm_numpy_reference.py`, float64, CPU) and `xrfm.rfm_src.RFM` at the same bandwidth,
ridge, T and dtype, each as a ratio to ours; then the least-squares slope of log(seconds) against
log(n) for every d. Data: a label that is the XOR of the signs of two latent coordinates in a
hidden 2-d subspace, plus isotropic noise in the other d - 2 directions (as in
tests/method/test_rfm.py).

The NumPy reference is float64, so its ratio divides by ours in float64 (an extra timed column
when `--dtype float32`). Everything is timed in the same process, one implementation after the
other. On a shared machine wall times move with the load (printed before and after): there,
`--threads 1 --clock cpu` reports each fit's own CPU seconds instead (the JSON keeps both).

xrfm is a benchmark-only dependency (not a runtime one). Install it without letting pip replace
the CPU torch wheel, then its pure-Python requirements:

    .venv/bin/pip install --no-deps xrfm==0.4.5 && .venv/bin/pip install scikit-learn tqdm
    .venv/bin/python benchmarks/rfm_fit.py [--n 500 1000 2000 4000] [--d 576 896 1536]
        [--dtype float32] [--device cpu|cuda] [--threads 1 --clock cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import rfm_numpy_reference as reference
import torch

from expertsteer.method.rfm import RFMConfig, RFMResult, fit_rfm, median_distance

RIDGE = 1e-3
"""The KRR ridge of `RFMConfig`, passed unchanged to the reference and to xrfm."""
DTYPES = {"float32": torch.float32, "float64": torch.float64}
XRFM_SETTING = (
    "xrfm.rfm_src.RFM(kernel='l2' [LaplaceKernel, exponent 1, Mahalanobis via sqrtM = M^1/2], "
    "bandwidth=ours, bandwidth_mode='constant', diag=False, tuning_metric='auc', "
    "solver='cholesky').fit(iters=T, method='lstsq', reg=1e-3, early_stop_rfm=False, "
    "center_grads=False, M_batch_size=n, total_points_to_sample=n); no tree splitting"
)


@dataclass
class Row:
    """Measurements of one (n, d)."""

    n: int
    d: int
    ours_s: float
    ours_peak_mb: float
    ours_grid_s: float
    ours_f64_s: float
    numpy_s: float | None = None
    xrfm_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping in the JSON (best iterations, validation AUROC)."""


def hidden_xor(n: int, d: int, seed: int, noise: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 rows whose label is the XOR of the signs of two latent coordinates living in a
    hidden plane (fixed per d); the orthogonal complement carries noise of std `noise`."""
    basis, _ = torch.linalg.qr(
        torch.randn(d, 2, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    )
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    rest = torch.randn(n, d, generator=generator, dtype=torch.float64) * noise
    x = latent @ basis.T + rest - (rest @ basis) @ basis.T
    return x, (latent[:, 0] * latent[:, 1] > 0).long()


def make_data(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred float64 training set of n rows and a validation set of n // 4 rows."""
    x, y = hidden_xor(n, d, seed=1)
    x_val, y_val = hidden_xor(max(n // 4, 64), d, seed=2)
    mean = x.mean(0)
    return x - mean, y, x_val - mean, y_val


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Clocks:
    """Seconds of every timed fit of one (n, d), on both clocks."""

    clock: str
    """The clock reported in the table: "wall" or "cpu"."""
    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str, fn: Callable[[], Any], repeats: int, device: torch.device):
        """Fastest of `repeats` calls on each clock (noise on a shared machine only adds time,
        as `timeit` argues); returns the reported clock's seconds and the last result."""
        walls, cpus, result = [], [], None
        for _ in range(repeats):
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            synchronize(device)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        self.wall[name], self.cpu[name] = min(walls), min(cpus)
        return (self.cpu if self.clock == "cpu" else self.wall)[name], result


def fit_ours(data, scales: tuple[float, ...], iterations: int) -> RFMResult:
    x, y, x_val, y_val = data
    return fit_rfm(x, y, x_val, y_val, RFMConfig(iterations=iterations, bandwidth_scales=scales))


def fit_xrfm(data, bandwidth: float, iterations: int, device: torch.device):
    # Imported here so that `--skip-xrfm` runs without the package.
    from xrfm.rfm_src import RFM
    from xrfm.rfm_src.class_conversion import ClassificationConverter

    x, y, x_val, y_val = data
    model = RFM(
        kernel="l2",
        iters=iterations,
        bandwidth=bandwidth,
        exponent=1.0,
        bandwidth_mode="constant",
        device=device,
        diag=False,
        verbose=False,
        tuning_metric="auc",
        class_converter=ClassificationConverter(mode="zero_one", n_classes=2),
        solver="cholesky",
    )
    targets, val_targets = y.to(x.dtype)[:, None], y_val.to(x.dtype)[:, None]
    model.fit(
        (x, targets),
        (x_val, val_targets),
        iters=iterations,
        method="lstsq",
        reg=RIDGE,
        verbose=False,
        early_stop_rfm=False,
        center_grads=False,
        M_batch_size=len(x),
        total_points_to_sample=len(x),
    )
    return model


def peak_rss_growth_mb(fn: Callable[[], Any]) -> float:
    """Peak resident set reached by `fn` minus the resident set before it (Linux: the peak is
    reset through /proc/self/clear_refs; elsewhere the lifetime peak is used)."""

    def status(key: str) -> float:
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith(key + ":"))
        return float(line.split()[1]) / 1024  # kB -> MB

    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


def peak_cuda_growth_mb(fn: Callable[[], Any], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def memory_child(n: int, d: int, dtype: str, iterations: int) -> None:
    """Entry of the child process that measures one CPU fit's peak memory (prints JSON)."""
    data = tuple(t.to(DTYPES[dtype]) if t.is_floating_point() else t for t in make_data(n, d))
    print(json.dumps({"peak_mb": peak_rss_growth_mb(lambda: fit_ours(data, (1.0,), iterations))}))


def ours_peak_mb(args: argparse.Namespace, n: int, d: int, data, device: torch.device) -> float:
    if device.type == "cuda":
        return peak_cuda_growth_mb(lambda: fit_ours(data, (1.0,), args.iterations), device)
    command = [sys.executable, __file__, "--memory-child", str(n), str(d)]
    command += ["--dtype", args.dtype, "--iterations", str(args.iterations)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mb"]


def top_eigenvector(metric: np.ndarray) -> np.ndarray:
    return np.linalg.eigh(metric)[1][:, -1]


def agreement(
    direction: np.ndarray, fitted: reference.ReferenceFit, iteration: int
) -> float | None:
    """|cos| between a direction and the reference's top eigenvector at the same iteration;
    None at iteration 0, whose identity metric has no preferred direction."""
    if iteration == 0:
        return None
    truth = top_eigenvector(fitted.metrics[iteration])
    return float(abs(direction @ truth) / np.linalg.norm(direction))


def limit_threads(threads: int) -> None:
    """Same thread count for torch and for NumPy's BLAS (threadpoolctl ships with xrfm's
    scikit-learn requirement)."""
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(f"threadpoolctl missing: NumPy's BLAS threads are not limited to {threads}")
        return
    threadpool_limits(limits=threads)


def measure(args: argparse.Namespace, n: int, d: int, device: torch.device) -> Row:
    dtype = DTYPES[args.dtype]
    data64 = make_data(n, d)
    data = tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in data64)
    bandwidth = median_distance(data[0])  # what fit_rfm computes for scale 1.0
    clocks = Clocks(args.clock)
    ours_s, ours = clocks.timed(
        "ours", lambda: fit_ours(data, (1.0,), args.iterations), args.repeats, device
    )
    grid_s, grid = clocks.timed(
        "ours_grid",
        lambda: fit_ours(data, RFMConfig().bandwidth_scales, args.iterations),
        args.repeats,
        device,
    )
    row = Row(n, d, ours_s, ours_peak_mb(args, n, d, data, device), grid_s, ours_s)
    row.extra = {
        "bandwidth": bandwidth,
        "ours_best_iteration": ours.best_iteration,
        "ours_val_auroc": ours.val_auroc[ours.best_iteration],
        "grid_bandwidth": grid.bandwidth,
        "grid_val_auroc": grid.val_auroc[grid.best_iteration],
        "clocks": clocks,
    }
    data64 = tuple(t.to(device) for t in data64)
    if dtype != torch.float64:
        row.ours_f64_s, ours64 = clocks.timed(
            "ours_f64", lambda: fit_ours(data64, (1.0,), args.iterations), args.repeats, device
        )
    else:
        ours64 = ours
    if not args.skip_numpy:
        arrays = [t.cpu().numpy() for t in data64]
        bandwidth64 = median_distance(data64[0])
        row.numpy_s, fitted = clocks.timed(
            "numpy",
            lambda: reference.fit(
                arrays[0], arrays[1], bandwidth64, RIDGE, args.iterations, arrays[2], arrays[3]
            ),
            args.repeats,
            torch.device("cpu"),
        )
        row.extra["cos_ours_vs_numpy"] = agreement(
            ours.direction.double().cpu().numpy(), fitted, ours.best_iteration
        )
        row.extra["cos_ours_f64_vs_numpy"] = agreement(
            ours64.direction.cpu().numpy(), fitted, ours64.best_iteration
        )
    if not args.skip_xrfm:
        row.xrfm_s, model = clocks.timed(
            "xrfm",
            lambda: fit_xrfm(data, bandwidth, args.iterations, device),
            args.repeats,
            device,
        )
        row.extra["xrfm_best_iteration"] = model.best_iter
        if not args.skip_numpy and model.M is not None:  # None: it kept the identity
            row.extra["cos_xrfm_vs_numpy"] = agreement(
                top_eigenvector(model.M.double().cpu().numpy()), fitted, model.best_iter
            )
    return row


def ratio(value: float | None, base: float) -> str:
    return "—" if value is None else f"{value / base:.2f}"


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def exponent(rows: list[Row], key: str) -> str:
    points = [(r.n, getattr(r, key)) for r in rows if getattr(r, key) is not None]
    if len({n for n, _ in points}) < 2:
        return "—"
    return f"{np.polyfit(np.log([n for n, _ in points]), np.log([s for _, s in points]), 1)[0]:.2f}"


def report(args: argparse.Namespace, rows: list[Row]) -> None:
    print(f"Seconds are {args.clock}-clock seconds.\n")
    f64 = args.dtype != "float64"  # ours is timed again in float64 for the NumPy ratio
    header = ["n", "d", f"ours s ({args.dtype})", "ours peak MB", "ours-grid s"]
    header += ["ours f64 s"] if f64 else []
    header += ["numpy s", "numpy/ours f64" if f64 else "numpy/ours", "xrfm s", "xrfm/ours"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [str(r.n), str(r.d), seconds(r.ours_s), f"{r.ours_peak_mb:.0f}"]
        cells += [seconds(r.ours_grid_s)] + ([seconds(r.ours_f64_s)] if f64 else [])
        cells += [seconds(r.numpy_s), ratio(r.numpy_s, r.ours_f64_s)]
        cells += [seconds(r.xrfm_s), ratio(r.xrfm_s, r.ours_s)]
        print("| " + " | ".join(cells) + " |")
    keys = ["ours_s", "ours_grid_s"] + (["ours_f64_s"] if f64 else []) + ["numpy_s", "xrfm_s"]
    print("\nScaling exponent in n (least-squares slope of log s on log n):\n")
    print("| d | " + " | ".join(key.removesuffix("_s") for key in keys) + " |")
    print("|" + "---|" * (len(keys) + 1))
    for d in args.d:
        same_d = [r for r in rows if r.d == d]
        print(f"| {d} | " + " | ".join(exponent(same_d, key) for key in keys) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--d", type=int, nargs="+", default=[576, 896, 1536])
    parser.add_argument("--iterations", type=int, default=8, help="AGOP updates T")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many fits")
    parser.add_argument("--threads", type=int, help="torch and NumPy BLAS threads")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="seconds in the table: wall, or this process's CPU time (with --threads 1, a "
        "measure that other load on a shared machine barely moves; CPU only)",
    )
    parser.add_argument("--skip-xrfm", action="store_true")
    parser.add_argument("--skip-numpy", action="store_true")
    parser.add_argument("--json", type=str, help="also write the raw numbers here")
    parser.add_argument("--memory-child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        limit_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.dtype, args.iterations)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if device.type == "cuda" and args.clock == "cpu":
        raise SystemExit("--clock cpu measures host CPU time: use --clock wall with --device cuda")
    xrfm_version = "skipped"
    if not args.skip_xrfm:
        try:
            import xrfm
        except ImportError as error:
            raise SystemExit(
                "xrfm is not installed: see this script's docstring, or pass --skip-xrfm"
            ) from error
        xrfm_version = xrfm.__version__
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"torch {torch.__version__} on {device_name}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores; numpy {np.__version__}; xrfm {xrfm_version}; "
        f"T={args.iterations}, ridge={RIDGE}, dtype {args.dtype}, "
        f"best of {args.repeats}, {args.clock} clock"
    )
    if not args.skip_xrfm:
        print(f"xrfm setting: {XRFM_SETTING}")
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f}", flush=True)
    warm = make_data(64, 8)
    fit_ours(tuple(t.to(device) for t in warm), (1.0,), 1)  # first-call library set-up
    rows = []
    for d in args.d:
        for n in args.n:
            rows.append(measure(args, n, d, device))
            print(f"done n={n} d={d}: {asdict(rows[-1])}", file=sys.stderr, flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    report(args, rows)
    first = min(rows, key=lambda r: (r.n, r.d))
    checks = {k: v for k, v in first.extra.items() if k.startswith("cos_")}
    print(
        f"\nCorrectness at n={first.n}, d={first.d}: |cos| of top eigenvectors against the "
        f"NumPy reference at the same iteration: {json.dumps(checks)}"
    )
    if args.json:
        payload = {
            "settings": vars(args) | {"torch": torch.__version__, "xrfm": xrfm_version},
            "load_average": [load_before[0], os.getloadavg()[0]],
            "rows": [asdict(r) for r in rows],
        }
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=1)


if __name__ == "__main__":
    main()
