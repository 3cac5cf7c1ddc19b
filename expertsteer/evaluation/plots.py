"""Report figures, drawn with Matplotlib's object API on the Agg canvas (no pyplot state), each
written atomically as PNG."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from expertsteer.cache import atomic_file

log = logging.getLogger(__name__)

DPI = 150


def _layer_axis(axis: Axis, labels: Sequence[int]) -> None:
    """Integer ticks at matrix indices, labelled with the real block numbers."""
    axis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    axis.set_major_formatter(
        FuncFormatter(lambda value, _: str(labels[int(value)]) if 0 <= value < len(labels) else "")
    )


def mi_heatmap(
    mi: torch.Tensor,
    pairs: list[tuple[int, int]],
    path: str | Path,
    expert_name: str,
    target_name: str,
    expert_layers: list[int] | None = None,
    target_layers: list[int] | None = None,
    label: str = "MI (nats)",
    title: str = "MI",
) -> Path:
    """Heatmap of a layer-pair matrix [L_E, L_T] (MI by default; `label` / `title` name
    another, e.g. held-out R^2) with the chosen `pairs` (row, column indices) boxed in red;
    NaN entries grey. Returns the PNG path."""
    values = mi.detach().to("cpu", torch.float64).numpy()
    if values.ndim != 2:
        raise ValueError(f"MI matrix must be 2-D, got shape {values.shape}")
    rows, cols = values.shape
    expert_layers = list(range(rows)) if expert_layers is None else list(expert_layers)
    target_layers = list(range(cols)) if target_layers is None else list(target_layers)
    if len(expert_layers) != rows or len(target_layers) != cols:
        raise ValueError(
            f"{len(expert_layers)} expert and {len(target_layers)} target layer labels for an "
            f"MI matrix of shape {values.shape}"
        )
    figure = Figure(figsize=(1.5 + min(0.3 * cols, 12.0), 1.5 + min(0.3 * rows, 10.0)))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(values, origin="lower", aspect="auto", cmap=cmap, interpolation="nearest")
    figure.colorbar(image, ax=ax, label=label)
    for i, j in pairs:
        ax.add_patch(
            Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.0)
        )
    _layer_axis(ax.xaxis, target_layers)
    _layer_axis(ax.yaxis, expert_layers)
    ax.set_xlabel(f"target layer ({target_name})")
    ax.set_ylabel(f"expert layer ({expert_name})")
    ax.set_title(f"{title} between {expert_name} and {target_name} layers (red: chosen pairs)")
    figure.tight_layout()
    path = _save(figure, path)
    log.info("%s heatmap written to %s", title, path)
    return path


def _finish(figure: Figure, ax, xlabel: str, ylabel: str, title: str, path: str | Path) -> Path:
    """Label a line chart, add its legend and write it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def accuracy_vs_alpha(
    curves: dict[str, dict[float, float]],
    references: dict[str, float],
    path: str | Path,
    title: str,
) -> Path:
    """Dev accuracy against alpha, one line per method (`curves`: method -> {alpha: accuracy}),
    with horizontal lines for the unsteered references (`references`: name -> accuracy)."""
    figure = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for name, curve in curves.items():
        alphas = sorted(curve)
        ax.plot(alphas, [curve[a] for a in alphas], marker="o", label=name)
    styles = iter(("--", ":", "-."))
    for name, accuracy in references.items():
        ax.axhline(accuracy, color="black", linestyle=next(styles, "--"), label=name)
    if all(a > 0 for curve in curves.values() for a in curve):
        ax.set_xscale("log")
    xlabel = "alpha (fraction of the layer's mean residual norm)"
    return _finish(figure, ax, xlabel, "dev accuracy", title, path)


def auroc_curves(curves: dict[str, list[float]], path: str | Path, title: str) -> Path:
    """Validation AUROC per RFM iteration (`curves`: label -> [AUROC at iteration 0..T])."""
    figure = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    xlabel = "RFM iteration (0: identity metric)"
    return _finish(figure, ax, xlabel, "dev AUROC (selected bandwidth)", title, path)


def null_gains(
    gains: Sequence[float], methods: dict[str, float], p95: float, path: str | Path, title: str
) -> Path:
    """The random null's test gains over `none` (one dot per draw, a dashed line at its 95th
    percentile) against each method's gain (labelled vertical lines), in points."""
    figure = Figure(figsize=(7.0, 1.8 + 0.25 * len(methods)))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.scatter([100 * g for g in gains], [0.0] * len(gains), color="grey", label="null draws")
    ax.axvline(100 * p95, color="black", linestyle="--", label="null 95th percentile")
    colours = colormaps["tab10"]
    for index, (name, gain) in enumerate(methods.items()):
        ax.axvline(100 * gain, color=colours(index % 10), label=name)
    ax.set_yticks([])
    return _finish(figure, ax, "test gain over none (points)", "", title, path)


def concept_vs_perplexity(
    curves: dict[str, list[dict[str, float]]],
    none: dict[str, float],
    path: str | Path,
    title: str,
    concept_label: str = "concept score",
) -> Path:
    """The steering trade-off: dev concept score against dev perplexity across the alpha grid,
    one line per method (`curves`: label -> points with alpha, concept, perplexity, each point
    annotated with its alpha), and the unsteered target as a black star."""
    figure = Figure(figsize=(7.5, 5.0))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    colours = colormaps["tab10"]
    for index, (name, points) in enumerate(curves.items()):
        # Through the unsteered point at alpha 0: one curve from the negative to the positive side.
        origin = {"alpha": 0.0, "concept": none["concept"], "perplexity": none["perplexity"]}
        ordered = sorted([*points, origin], key=lambda p: p["alpha"])
        xs = [p["perplexity"] for p in ordered]
        ys = [p["concept"] for p in ordered]
        ax.plot(xs, ys, marker="o", color=colours(index % 10), label=name)
        for p in ordered:
            if p is origin:
                continue
            ax.annotate(f"{p['alpha']:g}", (p["perplexity"], p["concept"]), fontsize=6)
    ax.scatter([none["perplexity"]], [none["concept"]], marker="*", s=150, color="black")
    ax.plot([], [], marker="*", linestyle="", color="black", label="none (unsteered)")
    ax.set_xscale("log")
    return _finish(
        figure, ax, "mean perplexity under the unsteered target (dev)", concept_label, title, path
    )
