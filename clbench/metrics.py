"""Continual-learning metrics as pure functions of an accuracy matrix.

R[i, j] is the accuracy on task j after training task i (0-based here, T x T, every
task evaluated after every task). `init[j]` is the accuracy of the untrained model on
task j, needed for forward transfer. Undefined values (e.g. forgetting after one task)
are NaN.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def average_accuracy(R: np.ndarray) -> float:
    """Mean accuracy over all tasks after the last one (ACC)."""
    return float(np.mean(R[-1]))


def forgetting_per_task(R: np.ndarray) -> np.ndarray:
    """Chaudhry et al. 2018: for each task j < T-1, the best accuracy it ever had before
    the last step minus its accuracy after the last step; NaN for the last task."""
    T = len(R)
    out = np.full(T, np.nan)
    for j in range(T - 1):
        out[j] = np.max(R[j:T - 1, j]) - R[T - 1, j]
    return out


def average_forgetting(R: np.ndarray) -> float:
    per_task = forgetting_per_task(R)[:-1]
    return float(np.mean(per_task)) if len(per_task) else float("nan")


def backward_transfer(R: np.ndarray) -> float:
    """Lopez-Paz and Ranzato 2017: mean over j < T-1 of R[T-1, j] - R[j, j]."""
    T = len(R)
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)])) if T > 1 else float("nan")


def forward_transfer(R: np.ndarray, init: np.ndarray) -> float:
    """Lopez-Paz and Ranzato 2017: mean over j >= 1 of R[j-1, j] - init[j]."""
    T = len(R)
    return float(np.mean([R[j - 1, j] - init[j] for j in range(1, T)])) if T > 1 else float("nan")


def tidy_metrics(R: np.ndarray, init: np.ndarray, prefix: str = "") -> pd.DataFrame:
    """Long table (metric, step, task, value) of every metric after every step.

    Steps and tasks are 1-based; step 0 is the untrained model. Metrics after step s
    use the leading s x s block of R. `prefix` names a variant (e.g. "task_aware_").
    """
    T = len(R)
    rows = [(f"{prefix}accuracy", 0, j + 1, init[j]) for j in range(T)]
    for s in range(1, T + 1):
        block = R[:s, :s]
        rows += [(f"{prefix}accuracy", s, j + 1, R[s - 1, j]) for j in range(T)]
        rows.append((f"{prefix}average_accuracy", s, None, average_accuracy(block)))
        rows += [(f"{prefix}forgetting", s, j + 1, f) for j, f in enumerate(forgetting_per_task(block)[:-1])]
        rows.append((f"{prefix}average_forgetting", s, None, average_forgetting(block)))
        rows.append((f"{prefix}backward_transfer", s, None, backward_transfer(block)))
        rows.append((f"{prefix}forward_transfer", s, None, forward_transfer(block, init)))
    table = pd.DataFrame(rows, columns=["metric", "step", "task", "value"]).astype({"task": "Int64"})
    return table.dropna(subset=["value"]).reset_index(drop=True)
