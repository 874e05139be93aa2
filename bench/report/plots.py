"""Plots of a leaderboard (seaborn on matplotlib's Agg backend), each written as PNG and PDF.

* ``accuracy_bars``: worst-group and average test accuracy per dataset and method, bars at the mean
  over seeds, error bars one sample std, dots the seeds;
* ``group_heatmap_<dataset>``: mean test accuracy of every group (methods x the dataset's group names);
* ``val_curves_<dataset>``: validation worst-group accuracy per evaluation, mean over seeds with a
  one-std band, for the chosen configuration of each method;
* ``student_teacher_<dataset>_<method>``: for a method with a ``student`` predictor (ULE), the
  student's and the teacher's worst-group accuracy over evaluations, validation and test.

Every plot shows the model selection rule in its title, and an oracle report says so.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from bench.report.aggregate import Leaderboard  # noqa: E402

DPI = 150
EVALUATION_LABEL = "evaluation (one per epoch, all stages in order)"
STUDENT = "student"


def _selection_text(board: Leaderboard) -> str:
    text = f"model selection: {board.rule}"
    return f"ORACLE (test-selected, not a valid result) — {text}" if board.oracle else text


def _file_name(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-") for part in parts)


def _palette(board: Leaderboard) -> dict[str, tuple[float, float, float]]:
    """One fixed colour per row, the same in every plot."""
    rows = list(board.rows["row"])
    return dict(zip(rows, sns.color_palette("tab10" if len(rows) <= 10 else "husl", len(rows))))


def accuracy_bars(board: Leaderboard) -> Figure:
    """Two panels: worst-group and average test accuracy, grouped by dataset, one bar per method."""
    rows = list(board.rows["row"])
    data = board.per_seed.assign(
        worst=board.per_seed["test_worst_group"] * 100, average=board.per_seed["test_average"] * 100
    )
    width = max(9.0, 3.5 + len(board.datasets) * max(1.4, 0.35 * len(rows)))
    figure, axes = plt.subplots(2, 1, figsize=(width, 8.5), constrained_layout=True)
    panels = [
        ("worst", "worst-group accuracy (%)", "Worst-group accuracy (test)", board.datasets),
        ("average", "average accuracy (%)", "Average accuracy (test; the dataset's kind in brackets)",
         [f"{d}\n({board.average_kind(d).replace('_', '-')})" for d in board.datasets]),
    ]
    palette = _palette(board)
    for ax, (column, ylabel, title, ticks) in zip(axes, panels):
        sns.barplot(data=data, x="dataset", y=column, hue="row", order=board.datasets, hue_order=rows,
                    palette=palette, errorbar="sd", capsize=0.15, err_kws={"linewidth": 1.2}, ax=ax)
        sns.stripplot(data=data, x="dataset", y=column, hue="row", order=board.datasets, hue_order=rows,
                      dodge=True, palette="dark:black", size=3, alpha=0.6, legend=False, ax=ax)
        ax.set_xticks(range(len(board.datasets)), ticks)
        ax.set(title=title, xlabel="dataset", ylabel=ylabel, ylim=(0, 100))
        ax.grid(axis="y", alpha=0.3)
        legend = ax.get_legend()
        if legend is not None:
            legend.remove()
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles[: len(rows)], labels[: len(rows)], title="method", loc="outside lower center",
                  ncols=min(len(rows), 6))
    figure.suptitle(f"Test accuracy (%): bars = mean over seeds, error bars = ± sample std, dots = seeds\n"
                    f"{_selection_text(board)}", fontsize="medium")
    return figure


def group_heatmap(board: Leaderboard, dataset: str) -> Figure:
    """Mean test accuracy (%) of every group, methods x groups."""
    matrix = board.group_accuracies[dataset]
    present = matrix.notna().any(axis=0)  # e.g. Spawrious: most (class, location) groups are absent from test
    matrix = matrix.loc[:, present]
    n_rows, n_groups = matrix.shape
    figure, ax = plt.subplots(figsize=(max(6.0, 2.5 + 1.0 * n_groups), max(3.0, 1.6 + 0.5 * n_rows)),
                              constrained_layout=True)
    sns.heatmap(matrix, annot=True, fmt=".1f", vmin=0, vmax=100, cmap="viridis", linewidths=0.5,
                cbar_kws={"label": "test accuracy (%)"}, ax=ax)
    left_out = "" if present.all() else f"; {int((~present).sum())} groups without test examples left out"
    ax.set(title=f"{dataset}: test accuracy per group (%), mean over seeds\n({_selection_text(board)})",
           xlabel=f"group (class / spurious attribute values{left_out})", ylabel="method")
    ax.grid(False)
    ax.tick_params(axis="x", labelrotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    ax.tick_params(axis="y", labelrotation=0)
    return figure


def validation_curves(board: Leaderboard, dataset: str) -> Figure:
    """Validation worst-group accuracy per evaluation, mean over seeds with a one-std band."""
    curves = board.curves[(board.curves["dataset"] == dataset) & board.curves["is_primary"]]
    curves = curves.assign(value=curves["val_worst_group"] * 100)
    rows = [r for r in board.rows["row"] if r in set(curves["row"])]
    figure, ax = plt.subplots(figsize=(10, 5), constrained_layout=True)
    sns.lineplot(data=curves, x="evaluation", y="value", hue="row", hue_order=rows, palette=_palette(board),
                 errorbar="sd", marker="o", ax=ax)
    _mark_unselectable(ax, curves, "value")
    ax.set(title=f"{dataset}: validation worst-group accuracy during training\n"
                 f"mean ± std over seeds of the chosen configuration\n({_selection_text(board)})",
           xlabel=EVALUATION_LABEL, ylabel="validation worst-group accuracy (%)", ylim=(0, 100))
    _finish_axes(ax, "method", outside=True)
    return figure


def _mark_unselectable(ax: Axes, curves: pd.DataFrame, column: str, hue: str = "row") -> None:
    """Cross out evaluations of stages a rule may not pick (JTT's identification stage)."""
    unselectable = curves[~curves["selectable"]]
    if unselectable.empty:
        return
    means = unselectable.groupby([hue, "evaluation"], sort=False)[column].mean().reset_index()
    ax.scatter(means["evaluation"], means[column], marker="x", s=70, color="black", zorder=5,
               label="not selectable (stage never picked)")


def _finish_axes(ax: Axes, legend_title: str, outside: bool = False) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if outside:  # many methods: keep the legend off the curves
        ax.legend(title=legend_title, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(title=legend_title)


def student_teacher(board: Leaderboard, dataset: str, method: str) -> Figure:
    """Student vs teacher (every predictor of the method) worst-group accuracy, validation and test."""
    curves = board.curves[(board.curves["dataset"] == dataset) & (board.curves["method"] == method)]
    long = pd.concat([
        curves.assign(split="validation", value=curves["val_worst_group"] * 100),
        curves.assign(split="test", value=curves["test_worst_group"] * 100),
    ])
    long["model"] = [f"{p} (primary)" if primary else p for p, primary in zip(long["predictor"], long["is_primary"])]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True, constrained_layout=True)
    order = sorted(long["model"].unique(), key=lambda m: (not m.endswith("(primary)"), m))
    for ax, split in zip(axes, ("validation", "test")):
        sns.lineplot(data=long[long["split"] == split], x="evaluation", y="value", hue="model", hue_order=order,
                     errorbar="sd", marker="o", ax=ax)
        _mark_unselectable(ax, long[long["split"] == split], "value", hue="model")
        ax.set(title=f"{split} worst-group accuracy", xlabel=EVALUATION_LABEL, ylabel="worst-group accuracy (%)",
               ylim=(0, 100))
        _finish_axes(ax, "model")
    figure.suptitle(f"{dataset}, {method}: student vs teacher, mean ± std over seeds of the chosen configuration\n"
                    f"({_selection_text(board)})")
    return figure


def _save(figure: Figure, folder: Path, name: str) -> list[Path]:
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    figure.savefig(paths[0], dpi=DPI)
    figure.savefig(paths[1])
    plt.close(figure)
    return paths


def write_plots(board: Leaderboard, folder: Path) -> list[Path]:
    """Draw every plot of the report into ``folder`` (PNG and PDF); returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook")
    written = _save(accuracy_bars(board), folder, "accuracy_bars")
    for dataset in board.datasets:
        written += _save(group_heatmap(board, dataset), folder, _file_name("group_heatmap", dataset))
        written += _save(validation_curves(board, dataset), folder, _file_name("val_curves", dataset))
        with_student = board.curves[(board.curves["dataset"] == dataset) & (board.curves["predictor"] == STUDENT)]
        for method in sorted(with_student["method"].unique()):
            written += _save(student_teacher(board, dataset, method), folder,
                             _file_name("student_teacher", dataset, method))
    return written
