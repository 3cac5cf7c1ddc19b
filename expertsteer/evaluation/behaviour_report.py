"""`report.md` of a behaviour task, from its `metrics.json` alone: the behaviour table, the
concept-vs-perplexity trade-off plot of the dev grid, side-by-side samples and the transfer
diagnostics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expertsteer.evaluation.plots import concept_vs_perplexity
from expertsteer.evaluation.report import REPORT_FILE, transfer_section

TRADEOFF_FIGURE = "behaviour_tradeoff.png"
SAMPLE_COLUMNS = (
    "none",
    "prompt",
    "target_mean_diff",
    "expertsteer",
    "expert_mean_diff_translate",
    "expertsteer_translate",
    "null/0",
)
"""Rows shown side by side (those present): unsteered, prompting, native, expert, one null draw."""


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(name: str, entry: dict[str, Any]) -> str:
    low, high = entry["concept_ci"]
    alpha = entry.get("alpha")
    setting = "-" if alpha is None else f"{alpha:+g} @ {','.join(map(str, entry['layers']))}"
    return (
        f"| {name} | {_num(entry['concept'])} [{_num(low)}, {_num(high)}] | "
        f"{_num(entry['share'], 2)} | {_num(entry['perplexity'], 2)} | "
        f"{_num(entry['distinct2'], 2)} | {_num(entry['degenerate_rate'], 2)} | {setting} | "
        f"{_num(entry.get('p_vs_none'))} | {_num(entry.get('p_vs_null'))} | "
        f"{_num(entry.get('shift_vs_native'), 2)} |"
    )


def behaviour_table(metrics: dict[str, Any]) -> str:
    """The behaviour table: `none`, `prompt`, the null's median / p95, every method."""
    b = metrics["behaviour"]
    lines = [
        "| row | concept [95% CI] | share | perplexity | distinct-2 | degenerate | alpha @ "
        "blocks | p vs none | p vs null | shift / native |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    methods = b["methods"]
    for name in ("none", "prompt"):
        lines.append(_row(name, methods[name]))
    null = b.get("null")
    if null:
        lines.append(
            f"| null median / p95 (K={null['k']}) | {_num(null['median'])} / "
            f"{_num(null['p95'])} | | | | | | | | |"
        )
    for name, entry in methods.items():
        if name not in ("none", "prompt"):
            lines.append(_row(name, entry))
    return "\n".join(lines)


def _cell(text: str, limit: int = 200) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_behaviour_report(run_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write `report.md` and the trade-off figure of a behaviour run; returns the report path."""
    run_dir = Path(run_dir)
    b = metrics["behaviour"]
    curves = {
        f"{name} @ {layers}": points
        for name, per_layers in b["dev_curves"].items()
        if name != "none"
        for layers, points in per_layers.items()
    }
    concept_vs_perplexity(
        curves,
        b["dev_curves"]["none"],
        run_dir / TRADEOFF_FIGURE,
        f"{metrics['task']}: concept vs perplexity over the alpha grid (dev)",
        f"concept score ({b['scorer']})",
    )
    generation = b["generation"]
    lines = [
        f"# Behaviour steering: {metrics['task']}",
        "",
        f"Target `{metrics['target']}`; {b['n_test_prompts']} test prompts x (greedy + "
        f"{generation['samples']} samples, temperature {generation['temperature']:g}, "
        f"{generation['max_new_tokens']} new tokens); dev: {b['n_dev_prompts']} prompts. "
        f"Scorer `{b['scorer']}`. Dev rule `{b['rule']}`"
        + (
            f" (cap {b['perplexity_cap']:g} x the unsteered perplexity)"
            if b["rule"] == "perplexity_cap"
            else ""
        )
        + f"; alphas {b['alphas']} as fractions of s_j = {b['norm_scale']} ({b['scales']}).",
        "",
        behaviour_table(metrics),
        "",
        f"Concept: mean {b['scorer']} score per continuation (per-prompt means bootstrapped); "
        "share: continuations showing the concept; perplexity: under the unsteered target; "
        "shift / native: the method's concept gain over `none` as a fraction of the target's "
        f"own mean-difference direction's. p-values: {b['p_values']}.",
        "",
        f"![concept vs perplexity]({TRADEOFF_FIGURE})",
        "",
        "## Samples (greedy, test)",
        "",
    ]
    for sample in b["samples"]:
        lines += [f"**{_cell(sample['prompt'])}**", "", "| row | continuation |", "|---|---|"]
        for name in SAMPLE_COLUMNS:
            if name in sample["outputs"]:
                lines.append(f"| {name} | {_cell(sample['outputs'][name])} |")
        lines.append("")
    if metrics.get("transfer"):
        lines += ["## Transfer diagnostics", "", *transfer_section(metrics)]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
