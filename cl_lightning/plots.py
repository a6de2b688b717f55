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
    """Heatmap of an accuracy matrix (rows: after training task i; columns: task j), in percent (cells and colour bar).

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
    im = ax.imshow(100 * matrix, vmin=0, vmax=100, cmap="viridis")
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
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label("accuracy (%)")
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
    matrix = 100 * np.asarray(matrix, dtype=float)
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
    ax.set_ylabel("accuracy on task j (%)")
    ax.set_xticks(steps)
    ax.set_xlim(-0.3, max(n_rows - 1, 1) + 0.3)
    ax.set_ylim(-2, 102)
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
    matrix = 100 * np.asarray(matrix, dtype=float)
    fig = new_figure(7.0, 3.6)
    ax = fig.subplots()
    colors = mpl.colormaps["tab10" if matrix.shape[1] <= 10 else "tab20"]
    for j in range(matrix.shape[1]):
        ax.plot(steps, matrix[:, j], color=colors(j % colors.N), linewidth=1.2, label=f"task {j}")
    for j, start in enumerate(task_start_step):
        if start is not None and j > 0:
            ax.axvline(start, color=colors(j % colors.N), linestyle="--", linewidth=0.8, alpha=0.7)
    ax.set_xlabel("optimizer step (dashed: a task's start)")
    ax.set_ylabel("accuracy on task j (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def comparison_bars(
    rows: list[dict[str, Any]], metrics: tuple[str, ...] = ("avg_acc", "forgetting"), title: str = ""
) -> Figure:
    """Horizontal bars comparing groups of runs: one panel per metric, one bar per group, the mean over seeds with
    the sample std as error bar (none for a group of one run), in percent.

    Bars are horizontal so that a group's label is one line beside its bar however many groups there are (vertical
    bars with labels beneath turn 20 groups into an unreadable band of text); each value is written past the end of
    its error bar, so it never overlaps the cap.

    Args:
        rows: One dict per group, as :func:`cl_lightning.callbacks.sweep_summary.summarize_runs` returns them: keys
            ``method``, ``dataset``, ``scenario``, ``runs`` and ``<metric>_mean`` / ``<metric>_std`` (fractions;
            std ``None`` for one run), and optionally ``label``, the text beside the bar. A group without a metric
            gets no bar in that panel.
        metrics: The metrics to draw, one panel each.
        title: Figure title.

    Returns:
        The figure.
    """
    labels = [r.get("label") or f"{r['method']} · {r['dataset']}/{r['scenario']} · n={r['runs']}" for r in rows]
    methods = sorted({r["method"] for r in rows})
    colors = mpl.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    color_of = {m: colors(i % colors.N) for i, m in enumerate(methods)}
    label_inches = 0.065 * max((len(line) for label in labels for line in label.split("\n")), default=10)
    lines_per_label = max((label.count("\n") + 1 for label in labels), default=1)
    fig = new_figure(
        label_inches + 3.6 * len(metrics), max(2.6, 1.2 + 0.2 * lines_per_label * len(rows) + 0.25 * bool(title))
    )
    axes = fig.subplots(1, len(metrics), squeeze=False, sharey=True)
    y = np.arange(len(rows))
    for k, (ax, metric) in enumerate(zip(axes[0], metrics, strict=True)):
        means = np.array([100 * _or_nan(r.get(f"{metric}_mean")) for r in rows], dtype=float)
        stds = np.array([100 * _or_nan(r.get(f"{metric}_std")) for r in rows], dtype=float)  # None: one run
        errs = np.nan_to_num(stds)
        ax.barh(y, np.nan_to_num(means), xerr=errs, capsize=3, color=[color_of[r["method"]] for r in rows], height=0.7)
        finite = np.isfinite(means)
        ends = np.where(means >= 0, means + errs, means - errs)  # where each value's label starts
        low = min(0.0, float((means - errs)[finite].min())) if finite.any() else 0.0
        high = max(0.0, float((means + errs)[finite].max())) if finite.any() else 1.0
        pad = 0.22 * max(high - low, 1.0)  # room for the labels past the error bars
        negative, positive = bool((means[finite] < 0).any()), bool((means[finite] >= 0).any())
        ax.set_xlim(low - pad * negative - 0.02 * pad, high + pad * positive + 0.02 * pad)
        for yi, mean, end in zip(y, means, ends, strict=True):
            if np.isfinite(mean):
                right = mean >= 0
                ax.annotate(
                    f"{mean:.1f}", (end, yi), xytext=(3 if right else -3, 0), textcoords="offset points",
                    ha="left" if right else "right", va="center", fontsize=7,
                )  # fmt: skip
        ax.axvline(0, color="black", linewidth=0.8)
        if k == 0:  # the axes share y: the other panels hide these labels themselves
            ax.set_yticks(y, labels, fontsize=7)
        ax.set_xlabel(f"{metric} (%)")
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()  # the first group on top, in the order of the table
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def group_curves(
    curves: list[dict[str, Any]], xlabel: str, ylabel: str, title: str = "", xticks: list[int] | None = None
) -> Figure:
    """Curves of several groups of runs on one axes, each the mean over seeds with a band of ± one sample std.

    Args:
        curves: One dict per group: ``label``, ``x``, ``mean`` (percent) and ``std`` (percent, or None for one run:
            no band).
        xlabel: The x axis' label.
        ylabel: The y axis' label.
        title: Axes title.
        xticks: Tick positions of the x axis (default: matplotlib's).

    Returns:
        The figure.
    """
    colors = mpl.colormaps["tab10" if len(curves) <= 10 else "tab20"]
    longest = max((len(c["label"]) for c in curves), default=10)
    fig = new_figure(5.5 + 0.065 * longest, max(3.6, 1.6 + 0.2 * len(curves)))
    ax = fig.subplots()
    for i, curve in enumerate(curves):
        color = colors(i % colors.N)
        x, mean = np.asarray(curve["x"]), np.asarray(curve["mean"], dtype=float)
        ax.plot(x, mean, marker="o" if len(x) <= 20 else None, markersize=3, color=color, label=curve["label"])
        if curve.get("std") is not None:
            std = np.asarray(curve["std"], dtype=float)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticks is not None:
        ax.set_xticks(xticks)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig
