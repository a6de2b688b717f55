"""Figures of a run, drawn on matplotlib's Agg canvas.

The figures are made without ``pyplot``: each is a :class:`~matplotlib.figure.Figure` with its own Agg canvas, so
drawing one needs no display and never changes the process's backend (a global ``matplotlib.use("Agg")`` would turn
off inline figures in a notebook that imports this module), and a figure is freed like any object once unreferenced:
there is no ``pyplot.close`` to forget. ``fig.savefig(path)`` writes a PNG; in a notebook with ``%matplotlib inline``
a figure returned as a cell's value is shown.
"""

from __future__ import annotations

from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on an Agg canvas, outside ``pyplot``'s registry."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def accuracy_heatmap(matrix: np.ndarray, title: str = "accuracy matrix") -> Figure:
    """Heatmap of an accuracy matrix (rows: after training task i; columns: task j), cells annotated in percent.

    Args:
        matrix: Accuracy matrix as fractions, ``[rows, n_tasks]``; rows not yet trained are NaN and drawn blank.
        title: Axes title.

    Returns:
        The figure.
    """
    matrix = np.asarray(matrix, dtype=float)
    n_rows, n_cols = matrix.shape
    size = max(3.0, 0.6 * n_cols + 1.5)
    fig = new_figure(size, size * n_rows / n_cols + 0.3)
    ax = fig.subplots()
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(n_cols))
    ax.set_yticks(range(n_rows))
    ax.set_title(title)
    if n_cols <= 20:
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(matrix[i, j]):
                    color = "black" if matrix[i, j] > 0.6 else "white"
                    ax.text(j, i, f"{100 * matrix[i, j]:.0f}", ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def accuracy_curves(matrix: np.ndarray, title: str = "accuracy on each task") -> Figure:
    """Accuracy on each task over the sequence: for each task j, accuracy on j after each training task i.

    One line per task (column of the matrix), plotted against the rows so far. The part of a line before its task is
    trained (the upper triangle, ``i < j``) is dotted, the part from its training on (``i >= j``) solid with a large
    marker where it was trained, so the drop of a solid line is what the sequence forgot of that task.

    Args:
        matrix: Accuracy matrix as fractions, shape ``[rows so far, n_tasks]``; rows not trained yet may be left out
            or be NaN.
        title: Axes title.

    Returns:
        The figure.
    """
    matrix = np.asarray(matrix, dtype=float)
    n_rows, n_cols = matrix.shape
    steps = np.arange(n_rows)
    fig = new_figure(max(4.5, 0.5 * n_rows + 3.5), 3.6)
    ax = fig.subplots()
    colors = mpl.colormaps["tab10" if n_cols <= 10 else "tab20"]
    for j in range(n_cols):
        color = colors(j % colors.N)
        column = matrix[:, j]
        if j > 0:  # before task j is trained: up to and including the row where it is trained, to join the lines
            before = steps <= min(j, n_rows - 1)
            ax.plot(steps[before], column[before], linestyle=":", color=color, alpha=0.6)
        if j < n_rows:
            after = steps >= j
            ax.plot(steps[after], column[after], marker="o", markersize=3, color=color, label=f"task {j}")
            ax.plot([j], [column[j]], marker="o", markersize=7, color=color)
    ax.set_xlabel("after training task i")
    ax.set_ylabel("accuracy on task j")
    ax.set_xticks(steps)
    ax.set_xlim(-0.3, max(n_rows - 1, 1) + 0.3)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if n_rows:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def anytime_curves(
    steps: list[int], matrix: np.ndarray, task_start_step: list[int | None], title: str = "accuracy during training"
) -> Figure:
    """Accuracy on each task at every periodic evaluation (``results.json``'s ``anytime``), against the step, with a
    dashed vertical line at each task's (nominal) start.

    Args:
        steps: The steps evaluated.
        matrix: Fractions, ``[len(steps), n_tasks]``.
        task_start_step: Each task's first step (``None``: not reached).
        title: Axes title.
    """
    matrix = np.asarray(matrix, dtype=float)
    fig = new_figure(7.0, 3.6)
    ax = fig.subplots()
    colors = mpl.colormaps["tab10" if matrix.shape[1] <= 10 else "tab20"]
    for j in range(matrix.shape[1]):
        ax.plot(steps, matrix[:, j], color=colors(j % colors.N), linewidth=1.2, label=f"task {j}")
    for j, start in enumerate(task_start_step):
        if start is not None and j > 0:
            ax.axvline(start, color=colors(j % colors.N), linestyle="--", linewidth=0.8, alpha=0.7)
    ax.set_xlabel("optimizer step (dashed: a task's start)")
    ax.set_ylabel("accuracy on task j")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def comparison_bars(
    rows: list[dict[str, Any]], metrics: tuple[str, ...] = ("avg_acc", "forgetting"), title: str = ""
) -> Figure:
    """Bars comparing groups of runs: one panel per metric, one bar per group, mean with std error bars over seeds.

    Args:
        rows: One dict per group, as :func:`cl_lightning.callbacks.sweep_summary.summarize_runs` returns them: keys
            ``method``, ``dataset``, ``scenario``, ``runs`` and ``<metric>_mean`` / ``<metric>_std`` (fractions),
            and optionally ``label``, the text under the bar. A group without a metric gets no bar in that panel.
        metrics: The metrics to draw, one panel each.
        title: Figure title.

    Returns:
        The figure.
    """
    labels = [r.get("label") or f"{r['method']}\n{r['dataset']}/{r['scenario']}\nn={r['runs']}" for r in rows]
    methods = sorted({r["method"] for r in rows})
    colors = mpl.colormaps["tab10"]
    color_of = {m: colors(i % colors.N) for i, m in enumerate(methods)}
    width = max(4.0, 0.9 * len(rows) + 1.5)
    fig = new_figure(width * len(metrics), 3.8)
    axes = fig.subplots(1, len(metrics), squeeze=False)
    x = np.arange(len(rows))
    for ax, metric in zip(axes[0], metrics, strict=True):
        means = np.array([100 * r.get(f"{metric}_mean", np.nan) for r in rows], dtype=float)
        stds = np.array([100 * r.get(f"{metric}_std", np.nan) for r in rows], dtype=float)
        bar_colors = [color_of[r["method"]] for r in rows]
        ax.bar(x, np.nan_to_num(means), yerr=np.nan_to_num(stds), capsize=4, color=bar_colors)
        for xi, mean in zip(x, means, strict=True):
            if np.isfinite(mean):
                offset = {"xytext": (0, 2), "textcoords": "offset points"}
                ax.annotate(f"{mean:.1f}", (xi, mean), ha="center", fontsize=7, **offset)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
