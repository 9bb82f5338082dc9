"""`clbench report`: the tables of a set of finished runs, mean ± std over seeds, written
as CSV, Markdown and LaTeX, with the figures of `clbench.plots`, all in one
self-contained HTML page; and the comparison of two sets of runs."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from clbench.errors import UserError
from clbench.plots import make_figures
from clbench.results import (
    RUN_KEYS,
    distinguishing,
    final_metrics,
    load_finished_runs,
    load_metrics,
    run_tables,
    summarise_runs,
    with_labels,
)

TABLE_METRICS = {
    "average_accuracy": "accuracy", "average_forgetting": "forgetting", "backward_transfer": "BWT",
    "forward_transfer": "FWT", "task_aware_average_accuracy": "task-aware acc.",
    "task_inference_average_accuracy": "task-inference acc.", "executed_macs": "MACs/sample",
    "stored_examples": "stored examples", "parameters": "parameters", "model_size_bytes": "size (MB)",
    "train_time_s": "train time (s)", "nonfinite_loss_iterations": "non-finite losses",
    "model_size_bits": "size (Mbit)", "sparsity": "sparsity",  # of module variants
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
                           "model_size_bits": (1e-6, 3, ""), "train_time_s": (1, 0, "")}.get(metric, (1, 3, ""))
    mean, std = round(mean * scale, digits) + 0.0, std * scale  # + 0.0: no '-0.000'
    if std != std or std == 0 and metric in ("executed_macs", "model_size_bytes", "model_size_bits"):
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}{unit}"


def key_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Scenario, setting and strategy, and each other key in which rows of a strategy
    differ (blank where they do not)."""
    shown = frame[["scenario", "setting", "strategy"]].copy()
    for key in RUN_KEYS:
        if key not in shown and (text := distinguishing(frame, key)).ne("").any():
            shown[key] = text
    return shown


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of a `summarise_runs` table: keys, runs, then each
    metric as 'mean ± std', the module variants' last ('accuracy @w4a4_per_tensor')."""
    shown = key_columns(summary).assign(runs=summary.runs)
    variant_metrics = [c.removesuffix("_mean") for c in summary.columns if "@" in c and c.endswith("_mean")]
    for metric in [*TABLE_METRICS, *variant_metrics]:
        values = summary.get(f"{metric}_mean", pd.Series(dtype=float))
        base, at, variant = metric.partition("@")
        if values.notna().any() and (metric not in SHOWN_IF_NONZERO or (values > 0).any()):
            shown[f"{TABLE_METRICS[base]} {at}{variant}".strip()] = [
                format_mean_std(m, s, base) for m, s in zip(summary[f"{metric}_mean"], summary[f"{metric}_std"])]
    return shown


def variants_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration and module variant of a `summarise_runs` table (the
    trained model first, its variant blank): accuracy, forgetting, size in Mbit and
    sparsity, 'mean ± std'; empty where no run has a variant."""
    variants = sorted({c.removeprefix("average_accuracy@").removesuffix("_mean") for c in summary.columns
                       if c.startswith("average_accuracy@") and c.endswith("_mean")})
    if not variants:
        return pd.DataFrame()

    def column(name: str) -> pd.Series:
        return summary[name] if name in summary else pd.Series(np.nan, index=summary.index)

    keys = key_columns(summary).assign(runs=summary.runs)
    rows = []
    for variant in ["", *variants]:
        at = f"@{variant}" if variant else ""
        shown = keys.assign(variant=variant)
        for metric, name in (("average_accuracy", "accuracy"), ("average_forgetting", "forgetting"),
                             ("model_size_bits", "size (Mbit)"), ("sparsity", "sparsity")):
            means, stds = column(metric + at + "_mean"), column(metric + at + "_std")
            if metric == "model_size_bits" and not variant:  # the trained model's size is in bytes
                means, stds = 8 * column("model_size_bytes_mean"), 8 * column("model_size_bytes_std")
            shown[name] = [format_mean_std(m, s, metric) for m, s in zip(means, stds)]
        rows.append(shown[column("average_accuracy" + at + "_mean").notna()])
    return pd.concat(rows).sort_index(kind="stable").reset_index(drop=True)


def configurations(metrics: pd.DataFrame):
    """(scenario, data, setting) -> list of (label, strategy, that configuration's metrics)."""
    groups = {}
    for keys, frame in metrics.groupby(RUN_KEYS, sort=True):
        row = dict(zip(RUN_KEYS, keys))
        groups.setdefault((row["scenario"], row["data"], row["setting"]), []).append(
            (frame.label.iloc[0], row["strategy"], frame))
    return groups


def compare(runs_a: pd.DataFrame, runs_b: pd.DataFrame) -> pd.DataFrame:
    """Per configuration in both and metric: mean in A and B, the difference B - A, and a
    flag where it exceeds the seed-to-seed spread (the larger of the two stds; with a
    single run on either side the spread is unknown and nothing is flagged)."""
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
            spread = np.maximum(row[f"{metric}_std_a"], row[f"{metric}_std_b"])  # NaN if either is
            difference = mean_b - mean_a
            rows.append({**{k: row[k] for k in RUN_KEYS}, "metric": metric, "mean_a": mean_a, "mean_b": mean_b,
                         "difference": difference, "spread": spread,
                         "exceeds_spread": bool(abs(difference) > spread) if spread == spread else None})
    return pd.DataFrame(rows, columns=[*RUN_KEYS, "metric", "mean_a", "mean_b", "difference", "spread",
                                       "exceeds_spread"])


def shown_comparison(comparison: pd.DataFrame) -> pd.DataFrame:
    """A `compare` table with its keys as the summary shows them."""
    return pd.concat([key_columns(comparison), comparison.drop(columns=RUN_KEYS)], axis=1)


def embedded_image(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def html_page(results_dir: str, summary: pd.DataFrame, figures, left_out, comparison: pd.DataFrame | None,
              variants: pd.DataFrame) -> str:
    parts = [f"<h1>clbench report: {html.escape(results_dir)}</h1>",
             "<p>Final metrics, mean ± std over seeds (the <i>runs</i> column gives how many).</p>",
             summary.to_html(index=False, border=0, classes="table", escape=True)]
    if not variants.empty:
        parts += ["<h2>Module variants</h2>", "<p>Each trained model (blank variant) and its module variants.</p>",
                  variants.to_html(index=False, border=0, classes="table", escape=True)]
    if comparison is not None and not comparison.empty:
        parts += ["<h2>Comparison (B − A)</h2>",
                  ("<p>Flagged where the difference exceeds the larger seed-to-seed std (never where either "
                   "side has a single run).</p>"),
                  shown_comparison(comparison).to_html(index=False, border=0, classes="table", float_format="%.4f")]
    parts.append("<h2>Figures</h2>")
    for caption, path in figures:
        parts.append(f'<figure><img src="{embedded_image(path)}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if left_out:
        parts += ["<h2>Runs left out</h2><ul>"] + \
                 [f"<li>{html.escape(str(path))}: {html.escape(why)}</li>" for path, why in left_out] + ["</ul>"]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             ".table{border-collapse:collapse;font-size:13px}.table td,.table th{padding:3px 8px;"
             "border-bottom:1px solid #ddd;text-align:right}figure{margin:1.5em 0}img{max-width:100%}"
             "figcaption{font-size:13px;color:#444}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>clbench report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(results_dirs: list[str], output: Path, compare_with: str | None = None) -> tuple[Path, list[Path]]:
    """Write the report of the finished runs under the `results_dirs` into `output`;
    returns the HTML page and the runs that were left out (unfinished or damaged), with
    why."""
    metrics, left_out = load_metrics(*results_dirs)
    if metrics.empty:
        raise UserError(f"no finished runs under {', '.join(results_dirs)}")
    runs = final_metrics(metrics)
    output.mkdir(parents=True, exist_ok=True)
    numbers = summarise_runs(runs)
    numbers.to_csv(output / "summary_numbers.csv", index=False)
    summary = summary_table(numbers)
    summary.to_csv(output / "summary.csv", index=False)
    (output / "summary.md").write_text(summary.to_markdown(index=False, disable_numparse=True) + "\n")
    (output / "summary.tex").write_text(summary.to_latex(index=False).replace("±", r"$\pm$"))
    variants = variants_table(numbers)
    if not variants.empty:
        variants.to_csv(output / "variants.csv", index=False)
        (output / "variants.md").write_text(variants.to_markdown(index=False, disable_numparse=True) + "\n")
    comparison = None
    if compare_with:
        other, _ = load_finished_runs(compare_with)
        if other.empty:
            raise UserError(f"no finished runs under {compare_with} to compare with")
        comparison = compare(other, runs)
        comparison.to_csv(output / "comparison.csv", index=False)
        (output / "comparison.md").write_text(shown_comparison(comparison).to_markdown(index=False, floatfmt=".4f") + "\n")
    labelled = with_labels(metrics)
    figures = make_figures(configurations(labelled), run_tables(labelled, "kernel_usage"),
                           run_tables(labelled, "gate_usage"), run_tables(labelled, "task_confusion"),
                           output / "figures")
    page = output / "report.html"
    page.write_text(html_page(", ".join(results_dirs), summary, figures, left_out, comparison, variants))
    return page, left_out
