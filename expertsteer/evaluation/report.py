"""`report.md` of a run: what the evaluation measured, in tables and figures.

Everything is read from the evaluator's `metrics.json` content, so a report can be rebuilt from
the file alone (`write_report(run_dir, load_json(run_dir / "metrics.json", ...))`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from expertsteer.artifacts import MI_HEATMAP_FILE, R2_HEATMAP_FILE
from expertsteer.cache import atomic_file
from expertsteer.environment import describe_environment
from expertsteer.evaluation.controls import (
    COLLAPSE_HABIT,
    COLLAPSE_MAJORITY,
    CONTROLS,
    LEVEL,
    NONE_BIAS,
    PROBES,
    SHUFFLED,
    comparison_count,
    conclusion,
    steered_methods,
    verdict_metrics,
)
from expertsteer.evaluation.plots import accuracy_vs_alpha, auroc_curves, null_gains
from expertsteer.evaluation.stats import paired_bootstrap_ci

REPORT_FILE = "report.md"
ALPHA_FIGURE = "accuracy_vs_alpha.png"
AUROC_FIGURE = "rfm_auroc.png"
NULL_FIGURE = "null_gains.png"
BASELINES = CONTROLS


def layers_key(layers: list[int] | tuple[int, ...]) -> str:
    """How a set of target layers is named in `metrics.json` (e.g. "7" or "7,9")."""
    return ",".join(map(str, layers))


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _interval(entry: dict[str, float]) -> str:
    return f"{_pct(entry['accuracy'])} [{_pct(entry['low'])}, {_pct(entry['high'])}]"


def _difference(entry: dict[str, float] | None) -> str:
    if entry is None:
        return "—"
    return (
        f"{100 * entry['difference']:+.1f} [{100 * entry['low']:+.1f}, {100 * entry['high']:+.1f}]"
    )


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _versus(entry: dict[str, Any], control: str) -> str:
    """Paired difference to a control with its p-value, or — where there is none."""
    comparison = entry.get(f"vs_{control}")
    if comparison is None:
        return "—"
    return f"{_difference(comparison)} (p {_p(entry.get(f'p_vs_{control}'))})"


def _share(value: float | None, interval: list[float] | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" + ("" if interval is None else f" [{interval[0]:.2f}, {interval[1]:.2f}]")


def _verdict(entry: dict[str, float]) -> str:
    if entry["low"] > 0:
        return "better"
    if entry["high"] < 0:
        return "worse"
    return "no sig. difference"


def describe(method: str, entry: dict[str, Any]) -> str:
    """What a method is, from its artifact's metadata."""
    if method == "none":
        return "target, unsteered"
    if method == NONE_BIAS:
        if entry.get("constant") is not None:
            return f"target, unsteered, always class {entry['constant']} (chosen on dev)"
        offsets = ", ".join(f"{b:+.2f}" for b in entry.get("offsets") or [])
        return f"target, unsteered, class offsets tuned on dev ({offsets})"
    if method == "expert":
        return "expert model itself"
    if method in PROBES:
        return f"the {method.split('_')[0]}'s reading (of conditioned steering) as a classifier"
    if "reader" in entry:
        push = "target's own direction" if entry.get("source") == "target" else "mapped expert"
        objective = entry.get("alignment_objective")
        push += f" direction ({objective})" if entry.get("source") == "expert" else ""
        return (
            f"push set per input by the {entry['reader']}'s reading at block "
            f"{entry.get('reader_layer')} (c_max {entry['c_max']:g}), along the {push}"
        )
    source = entry.get("source")
    where = "target states" if source == "target" else f"expert states ({entry.get('space')})"
    objective = entry.get("alignment_objective")
    aligned = f", alignment {objective}" if source == "expert" and objective else ""
    return f"{entry.get('extractor')} on {where}{aligned}"


def summary_table(metrics: dict[str, Any]) -> str:
    """Markdown table: every method's test accuracy with its interval, its comparisons with
    the controls (paired difference in points [95% CI] and p-value), macro-F1 and its paired
    difference to none, habit rate (**collapsed** rows marked), and its dev choice."""
    lines = [
        "| method | what | test acc % [95% CI] | vs none, points [95% paired CI] (p) | "
        "vs none+bias (p) | p vs null | macro-F1 [95% CI] | macro-F1 vs none (p) | "
        "habit [95% CI] | gap closed (if the expert is sig. better) | alpha | layers | "
        "dev acc % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    headroom = metrics.get("headroom")
    # A share of a gap the expert does not significantly have is noise divided by noise; on a
    # one-class test set there is no gain to share.
    real_gap = headroom is not None and headroom["low"] > 0 and not metrics.get("one_class_test")
    for method, entry in metrics["methods"].items():
        steered = method not in BASELINES
        gap = entry.get("gap_closed") if real_gap else None
        lines.append(
            "| "
            + " | ".join(
                [
                    method,
                    describe(method, entry),
                    _interval(entry["test"]),
                    _versus(entry, "none"),
                    _versus(entry, "none_bias"),
                    _p(entry.get("p_vs_null")),
                    _share(entry.get("macro_f1"), entry.get("macro_f1_ci")),
                    _f1_versus(entry),
                    _share(entry.get("habit_rate"), entry.get("habit_rate_ci"))
                    + (" **collapsed**" if entry.get("collapsed") else ""),
                    "—" if gap is None else f"{100 * gap:+.0f}%",
                    f"{entry['alpha']:g}" if steered else "—",
                    layers_key(entry["layers"]) if steered else "—",
                    _pct(entry["dev"]["accuracy"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _f1_versus(entry: dict[str, Any]) -> str:
    comparison = entry.get("vs_none_macro_f1")
    if comparison is None:
        return "—"
    return (
        f"{comparison['difference']:+.2f} [{comparison['low']:+.2f}, {comparison['high']:+.2f}] "
        f"(p {_p(entry.get('p_vs_none_macro_f1'))})"
    )


def _figures(run_dir: Path, metrics: dict[str, Any]) -> dict[str, str]:
    figures = {}
    curves, references = {}, {}
    for method, entry in metrics["methods"].items():
        if method in BASELINES:
            references[f"{method} (dev)"] = entry["dev"]["accuracy"]
            continue
        chosen = layers_key(entry["layers"])
        curves[f"{method} [{chosen}]"] = {
            float(alpha): accuracy for alpha, accuracy in entry["dev_curve"][chosen].items()
        }
    title = f"{metrics['task']}: dev accuracy vs steering strength"
    accuracy_vs_alpha(curves, references, run_dir / ALPHA_FIGURE, title)
    figures["alpha"] = ALPHA_FIGURE
    aurocs = {}
    for method, entry in metrics["methods"].items():
        for fit in entry.get("fits") or []:
            if fit.get("val_auroc"):
                label = f"{method} (E{fit['expert_layer']}→T{fit['target_layer']})"
                aurocs[label] = fit["val_auroc"]
    if aurocs:
        auroc_curves(aurocs, run_dir / AUROC_FIGURE, f"{metrics['task']}: RFM dev AUROC")
        figures["auroc"] = AUROC_FIGURE
    null = metrics.get("null")
    if null and null.get("gains"):
        gains = {
            m: metrics["methods"][m]["vs_none"]["difference"] for m in steered_methods(metrics)
        }
        title = f"{metrics['task']}: test gain over none, random null (K = {null['k']})"
        null_gains(null["gains"], gains, null["p95"], run_dir / NULL_FIGURE, title)
        figures["null"] = NULL_FIGURE
    if (run_dir / MI_HEATMAP_FILE).is_file():
        figures["mi"] = MI_HEATMAP_FILE
    return figures


def controls_section(metrics: dict[str, Any]) -> list[str]:
    """The conclusion line, how many comparisons it rests on, and the two controls."""
    count = comparison_count(metrics)
    lines = [
        f"**Conclusion**: {conclusion(metrics)}",
        "",
        f"A method helps only if it beats `none`, `none+bias` and the random null, each at "
        f"p < {LEVEL:g}, with a gain above the null's 95th percentile{_balanced_rule(metrics)}. "
        f"Metrics the verdict requires: {', '.join(verdict_metrics(metrics))}. {count} "
        f"comparisons were made ({len(steered_methods(metrics))} steered methods x each "
        "check); p-values "
        f"are unadjusted (a Bonferroni level would be {LEVEL:g}/{max(count, 1)} = "
        f"{LEVEL / max(count, 1):.4f}). vs none and none+bias: two-sided paired bootstrap over "
        "test items; vs the null: one-sided empirical, (1 + #{null gain >= gain}) / (1 + K).",
        "",
    ]
    bias = metrics.get("none_bias") or {}
    if NONE_BIAS in metrics["methods"]:
        entry = metrics["methods"][NONE_BIAS]
        rule = (
            f"always class {entry['constant']}"
            if entry.get("constant") is not None
            else f"per-class log-odds offsets {[round(b, 3) for b in entry['offsets']]}"
        )
        lines.append(
            f"* `none+bias` (a moved decision threshold): {rule}, chosen on dev among "
            f"{entry['budget']} offset candidates (the largest dev search of a steered method: "
            f"alphas x layer sets) and every constant class; test {_interval(entry['test'])}, "
            f"vs none {_versus(entry, 'none')}."
        )
    elif bias.get("applicable") is False:
        lines.append(f"* `none+bias`: not applicable ({bias.get('reason')}).")
    null = metrics.get("null")
    if null and null.get("gains"):
        lines.append(
            f"* Random null: K = {null['k']} label-free random unit vectors (seed "
            f"{null['seed']}) on the layers and norm scales of `{null['reference']}`, each "
            f"through the same dev choice as a method; test gains over none, points: median "
            f"{100 * null['median']:+.1f}, 95th percentile {100 * null['p95']:+.1f}, range "
            f"[{100 * null['min']:+.1f}, {100 * null['max']:+.1f}]; smallest attainable p "
            f"{null['smallest_p']:.3f}."
        )
    else:
        lines.append("* Random null: none drawn (K = 0); no method can be called a gain.")
    return [*lines, ""]


def conditioned_section(metrics: dict[str, Any]) -> list[str]:
    """Conditioned methods against their own controls: `shuffled` (the same coefficients
    permuted across test items) and the target's own reading; the readers' accuracy."""
    rows = [(m, e) for m, e in metrics["methods"].items() if "reader" in e]
    if not rows:
        return []
    lines = [
        "## Input-dependent steering: its own controls",
        "",
        "| method | reader | c_max | vs none (p) | vs none+bias (p) | shuffled gains, points: "
        "median / p95 (K) | p vs shuffled | vs target_conditioned (p) | gap closed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, entry in rows:
        shuffled = entry.get(SHUFFLED)
        draws = (
            "—"
            if not shuffled
            else f"{100 * shuffled['median']:+.1f} / {100 * shuffled['p95']:+.1f} ({shuffled['k']})"
        )
        gap = entry.get("gap_closed")
        lines.append(
            f"| {method} | {entry['reader']} (block {entry.get('reader_layer')}) | "
            f"{entry['c_max']:g} | {_versus(entry, 'none')} | {_versus(entry, 'none_bias')} | "
            f"{draws} | {_p(entry.get(f'p_vs_{SHUFFLED}'))} | "
            f"{_versus(entry, 'target_conditioned')} | "
            f"{'—' if gap is None else f'{100 * gap:+.0f}%'} |"
        )
    probes = [
        f"`{name}` {_interval(metrics['methods'][name]['test'])}"
        for name in PROBES
        if name in metrics["methods"]
    ]
    if probes:
        lines += ["", "Readers' own test accuracy (the ceiling of what a reading passes on): "]
        lines[-1] += ", ".join(probes) + "."
    return [*lines, ""]


def _balanced_rule(metrics: dict[str, Any]) -> str:
    if "macro_f1" not in verdict_metrics(metrics):
        return ""
    return (
        f", it is not collapsed (habit >= {COLLAPSE_HABIT:g} while the gold majority class "
        f"holds under {COLLAPSE_MAJORITY:g} of the items) and its macro-F1 is not "
        f"significantly below none's (paired bootstrap, p < {LEVEL:g})"
    )


def _cell(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    flat = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    return flat.replace("|", "\\|")


def _findings(metrics: dict[str, Any]) -> list[str]:
    """One sentence per comparison the issue asks about: ExpertSteer vs each other method."""
    lines = []
    methods = metrics["methods"]
    reported: set[tuple[str, str]] = set()
    for main in [m for m in methods if m.startswith("expertsteer")]:
        for other in methods:
            if other == main or other == "expert" or (other, main) in reported:
                continue
            reported.add((main, other))
            if other == "none":
                comparison = methods[main]["vs_none"]
            else:
                comparison = _pairwise(metrics, main, other)
            if comparison is None:
                continue
            lines.append(
                f"* {main} vs {other}: {_difference(comparison)} points — {_verdict(comparison)}."
            )
    return lines


def _pairwise(metrics: dict[str, Any], a: str, b: str) -> dict[str, float] | None:
    items = metrics.get("test_items", {})
    if a not in items or b not in items:
        return None
    ids = sorted(items[a])
    first = torch.tensor([float(items[a][i]) for i in ids])
    second = torch.tensor([float(items[b][i]) for i in ids])
    mean, low, high = paired_bootstrap_ci(first, second)
    return {"difference": mean, "low": low, "high": high}


def _r2(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def transfer_section(metrics: dict[str, Any]) -> list[str]:
    """Per alignment and pair: the map's R^2 and each expert direction against the target's
    own direction, the mapped-random null and random directions
    (`expertsteer.evaluation.transfer`)."""
    entries = metrics.get("transfer") or []
    if not entries:
        return []
    lines = [
        "R^2 of the alignment's map into the target's layer on held-out token positions (and "
        "with the pairing shuffled), on held-out steer items' positions and on dev items' "
        "last-token states. cos: mapped expert direction vs the target's own direction from "
        "the same extractor; null p95: 95th percentile of |cos| for mapped random expert "
        "directions. AUROC: target dev states projected on the mapped, the target's own and "
        "random directions (all oriented on the steer split). Transfer = cos above the null, "
        "AUROC within 0.05 of native and 0.1 above random.",
        "",
        "| alignment | pair | positions | R² held-out | R² shuffled | R² steer items "
        "| R² dev items | method | cos | null p95 | AUROC mapped | native | random | transfer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        for method, d in entry["directions"].items():
            verdict = d.get("verdict") or {}
            lines.append(
                f"| {entry['alignment']} | E{entry['expert_layer']}→T{entry['target_layer']} "
                f"| {entry.get('positions') or '–'} | {_r2(entry.get('heldout_r2'))} "
                f"| {_r2(entry.get('shuffled_r2'))} | {_r2(entry.get('steer_items_r2'))} "
                f"| {_r2(entry.get('dev_items_r2'))} | {method} "
                f"| {d['cos_target_native']:.3f} | {d['null_cos_p95']:.3f} "
                f"| {d['auroc_mapped']:.3f} | {d['auroc_native']:.3f} | {d['auroc_random']:.3f} "
                f"| {'yes' if verdict and all(verdict.values()) else 'no'} |"
            )
    return [*lines, ""]


def write_report(run_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write `report.md` (and its figures) for one task's evaluation into `run_dir`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    figures = _figures(run_dir, metrics)
    methods = metrics["methods"]
    lines = [
        f"# ExpertSteer report — {metrics['task']}",
        "",
        f"Target `{metrics['target']}`, expert `{metrics['expert']}`. Task type "
        f"{metrics['task_type']}, scored by {metrics['mode']} (calibration "
        f"{metrics['calibration']}), steering positions `{metrics['positions']}`. "
        f"{metrics['n_dev']} dev items choose each method's alpha from {metrics['alphas']} "
        f"(layers: {metrics['layer_choice']}); {metrics['n_test']} test items are scored once "
        "at that choice. Intervals: 95% percentile bootstrap over items; differences are paired "
        "(same items). Habit: share of test items given the most common answer.",
        "",
    ]
    if metrics.get("environment"):
        lines += [f"Environment: {describe_environment(metrics['environment'])}", ""]
    if metrics.get("one_class_test"):
        lines += [
            "**Warning**: every test item has the same gold label; accuracy rewards a constant "
            "answer, so no gain or share of the gap is computed.",
            "",
        ]
    dropped = {pool: count for pool, count in (metrics.get("dropped_rows") or {}).items() if count}
    if dropped:
        lines += [
            "Rows dropped by the task loader (no answer, `skip_unanswered`): "
            + ", ".join(f"{count} in pool '{pool}'" for pool, count in dropped.items())
            + ".",
            "",
        ]
    if metrics.get("headroom") is not None:
        lines += [
            f"**Headroom**: expert {_interval(methods['expert']['test'])} vs unsteered target "
            f"{_interval(methods['none']['test'])} on test; expert − target "
            f"{_difference(metrics['headroom'])} points ({_verdict(metrics['headroom'])}).",
            "",
        ]
    transfer = transfer_section(metrics)
    if transfer:
        lines += ["## Transfer diagnostics (before any steering)", "", *transfer]
    lines += ["## Test accuracy", "", summary_table(metrics), ""]
    lines += ["## Controls and conclusion", "", *controls_section(metrics)]
    if "null" in figures:
        lines += [f"![random null]({figures['null']})", ""]
    lines += conditioned_section(metrics)
    findings = _findings(metrics)
    if findings:
        lines += ["## ExpertSteer against each method (test, paired)", "", *findings, ""]
    lines += [
        "## Dev accuracy vs alpha",
        "",
        f"![accuracy vs alpha]({figures['alpha']})",
        "",
    ]
    if "auroc" in figures:
        lines += ["## RFM validation AUROC per iteration", "", f"![RFM AUROC]({figures['auroc']})"]
        lines.append("")
    if "mi" in figures:
        lines += ["## Layer pairing (mutual information)", "", f"![MI heatmap]({figures['mi']})"]
        lines.append("")
    if (run_dir / R2_HEATMAP_FILE).is_file():
        lines += [
            "## Translatability (held-out R^2 of a ridge map per layer pair)",
            "",
            f"![R2 heatmap]({R2_HEATMAP_FILE})",
            "",
        ]
    samples = metrics.get("samples") or []
    if samples:
        lines += ["## Sample generations (test prompts, greedy)", ""]
        for sample in samples:
            lines += [
                f"**{sample['id']}** (gold: {_cell(str(sample['gold']), 80)}) — "
                f"{_cell(sample['prompt'], 300)}",
                "",
                "| method | output |",
                "|---|---|",
                *[f"| {name} | {_cell(text)} |" for name, text in sample["outputs"].items()],
                "",
            ]
    path = run_dir / REPORT_FILE
    with atomic_file(path) as tmp:
        Path(tmp).write_text("\n".join(lines), encoding="utf-8")
    return path
