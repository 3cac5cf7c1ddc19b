"""How far the same experiment's results move between runs (another capture dtype, thread count
or machine): each method's dev choice, test accuracy, per-item agreement and verdict, side by
side.

    python benchmarks/compare_runs.py bf16=runs/A/default/sst2 fp32=runs/B/default/sst2 \
        --json docs/data/reproducibility.json

Each argument is LABEL=RUN_DIR (or LABEL=metrics.json). The first run is the reference: for every
other run and every entry of `metrics["methods"]` it prints whether the dev choice (alpha,
layers) is the same, the test accuracy and its difference in points, the share of test items
scored the same way (correct/incorrect) as in the reference, and whether the verdict ("helps")
agrees. The environment line of each run comes first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from expertsteer.environment import describe_environment


def _load(spec: str) -> tuple[str, dict[str, Any]]:
    label, _, where = spec.partition("=")
    if not where:
        raise SystemExit(f"expected LABEL=RUN_DIR, got {spec!r}")
    path = Path(where)
    path = path / "metrics.json" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"{label}: no metrics.json at {path}")
    return label, json.loads(path.read_text())


def _choice(entry: dict[str, Any]) -> str:
    if "alpha" not in entry:
        return "—"
    return f"{entry['alpha']:+g}@{','.join(map(str, entry['layers']))}"


def _agreement(reference: dict[str, Any], other: dict[str, Any], method: str) -> float | None:
    ref_items = (reference.get("test_items") or {}).get(method)
    items = (other.get("test_items") or {}).get(method)
    if not ref_items or not items or set(ref_items) != set(items):
        return None
    return sum(ref_items[i] == items[i] for i in ref_items) / len(ref_items)


def compare(runs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (other run, method): choice, accuracy, difference, agreement, verdicts."""
    (ref_label, reference), others = runs[0], runs[1:]
    ref_helps = set(reference.get("conclusion", {}).get("helps", []))
    rows = []
    for label, metrics in others:
        helps = set(metrics.get("conclusion", {}).get("helps", []))
        for method, ref_entry in reference["methods"].items():
            entry = metrics["methods"].get(method)
            if entry is None:
                continue
            accuracy, ref_accuracy = entry["test"]["accuracy"], ref_entry["test"]["accuracy"]
            rows.append(
                {
                    "reference": ref_label,
                    "run": label,
                    "method": method,
                    "choice": [_choice(ref_entry), _choice(entry)],
                    "same_choice": _choice(ref_entry) == _choice(entry),
                    "accuracy": [ref_accuracy, accuracy],
                    "difference_points": 100 * (accuracy - ref_accuracy),
                    "item_agreement": _agreement(reference, metrics, method),
                    "helps": [method in ref_helps, method in helps],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    runs = [_load(spec) for spec in args.runs]
    if len(runs) < 2:
        raise SystemExit("give at least two runs")
    for label, metrics in runs:
        environment = metrics.get("environment")
        line = describe_environment(environment) if environment else "(not recorded)"
        print(f"{label}: {metrics['task']}, n_test {metrics['n_test']}; {line}")
    rows = compare(runs)
    print(
        "\n| run vs reference | method | choice (ref → run) | test acc % (ref → run) "
        "| Δ points | items scored alike | helps (ref → run) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        agreement = row["item_agreement"]
        print(
            f"| {row['run']} vs {row['reference']} | {row['method']} "
            f"| {row['choice'][0]} → {row['choice'][1]}{'' if row['same_choice'] else ' *'} "
            f"| {100 * row['accuracy'][0]:.1f} → {100 * row['accuracy'][1]:.1f} "
            f"| {row['difference_points']:+.1f} "
            f"| {'—' if agreement is None else f'{agreement:.3f}'} "
            f"| {row['helps'][0]} → {row['helps'][1]} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"runs": {label: m.get("environment") for label, m in runs}, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
