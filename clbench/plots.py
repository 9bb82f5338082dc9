"""Per-run figures (PNG): the accuracy matrix as a heatmap, per-task accuracy curves, and
figures of the extra tables some strategies save (gate and kernel usage)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


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


# Figures for the extra tables a strategy saves (`artifacts()`), by table name.
ARTIFACT_PLOTS = {"gate_usage": gate_usage_heatmap, "kernel_usage": kernel_usage_heatmap}
