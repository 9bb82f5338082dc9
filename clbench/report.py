"""`clbench report`: the tables and figures of a set of finished runs, mean ± std over
seeds, written as CSV, Markdown, LaTeX, PNG, PDF and one self-contained HTML page.

Every figure gives each strategy the same colour (Okabe-Ito, a colour-blind-safe
palette; marker and line style tell apart strategies that share a colour)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from clbench.errors import UserError  # noqa: E402
from clbench.plots import percent_heatmap  # noqa: E402
from clbench.results import RUN_KEYS, final_metrics, load_finished_runs, load_metrics, summarise_runs  # noqa: E402

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<"]  # not a multiple of 8: colour repeats get new markers
LINESTYLES = ["-", "--", ":", "-."]
TABLE_METRICS = {
    "average_accuracy": "accuracy", "average_forgetting": "forgetting", "backward_transfer": "BWT",
    "forward_transfer": "FWT", "task_aware_average_accuracy": "task-aware acc.",
    "task_inference_average_accuracy": "task-inference acc.", "executed_macs": "MACs/sample",
    "stored_examples": "stored examples", "parameters": "parameters", "model_size_bytes": "size (MB)",
    "train_time_s": "train time (s)", "nonfinite_loss_iterations": "non-finite losses",
}
COUNTS = ("stored_examples", "parameters", "nonfinite_loss_iterations")
SHOWN_IF_NONZERO = ("nonfinite_loss_iterations",)  # a diverged run


def format_mean_std(mean: float, std: float, metric: str) -> str:
    """'0.912 ± 0.004'; MACs in millions, sizes in MB, counts and seconds as integers;
    empty where the metric does not apply."""
    if mean != mean:
        return ""
    if metric in COUNTS:
        return f"{mean:,.0f}"
    scale, digits, unit = {"executed_macs": (1e-6, 3, "M"), "model_size_bytes": (1e-6, 2, ""),
                           "train_time_s": (1, 0, "")}.get(metric, (1, 3, ""))
    mean, std = mean * scale, std * scale
    if std != std or std == 0 and metric in ("executed_macs", "model_size_bytes"):
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}{unit}"


def varying_hparams(frame: pd.DataFrame) -> pd.Series:
    """True where other rows of the same strategy have different hyperparameters."""
    return frame.groupby("strategy").hparams.transform("nunique") > 1


def with_labels(metrics: pd.DataFrame) -> pd.DataFrame:
    """Adds each configuration's name in figures: the strategy, with its hyperparameters
    when other runs of the strategy use different ones."""
    named = metrics.strategy + " (" + metrics.hparams + ")"
    return metrics.assign(label=named.where(varying_hparams(metrics), metrics.strategy))


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of a `summarise_runs` table: keys, seeds, then each
    metric as 'mean ± std'."""
    shown = summary[["scenario", "setting", "strategy", "epochs", "seeds"]].copy()
    varying = varying_hparams(summary)
    if varying.any():
        shown.insert(3, "hparams", summary.hparams.where(varying, ""))
    for metric, title in TABLE_METRICS.items():
        values = summary.get(f"{metric}_mean", pd.Series(dtype=float))
        if values.notna().any() and (metric not in SHOWN_IF_NONZERO or (values > 0).any()):
            shown[title] = [format_mean_std(m, s, metric)
                            for m, s in zip(summary[f"{metric}_mean"], summary[f"{metric}_std"])]
    return shown


class Palette:
    """A fixed style per strategy name, shared by every figure of a report."""

    def __init__(self, strategies):
        self.index = {name: i for i, name in enumerate(sorted(set(strategies)))}

    def __call__(self, strategy: str) -> dict:
        i = self.index[strategy]
        return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)],
                "linestyle": LINESTYLES[(i // len(OKABE_ITO)) % len(LINESTYLES)]}


def configurations(metrics: pd.DataFrame):
    """(scenario, setting) -> list of (label, strategy, that configuration's metrics)."""
    groups = {}
    for keys, frame in metrics.groupby(RUN_KEYS, sort=True):
        row = dict(zip(RUN_KEYS, keys))
        groups.setdefault((row["scenario"], row["setting"]), []).append((frame.label.iloc[0], row["strategy"], frame))
    return groups


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


def figure_cost(configs, palette, title, metric, xlabel, scale):
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, strategy, frame in configs:
        final = frame[frame.task.isna() & (frame.step == frame.step.max())]
        accuracy = final[final.metric == "average_accuracy"].value
        cost = final[final.metric == metric].value * scale
        if cost.empty:
            continue
        style = palette(strategy)
        ax.errorbar(cost.mean(), 100 * accuracy.mean(), xerr=cost.std() if len(cost) > 1 else None,
                    yerr=100 * accuracy.std() if len(accuracy) > 1 else None, color=style["color"],
                    marker=style["marker"], markersize=8, capsize=3, label=name, linestyle="none")
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


def run_tables(metrics: pd.DataFrame, name: str) -> pd.DataFrame:
    """A per-run table saved by a strategy (e.g. kernel_usage.csv) for every run that has it."""
    frames = [pd.read_csv(Path(row.run_dir) / f"{name}.csv").assign(
                  run_dir=row.run_dir, strategy=row.strategy, scenario=row.scenario, setting=row.setting,
                  label=row.label)
              for row in metrics.drop_duplicates("run_dir").itertuples()
              if (Path(row.run_dir) / f"{name}.csv").exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def save(fig, folder: Path, name: str) -> Path:
    fig.tight_layout()
    for suffix in ("png", "pdf"):
        fig.savefig(folder / f"{name}.{suffix}", dpi=130)
    plt.close(fig)
    return folder / f"{name}.png"


def make_figures(metrics: pd.DataFrame, folder: Path) -> list[tuple[str, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    metrics = with_labels(metrics)
    palette = Palette(metrics.strategy)
    usage, gates = run_tables(metrics, "kernel_usage"), run_tables(metrics, "gate_usage")
    figures = []
    for (scenario, setting), configs in configurations(metrics).items():
        title = f"{scenario}, {setting}-incremental"
        stem = f"{scenario}_{setting}"
        figures += [
            (f"{title}: average accuracy vs tasks learned (mean ± std over seeds)",
             save(figure_average_accuracy(configs, palette, title), folder, f"{stem}_average_accuracy")),
            (f"{title}: accuracy of each task over training",
             save(figure_task_curves(configs, palette, title), folder, f"{stem}_task_accuracy")),
            (f"{title}: accuracy matrices", save(figure_matrices(configs, palette, title), folder, f"{stem}_matrices")),
            (f"{title}: forgetting per task", save(figure_forgetting(configs, palette, title), folder, f"{stem}_forgetting")),
            (f"{title}: accuracy vs executed MACs per sample",
             save(figure_cost(configs, palette, title, "executed_macs", "executed MACs per sample (millions)", 1e-6),
                  folder, f"{stem}_accuracy_vs_macs")),
            (f"{title}: accuracy vs model size",
             save(figure_cost(configs, palette, title, "model_size_bytes", "model size (MB)", 1e-6),
                  folder, f"{stem}_accuracy_vs_size")),
        ]
        if not usage.empty and not (part := usage.query("scenario == @scenario and setting == @setting")).empty:
            figures.append((f"{title}: capacity in use (ccgn: frozen kernels; HAT: cumulative mask > 0.5)",
                            save(figure_capacity(part, palette, title), folder, f"{stem}_capacity")))
        if not gates.empty and not (part := gates.query("scenario == @scenario and setting == @setting")).empty:
            figures.append((f"{title}: gate usage per layer and task",
                            save(figure_gate_usage(part, palette, title), folder, f"{stem}_gate_usage")))
    return figures


def compare(runs_a: pd.DataFrame, runs_b: pd.DataFrame) -> pd.DataFrame:
    """Per configuration in both and metric: mean in A and B, the difference B - A, and a
    flag where it exceeds the seed-to-seed spread (the larger of the two stds; with a
    single seed on either side the spread is unknown and nothing is flagged)."""
    a, b = summarise_runs(runs_a), summarise_runs(runs_b)
    both = a.merge(b, on=RUN_KEYS, suffixes=("_a", "_b"))
    rows = []
    for _, row in both.iterrows():
        for metric in TABLE_METRICS:
            if f"{metric}_mean_a" not in row or f"{metric}_mean_b" not in row:
                continue
            mean_a, mean_b = row[f"{metric}_mean_a"], row[f"{metric}_mean_b"]
            if mean_a != mean_a or mean_b != mean_b:
                continue
            spread = max(row[f"{metric}_std_a"], row[f"{metric}_std_b"])
            difference = mean_b - mean_a
            rows.append({**{k: row[k] for k in RUN_KEYS}, "metric": metric, "mean_a": mean_a, "mean_b": mean_b,
                         "difference": difference, "spread": spread,
                         "exceeds_spread": bool(abs(difference) > spread) if spread == spread else None})
    return pd.DataFrame(rows)


def embedded_image(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def html_page(results_dir: str, summary: pd.DataFrame, figures, unfinished, comparison: pd.DataFrame | None) -> str:
    parts = [f"<h1>clbench report: {html.escape(results_dir)}</h1>",
             "<p>Final metrics, mean ± std over seeds (the <i>seeds</i> column gives how many).</p>",
             summary.to_html(index=False, border=0, classes="table", escape=True)]
    if comparison is not None and not comparison.empty:
        parts += ["<h2>Comparison (B − A)</h2>",
                  "<p>Flagged where the difference exceeds the larger seed-to-seed std.</p>",
                  comparison.to_html(index=False, border=0, classes="table", float_format="%.4f")]
    parts.append("<h2>Figures</h2>")
    for caption, path in figures:
        parts.append(f'<figure><img src="{embedded_image(path)}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if unfinished:
        parts += ["<h2>Unfinished runs (left out)</h2><ul>"] + \
                 [f"<li>{html.escape(str(p))}</li>" for p in unfinished] + ["</ul>"]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             ".table{border-collapse:collapse;font-size:13px}.table td,.table th{padding:3px 8px;"
             "border-bottom:1px solid #ddd;text-align:right}figure{margin:1.5em 0}img{max-width:100%}"
             "figcaption{font-size:13px;color:#444}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>clbench report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(results_dir: str, output: Path, compare_with: str | None = None) -> tuple[Path, list[Path]]:
    """Write the report of the finished runs under `results_dir` into `output`; returns
    the HTML page and the unfinished runs that were left out."""
    metrics, unfinished = load_metrics(results_dir)
    if metrics.empty:
        raise UserError(f"no finished runs under {results_dir}")
    runs = final_metrics(metrics)
    output.mkdir(parents=True, exist_ok=True)
    numbers = summarise_runs(runs)
    numbers.to_csv(output / "summary_numbers.csv", index=False)
    summary = summary_table(numbers)
    summary.to_csv(output / "summary.csv", index=False)
    (output / "summary.md").write_text(summary.to_markdown(index=False, disable_numparse=True) + "\n")
    (output / "summary.tex").write_text(summary.to_latex(index=False).replace("±", r"$\pm$"))
    comparison = None
    if compare_with:
        other, _ = load_finished_runs(compare_with)
        if other.empty:
            raise UserError(f"no finished runs under {compare_with} to compare with")
        comparison = compare(other, runs)
        comparison.to_csv(output / "comparison.csv", index=False)
        (output / "comparison.md").write_text(comparison.to_markdown(index=False, floatfmt=".4f") + "\n")
    figures = make_figures(metrics, output / "figures")
    page = output / "report.html"
    page.write_text(html_page(results_dir, summary, figures, unfinished, comparison))
    return page, unfinished
