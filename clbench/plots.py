"""Per-run figures (PNG): the accuracy matrix as a heatmap and per-task accuracy curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_heatmap(matrix: np.ndarray, task_classes: list[list[int]], title: str, path: Path) -> None:
    T = len(matrix)
    fig, ax = plt.subplots(figsize=(1.1 * T + 2.5, 1.0 * T + 1.8))
    image = ax.imshow(100 * matrix, vmin=0, vmax=100, cmap="viridis")
    for i in range(T):
        for j in range(matrix.shape[1]):
            value = 100 * matrix[i, j]
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=9,
                    color="black" if value > 60 else "white")
    labels = [f"{j + 1}\n({','.join(map(str, c))})" for j, c in enumerate(task_classes)]
    ax.set_xticks(range(matrix.shape[1]), labels)
    ax.set_yticks(range(T), [str(i + 1) for i in range(T)])
    ax.set_xlabel("evaluated on task (classes)")
    ax.set_ylabel("after training task")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


# Figures for the extra tables a strategy saves (`artifacts()`), by table name.
ARTIFACT_PLOTS = {}
