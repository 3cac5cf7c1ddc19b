"""The input-dependent steering table of finished runs (issue 24's measurement).

Reads each run's metrics.json (`runs/<experiment>/<task>/`) and prints, per task, the rows the
conditioned methods are judged against: none, none+bias, the expert, the readers' own answers
(expert_probe, target_probe), target_conditioned and the expert-read methods, with accuracy,
macro-F1, paired differences with their 95% intervals and p-values, the shuffled control's
median / p95, and the share of the expert's headroom closed. Writes the same numbers as JSON.

    python benchmarks/conditioned_table.py runs/expert_conditioned/sst2 ... --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from expertsteer.evaluation.controls import CONTROLS, conclusion, helps
from expertsteer.evaluation.report import _difference, _interval, _p

PLAIN = ("none", "none+bias", "expert", "expert_probe", "target_probe")
CONDITIONED = (
    "target_conditioned",
    "expert_conditioned",
    "expert_conditioned_translate",
    "expert_conditioned_gate",
)


def _vs(row: dict[str, Any], control: str) -> str:
    """Paired difference to a control with its p-value, or — where there is none."""
    if f"vs_{control}" not in row:
        return "—"
    return f"{_difference(row[f'vs_{control}'])} ({_p(row.get(f'p_vs_{control}'))})"


def summary(run: Path) -> dict[str, Any]:
    """The table's numbers of one run directory."""
    metrics = json.loads((run / "metrics.json").read_text())
    methods = metrics["methods"]
    rows: dict[str, Any] = {}
    for name in (*PLAIN, *CONDITIONED):
        entry = methods.get(name)
        if entry is None:
            continue
        row = {
            "accuracy": entry["test"],
            "macro_f1": entry.get("macro_f1"),
            "macro_f1_ci": entry.get("macro_f1_ci"),
            "habit_rate": entry.get("habit_rate"),
        }
        for key in (
            "vs_none",
            "p_vs_none",
            "vs_none_bias",
            "p_vs_none_bias",
            "vs_target_conditioned",
            "p_vs_target_conditioned",
            "p_vs_shuffled",
            "gap_closed",
            "alpha",
            "c_max",
            "layers",
            "reader_layer",
            "collapsed",
            "constant",
            "vs_none_macro_f1",
            "p_vs_none_macro_f1",
        ):
            if key in entry:
                row[key] = entry[key]
        shuffled = entry.get("shuffled")
        if shuffled:
            row["shuffled"] = {k: shuffled[k] for k in ("k", "median", "p95", "gains")}
        rows[name] = row
    return {
        "task": metrics["task"],
        "n_dev": metrics["n_dev"],
        "n_test": metrics["n_test"],
        "headroom": metrics.get("headroom"),
        "environment": metrics.get("environment"),
        # Recomputed by this checkout's rules (a run's stored text is its code's at the time).
        "conclusion": conclusion(metrics),
        "helps": [m for m in metrics["methods"] if m not in CONTROLS and helps(metrics, m)],
        "rows": rows,
    }


def markdown(table: dict[str, Any]) -> str:
    """One task's table as markdown."""
    lines = [
        f"### {table['task']} (dev {table['n_dev']}, test {table['n_test']}; expert − target "
        f"{_difference(table['headroom'])})",
        "",
        "| method | acc % [95% CI] | macro-F1 | vs none (p) | vs none+bias (p) | shuffled "
        "median / p95 (K) | p vs shuffled | vs target_conditioned (p) | gap closed | alpha, "
        "c_max, block |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    # A share of a gap the expert does not significantly have is noise over noise (as report.md).
    headroom = table["headroom"]
    real_gap = headroom is not None and headroom["low"] > 0
    for name, row in table["rows"].items():
        shuffled = row.get("shuffled")
        gap = row.get("gap_closed") if real_gap else None
        setting = f"{row['alpha']:+g}, {row['c_max']:g}, {row['layers']}" if "c_max" in row else "—"
        if name == "none+bias" and row.get("constant") is not None:
            setting = f"always class {row['constant']}"
        draws = (
            f"{100 * shuffled['median']:+.1f} / {100 * shuffled['p95']:+.1f} ({shuffled['k']})"
            if shuffled
            else "—"
        )
        lines.append(
            f"| {name} | {_interval(row['accuracy'])} | {row['macro_f1']:.2f} | "
            f"{_vs(row, 'none')} | {_vs(row, 'none_bias')} | {draws} | "
            f"{_p(row.get('p_vs_shuffled'))} | {_vs(row, 'target_conditioned')} | "
            f"{'—' if gap is None else f'{100 * gap:+.0f}%'} | {setting} |"
        )
    lines += ["", f"Conclusion: {table['conclusion']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.json)")
    parser.add_argument("--json", type=Path, help="write the tables' numbers here")
    args = parser.parse_args()
    tables = [summary(run) for run in args.runs]
    print("\n".join(markdown(table) for table in tables))
    if args.json:
        args.json.write_text(json.dumps(tables, indent=2) + "\n")


if __name__ == "__main__":
    main()
