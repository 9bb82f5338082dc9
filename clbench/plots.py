"""Every figure clbench draws. Per run (PNG, in the run folder): the accuracy matrix as a
heatmap, per-task accuracy curves, and figures of the extra tables some strategies save
(gate and kernel usage). Per report (PNG and PDF, across runs and seeds): `make_figures`.

Report figures give each strategy the same colour (Okabe-Ito, a colour-blind-safe
palette; marker and line style tell apart strategies that share a colour)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from clbench.registry import load_strategies

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<"]  # not a multiple of 8: colour repeats get new markers
LINESTYLES = ["-", "--", ":", "-."]


def percent_heatmap(ax, fractions: np.ndarray, digits: int = 0, fontsize: int = 8, aspect: str = "equal"):
    """Fractions shown as percentages (0-100, viridis), each cell labelled with its value."""
    image = ax.imshow(100 * fractions, vmin=0, vmax=100, cmap="viridis", aspect=aspect)
    for (i, j), value in np.ndenumerate(100 * fractions):
        ax.text(j, i, f"{value:.{digits}f}", ha="center", va="center", fontsize=fontsize,
                color="black" if value > 60 else "white")
    return image


def save_png(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def accuracy_heatmap(matrix: np.ndarray, task_classes: list[list[int]], title: str, path: Path) -> None:
    T = len(matrix)
    fig, ax = plt.subplots(figsize=(1.1 * T + 2.5, 1.0 * T + 1.8))
    image = percent_heatmap(ax, matrix, digits=1, fontsize=9)
    labels = [f"{j + 1}\n({','.join(map(str, c))})" for j, c in enumerate(task_classes)]
    ax.set_xticks(range(matrix.shape[1]), labels)
    ax.set_yticks(range(T), [str(i + 1) for i in range(T)])
    ax.set_xlabel("evaluated on task (classes)")
    ax.set_ylabel("after training task")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    save_png(fig, path)


def task_accuracy_curves(matrix: np.ndarray, title: str, path: Path) -> None:
    """Accuracy of each task from the step it is learned on, and the running average."""
    T = len(matrix)
    steps = np.arange(1, T + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for j in range(matrix.shape[1]):
        ax.plot(steps[j:], 100 * matrix[j:, j], marker="o", label=f"task {j + 1}")
    average = [100 * matrix[i, : i + 1].mean() for i in range(T)]
    ax.plot(steps, average, color="black", linewidth=2.5, linestyle="--", label="average (seen tasks)")
    ax.set_xticks(steps)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=10)
    save_png(fig, path)


def _layer_by_task_heatmap(ax, values: pd.DataFrame, colorbar: str, xlabel: str, title: str) -> None:
    """Rows: layers (network order); columns: tasks; cells: percentages."""
    image = percent_heatmap(ax, values.to_numpy(), aspect="auto")
    ax.set_xticks(range(values.shape[1]), [str(c) for c in values.columns])
    ax.set_yticks(range(len(values)), values.index)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    ax.figure.colorbar(image, ax=ax, label=colorbar)


def gate_usage_heatmap(table: pd.DataFrame, title: str, path: Path) -> None:
    """Mean gate firing rate of each task's path per layer (averaged over its classes)."""
    values = table.pivot_table(index="layer", columns="task", values="firing_rate", sort=False)
    fig, ax = plt.subplots(figsize=(1.0 * values.shape[1] + 3, 0.35 * len(values) + 1.8))
    _layer_by_task_heatmap(ax, values, "open gates (% of kernels)", "task's path", title)
    save_png(fig, path)


def kernel_usage_heatmap(table: pd.DataFrame, title: str, path: Path) -> None:
    """Left: kernels each task used (of which reused from earlier tasks, in brackets);
    right: kernels in use by the learned tasks after each task (the rest are free)."""
    used, reused, taken = (table.pivot_table(index="layer", columns="after_task", values=v, sort=False)
                           for v in ("used", "reused", "frozen"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(2.0 * used.shape[1] + 5, 0.35 * len(used) + 2.0))
    _layer_by_task_heatmap(left, used, "used by the task (%)", "task", "used by each task (reused from earlier)")
    for (i, j), value in np.ndenumerate(100 * reused.to_numpy()):
        left.texts[i * used.shape[1] + j].set_text(f"{100 * used.iat[i, j]:.0f} ({value:.0f})")
    _layer_by_task_heatmap(right, taken, "in use (%)", "after training task", "in use by learned tasks")
    fig.suptitle(title, fontsize=10)
    save_png(fig, path)


def confusion_fractions(table: pd.DataFrame) -> pd.DataFrame:
    """The last step of a task_confusion.csv as fractions of each true task's test samples."""
    last = table[table.after_task == table.after_task.max()]
    counts = last.pivot_table(index="true_task", columns="predicted_task", values="samples", aggfunc="sum")
    return counts.div(counts.sum(axis=1), axis=0)


def task_confusion_heatmap(table: pd.DataFrame, title: str, path: Path) -> None:
    """After the last task: the share of each task's test samples given a class of each
    task (the diagonal is the task-inference accuracy)."""
    fractions = confusion_fractions(table)
    fig, ax = plt.subplots(figsize=(1.0 * fractions.shape[1] + 2.5, 1.0 * len(fractions) + 1.8))
    image = percent_heatmap(ax, fractions.to_numpy(), digits=1)
    ax.set_xticks(range(fractions.shape[1]), [str(c) for c in fractions.columns])
    ax.set_yticks(range(len(fractions)), [str(i) for i in fractions.index])
    ax.set_xlabel("task of the predicted class")
    ax.set_ylabel("true task")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="test samples (%)")
    save_png(fig, path)


# Figures for the extra tables a run saves (a strategy's `artifacts()`, the class
# setting's task confusion), by table name.
ARTIFACT_PLOTS = {"gate_usage": gate_usage_heatmap, "kernel_usage": kernel_usage_heatmap,
                  "task_confusion": task_confusion_heatmap}


# Report figures: several runs, mean over seeds.


class Palette:
    """A fixed style per strategy name, the same in every report whatever strategies it
    shows: the registered strategies in name order, then any others (e.g. removed since)."""

    def __init__(self, strategies):
        registered = list(load_strategies())
        self.index = {name: i for i, name in enumerate(registered + sorted(set(strategies) - set(registered)))}

    def __call__(self, strategy: str) -> dict:
        i = self.index[strategy]
        return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)],
                "linestyle": LINESTYLES[(i // len(OKABE_ITO)) % len(LINESTYLES)]}


def plot_mean_band(ax, values, name: str, style: dict) -> None:
    """Mean over seeds as a line, ± one std as a band; `values` is grouped by the x axis."""
    mean, std = values.mean(), values.std().fillna(0)
    ax.plot(mean.index, 100 * mean, label=name, **style)
    ax.fill_between(mean.index, 100 * (mean - std), 100 * (mean + std), color=style["color"], alpha=0.15)


def mean_matrix(frame: pd.DataFrame, metric: str) -> np.ndarray:
    """Mean over seeds of `metric` per (step, task) as a matrix (rows: steps 1..T)."""
    values = frame[(frame.metric == metric) & (frame.step > 0)]
    return values.pivot_table(index="step", columns="task", values="value", aggfunc="mean").to_numpy()


def figure_average_accuracy(configs, palette, title):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, strategy, frame in configs:
        curve = frame[(frame.metric == "average_accuracy") & (frame.step > 0)].groupby("step").value
        plot_mean_band(ax, curve, name, palette(strategy))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy on seen tasks (%)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    return fig


def _grid(count: int, size=(3.0, 2.6)):
    columns = min(count, 4)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(size[0] * columns, size[1] * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, axes.flat


def figure_task_curves(configs, palette, title):
    fig, axes = _grid(len(configs))
    for ax, (name, strategy, frame) in zip(axes, configs):
        matrix = mean_matrix(frame, "accuracy")
        steps = np.arange(1, len(matrix) + 1)
        for j in range(matrix.shape[1]):
            ax.plot(steps[j:], 100 * matrix[j:, j], marker=".", label=f"task {j + 1}")
        ax.set_title(name, fontsize=9, color=palette(strategy)["color"])
        ax.set_ylim(0, 102)
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.supxlabel("tasks learned")
    fig.supylabel("accuracy (%)")
    fig.suptitle(title, fontsize=10)
    return fig


def figure_matrices(configs, palette, title):
    fig, axes = _grid(len(configs), size=(2.9, 2.8))
    for ax, (name, strategy, frame) in zip(axes, configs):
        matrix = mean_matrix(frame, "accuracy")
        percent_heatmap(ax, matrix, fontsize=7)
        ax.set_xticks(range(matrix.shape[1]), range(1, matrix.shape[1] + 1))
        ax.set_yticks(range(len(matrix)), range(1, len(matrix) + 1))
        ax.set_title(name, fontsize=9, color=palette(strategy)["color"])
    fig.supxlabel("evaluated on task")
    fig.supylabel("after training task")
    fig.suptitle(f"{title}: accuracy (%), mean over seeds", fontsize=10)
    return fig


def figure_forgetting(configs, palette, title):
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(configs)
    for k, (name, strategy, frame) in enumerate(configs):
        final = frame[(frame.metric == "forgetting") & (frame.step == frame.step.max())]
        per_task = final.groupby("task").value
        mean, std = per_task.mean(), per_task.std().fillna(0)
        ax.bar(mean.index + (k - (len(configs) - 1) / 2) * width, 100 * mean, width, yerr=100 * std,
               label=name, color=palette(strategy)["color"], capsize=2)
    ax.set_xlabel("task")
    ax.set_ylabel("forgetting after the last task (%)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return fig


# A module variant's cost under a report cost metric: its own measure, in the same unit.
VARIANT_COST = {"executed_macs": ("executed_macs", 1.0), "model_size_bytes": ("model_size_bits", 1 / 8)}


def cost_points(frame: pd.DataFrame, metric: str):
    """(variant, costs, accuracies) over a configuration's runs after the last task: the
    trained model (variant '') and each module variant (e.g. 'w4a4_per_channel')."""
    final = frame[frame.task.isna() & (frame.step == frame.step.max())]
    variants = sorted({m.partition("@")[2] for m in final.metric if m.startswith("average_accuracy@")})
    variant_metric, factor = VARIANT_COST[metric]
    for variant in ["", *variants]:
        cost = (final[final.metric == metric].value if not variant
                else final[final.metric == f"{variant_metric}@{variant}"].value * factor)
        accuracy = final[final.metric == "average_accuracy" + (f"@{variant}" if variant else "")].value
        if not cost.empty:
            yield variant, cost, accuracy


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and accuracy (higher), by cost."""
    front = []
    for cost, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((cost, accuracy))
    return front


def figure_cost(configs, palette, title, metric, xlabel, scale):
    """Mean accuracy against mean cost per configuration: the trained model as a filled
    marker, each module variant as an open one joined to it, and the Pareto front over
    them all."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    means = []
    for name, strategy, frame in configs:
        style = palette(strategy)
        drawn = []
        for variant, cost, accuracy in cost_points(frame, metric):
            x, y = cost.mean() * scale, 100 * accuracy.mean()
            ax.errorbar(x, y, xerr=cost.std() * scale if len(cost) > 1 else None,
                        yerr=100 * accuracy.std() if len(accuracy) > 1 else None, color=style["color"],
                        marker=style["marker"], markersize=8 if not variant else 6, capsize=3,
                        markerfacecolor="none" if variant else style["color"], linestyle="none",
                        label=None if variant else name)
            if variant:
                ax.annotate(variant, (x, y), fontsize=5, xytext=(3, 3), textcoords="offset points")
            drawn.append((x, y))
        for variant_point in drawn[1:]:
            ax.plot(*zip(drawn[0], variant_point), color=style["color"], linewidth=0.6, alpha=0.6)
        means += drawn
    if len(means) > 1:
        ax.step(*zip(*pareto_front(means)), where="post", color="grey", linestyle="--", linewidth=0.8,
                marker="o", markersize=12, markerfacecolor="none", label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return fig


def figure_capacity(usage: pd.DataFrame, palette, title):
    """Share of kernels used by past tasks (weighted over layers) after each task."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, strategy), frame in usage.groupby(["label", "strategy"]):
        frozen = frame.assign(count=frame.frozen * frame.kernels).groupby(["run_dir", "after_task"])
        share = (frozen["count"].sum() / frozen.kernels.sum()).groupby("after_task")
        plot_mean_band(ax, share, name, palette(strategy))
    ax.set_xlabel("after training task")
    ax.set_ylabel("kernels in use by learned tasks (%)")
    ax.set_ylim(0, 102)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def figure_gate_usage(gates: pd.DataFrame, palette, title):
    """Mean gate firing rate per layer (rows) and task path (columns), one panel per configuration."""
    configs = list(gates.groupby(["label", "strategy"]))
    fig, axes = _grid(len(configs), size=(4.0, 3.2))
    for ax, ((name, strategy), frame) in zip(axes, configs):
        values = frame.pivot_table(index="layer", columns="task", values="firing_rate", aggfunc="mean", sort=False)
        percent_heatmap(ax, values.to_numpy(), fontsize=7, aspect="auto")
        ax.set_xticks(range(values.shape[1]), values.columns)
        ax.set_yticks(range(len(values)), values.index, fontsize=7)
        ax.set_xlabel("task's path")
        ax.set_title(name, fontsize=9, color=palette(strategy)["color"])
    fig.suptitle(f"{title}: open gates (% of kernels, mean per sample and seed)", fontsize=10)
    return fig


def figure_task_confusion(confusion: pd.DataFrame, palette, title):
    """After the last task: the share of each task's test samples given a class of each
    task, mean over seeds, one panel per configuration."""
    configs = list(confusion.groupby(["label", "strategy"]))
    fig, axes = _grid(len(configs), size=(3.4, 3.0))
    for ax, ((name, strategy), frame) in zip(axes, configs):
        runs = [confusion_fractions(run) for _, run in frame.groupby("run_dir")]
        fractions = sum(runs) / len(runs)
        percent_heatmap(ax, fractions.to_numpy(), fontsize=7)
        ax.set_xticks(range(fractions.shape[1]), fractions.columns)
        ax.set_yticks(range(len(fractions)), fractions.index)
        ax.set_xlabel("task of the predicted class")
        ax.set_ylabel("true task")
        ax.set_title(name, fontsize=9, color=palette(strategy)["color"])
    fig.suptitle(f"{title}: task confusion after the last task (% of each task's test samples, mean over seeds)",
                 fontsize=10)
    return fig


def save_png_pdf(fig, folder: Path, name: str) -> Path:
    fig.tight_layout()
    for suffix in ("png", "pdf"):
        fig.savefig(folder / f"{name}.{suffix}", dpi=130)
    plt.close(fig)
    return folder / f"{name}.png"


def make_figures(configurations: dict, usage: pd.DataFrame, gates: pd.DataFrame, confusion: pd.DataFrame,
                 folder: Path) -> list[tuple[str, Path]]:
    """Every report figure, per scenario, data and setting, as (caption, PNG path).
    `configurations`: (scenario, data, setting) -> [(label, strategy, its runs' metrics)];
    `usage`, `gates`, `confusion`: the runs' kernel_usage, gate_usage and task_confusion
    tables (may be empty)."""
    folder.mkdir(parents=True, exist_ok=True)
    palette = Palette(strategy for configs in configurations.values() for _, strategy, _ in configs)
    figures = []
    for (scenario, data, setting), configs in configurations.items():
        title = f"{scenario} (data {data}), {setting}-incremental"
        # File names name the data only where a scenario has runs on several.
        several = len({d for s, d, _ in configurations if s == scenario}) > 1
        stem = f"{scenario}_{data}_{setting}" if several else f"{scenario}_{setting}"
        runs_here = "scenario == @scenario and data == @data and setting == @setting"
        drawn = [  # (caption, figure, file name)
            ("average accuracy vs tasks learned (mean ± std over seeds)",
             figure_average_accuracy(configs, palette, title), "average_accuracy"),
            ("accuracy of each task over training", figure_task_curves(configs, palette, title), "task_accuracy"),
            ("accuracy matrices", figure_matrices(configs, palette, title), "matrices"),
            ("forgetting per task", figure_forgetting(configs, palette, title), "forgetting"),
            ("accuracy vs executed MACs per sample (open markers: module variants; dashed: Pareto front)",
             figure_cost(configs, palette, title, "executed_macs", "executed MACs per sample (millions)", 1e-6),
             "accuracy_vs_macs"),
            ("accuracy vs model size (open markers: module variants; dashed: Pareto front)",
             figure_cost(configs, palette, title, "model_size_bytes", "model size (MB)", 1e-6), "accuracy_vs_size"),
        ]
        if not usage.empty and not (part := usage.query(runs_here)).empty:
            drawn.append(("capacity in use (ccgn: frozen kernels; HAT: cumulative mask > 0.5)",
                          figure_capacity(part, palette, title), "capacity"))
        if not gates.empty and not (part := gates.query(runs_here)).empty:
            drawn.append(("gate usage per layer and task", figure_gate_usage(part, palette, title), "gate_usage"))
        if not confusion.empty and not (part := confusion.query(runs_here)).empty:
            drawn.append(("task confusion", figure_task_confusion(part, palette, title), "task_confusion"))
        figures += [(f"{title}: {caption}", save_png_pdf(figure, folder, f"{stem}_{name}"))
                    for caption, figure, name in drawn]
    return figures
