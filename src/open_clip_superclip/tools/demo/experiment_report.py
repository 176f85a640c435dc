"""The experiment's report: each study over seeds, as mean ± std, its differences against their spread, and
metrics against steps (experiment_report/).

A difference of two groups' means is flagged ★ when it exceeds 2 σ_Δ, σ_Δ = sqrt(s₁²/n₁ + s₂²/n₂) with s the
standard deviation over seeds (n - 1 in the denominator). With 3 seeds that estimate is itself noisy, and a table
of a dozen metrics flags about one difference in twenty by chance: read a ★ as "worth a look", not as proof.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from open_clip_superclip.atomic import staging_dir

from .._plots import figure, png_bytes
from .cells import METHODS, MODEL, STUDIES
from .data import SET_TITLES, chance_level
from .report import csv_text, final_metrics, metric_records, metric_value, pct, plot_losses, versions
from .runner import duration


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values) -> "Stat":
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return cls(math.nan, math.nan, 0)
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
        return cls(mean, std, len(values))

    def variance_of_mean(self) -> float:
        return self.std ** 2 / self.n if self.n > 1 else math.nan

    def __str__(self) -> str:
        if self.n == 0:
            return "–"
        return f"{100 * self.mean:.2f}" + ("" if math.isnan(self.std) else f" ± {100 * self.std:.2f}") + f" ({self.n})"


def difference(*terms) -> tuple:
    """(Σ sign·mean, σ of that sum) for terms (sign, Stat): σ² adds the variances of the means."""
    delta = sum(sign * stat.mean for sign, stat in terms)
    sigma = math.sqrt(sum(stat.variance_of_mean() for _, stat in terms))
    return delta, sigma


def fmt_difference(delta: float, sigma: float) -> str:
    if math.isnan(delta):
        return "–"
    if math.isnan(sigma):
        return pct(delta, signed=True)
    flag = " ★" if abs(delta) > 2 * sigma else ""
    return f"{pct(delta, signed=True)} ± {100 * sigma:.2f}{flag}"


class Results:
    """Finished cells' results, by study, method and batch."""

    def __init__(self, results: list):
        self.results = results

    def group(self, study: str, method: str, batch: int = None) -> list:
        return [r for r in self.results if r["cell"]["study"] == study and r["cell"]["method"] == method
                and (batch is None or r["cell"]["schedule"]["batch_size"] == batch)]

    def final(self, study, method, dataset, metric, batch=None) -> Stat:
        return Stat.of([metric_value(final_metrics(r), dataset, metric) for r in self.group(study, method, batch)])


def _header(columns: list) -> list:
    return ["| eval set | metric | chance | " + " | ".join(columns) + " |", "|---|---|---:|" + "---:|" * len(columns)]


def _row(data, dataset, metric, cells: list) -> str:
    return (f"| {SET_TITLES[dataset]} | {metric} | {pct(chance_level(data, dataset, metric))} | "
            + " | ".join(map(str, cells)) + " |")


def batch_tables(results: Results, data, batches: list) -> list:
    """Per batch: CLIP, SuperCLIP and their difference; then each method's drop from the largest batch to the
    smallest, and the difference of the drops (the paper's claim: SuperCLIP drops less)."""
    columns = [f"{label} b{b}" for b in batches for label in ("CLIP", "SuperCLIP", "Δ SuperCLIP − CLIP")]
    lines = ["### Final checkpoint, mean ± std over seeds (%)", "", *_header(columns)]
    for dataset, metric in data.table_rows():
        cells = []
        for batch in batches:
            clip, sup = (results.final("batch", m, dataset, metric, batch) for m in ("clip", "superclip"))
            cells += [clip, sup, fmt_difference(*difference((-1, clip), (1, sup)))]
        lines.append(_row(data, dataset, metric, cells))
    if len(batches) < 2:
        return lines
    big, small = batches[0], batches[-1]
    lines += ["", f"### Drop from batch {big} to batch {small} (points; positive: the small batch scores lower)", "",
              *_header(["CLIP drop", "SuperCLIP drop", "SuperCLIP drop − CLIP drop"])]
    for dataset, metric in data.table_rows():
        stats = {(m, b): results.final("batch", m, dataset, metric, b) for m in ("clip", "superclip")
                 for b in (big, small)}
        clip = difference((1, stats["clip", big]), (-1, stats["clip", small]))
        sup = difference((1, stats["superclip", big]), (-1, stats["superclip", small]))
        both = difference((1, stats["superclip", big]), (-1, stats["superclip", small]),
                          (-1, stats["clip", big]), (1, stats["clip", small]))
        lines.append(_row(data, dataset, metric, [fmt_difference(*clip), fmt_difference(*sup), fmt_difference(*both)]))
    return lines


def versus_table(results: Results, data, study: str, reference: str, methods: list, batch: int = None) -> list:
    """Each method's mean ± std, then its difference from the reference method."""
    labels = [METHODS[m].label for m in methods]
    columns = labels + [f"Δ {label} − {METHODS[reference].label}" for m, label in zip(methods, labels)
                        if m != reference]
    lines = _header(columns)
    for dataset, metric in data.table_rows():
        stats = {m: results.final(study, m, dataset, metric, batch) for m in methods}
        deltas = [fmt_difference(*difference((-1, stats[reference]), (1, stats[m]))) for m in methods
                  if m != reference]
        lines.append(_row(data, dataset, metric, [stats[m] for m in methods] + deltas))
    return lines


def plot_curves(results: Results, data, study: str, methods: list, batches: list) -> bytes:
    """Metrics against optimizer steps: a row per batch size, a column per metric, a line per method (mean over
    seeds, shaded ± std); dotted: chance."""
    import numpy as np
    rows = [(d, m) for d, m in data.spec.curve_rows if f"wds/{d}" in data.manifest["eval"]]
    fig = figure(3.6 * len(rows), 3.0 * len(batches))
    grid = np.atleast_2d(fig.subplots(len(batches), len(rows), squeeze=False))
    for i, batch in enumerate(batches):
        for j, (dataset, metric) in enumerate(rows):
            axes = grid[i][j]
            for colour, method in enumerate(methods):
                group = results.group(study, method, batch)
                if not group:
                    continue
                steps = [entry["step"] for entry in group[0]["epochs"]]
                values = np.array([[metric_value(e["metrics"], dataset, metric) for e in r["epochs"]]
                                   for r in group]) * 100
                mean = np.nanmean(values, axis=0)
                axes.plot(steps, mean, marker="o", markersize=3, color=f"C{colour}",
                          label=f"{METHODS[method].label} ({len(group)})")
                if len(group) > 1:
                    std = np.nanstd(values, axis=0, ddof=1)
                    axes.fill_between(steps, mean - std, mean + std, alpha=0.15, color=f"C{colour}")
            axes.axhline(100 * chance_level(data, dataset, metric), color="black", linestyle=":", linewidth=1)
            axes.set_title(f"{dataset} {metric}" + (f", batch {batch}" if batch else ""), fontsize=8)
            axes.set_xlabel("optimizer step", fontsize=7)
            axes.set_ylabel("%", fontsize=7)
            axes.tick_params(labelsize=7)
            axes.grid(alpha=0.3)
            if axes.get_legend_handles_labels()[0]:
                axes.legend(fontsize=6)
    return png_bytes(fig)


def per_seed_table(results: list, datas: dict) -> str:
    """Every finished cell's final value of every table metric (%): no seed left out."""
    lines = ["# Every seed: final-checkpoint metrics per cell (%)", ""]
    for key, data in datas.items():
        rows = data.table_rows()
        lines += [f"## {data.spec.title}", "", "| cell | " + " | ".join(f"{d} {m}" for d, m in rows) + " |",
                  "|---|" + "---:|" * len(rows)]
        for result in sorted((r for r in results if r["cell"]["dataset"] == key), key=lambda r: r["cell"]["name"]):
            values = [pct(metric_value(final_metrics(result), d, m)) for d, m in rows]
            lines.append(f"| {result['cell']['name']} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def _cells_table(cell_runs: list, by_name: dict) -> list:
    lines = ["| cell | study | method | batch | seed | state | train time |", "|---|---|---|---:|---:|---|---:|"]
    for run in cell_runs:
        cell, result = run.cell, by_name.get(run.cell.name)
        seconds = result["train_seconds"] if result else None
        lines.append(f"| {cell.name} | {cell.study} | {METHODS[cell.method].label} | {cell.schedule.batch_size} | "
                     f"{cell.seed} | {run.state()} | {duration(seconds) if seconds else '–'} |")
    return lines


def _present(cells, study: str, methods) -> list:
    there = {cell.method for cell in cells if cell.study == study}
    return [m for m in methods if m in there]


def _study_sections(mode, datas: dict, results: Results, figures: dict) -> list:
    cells, lines = mode.cells, []
    batches = sorted({c.schedule.batch_size for c in cells if c.study == "batch"}, reverse=True)
    if batches and "emoji" in datas:
        emoji = datas["emoji"]
        lines += [f"## 1. {STUDIES['batch']}", "", *batch_tables(results, emoji, batches), ""]
        ablation_batch = next((c.schedule.batch_size for c in cells if c.study == "batch"
                               and c.method.startswith("superclip-")), None)
        if ablation_batch:
            methods = _present(cells, "batch", ("superclip", "superclip-lam0.4", "superclip-lam1.6",
                                                "superclip-idfnone", "clip"))
            lines += [f"### Ablations at batch {ablation_batch} (paper: λ 0.4 / 1.0 / 1.6 and no IDF)", "",
                      *versus_table(results, emoji, "batch", "superclip", methods, ablation_batch), ""]
        figures["batch_curves.png"] = plot_curves(results, emoji, "batch", ["clip", "superclip"], batches)
        lines += ["![metrics against steps](batch_curves.png)", ""]
    if "clipart" in datas:
        clipart = datas["clipart"]
        arms = _present(cells, "dual", ("clip", "clip-long", "clip-mix", "superclip", "superclip-dual"))
        if arms:
            lines += [f"## 2. {STUDIES['dual']}", "", "Short caption = the drawing's title; long = title, "
                      "description and keywords. Differences are taken against CLIP on the short captions.", "",
                      *versus_table(results, clipart, "dual", arms[0], arms), ""]
            figures["dual_curves.png"] = plot_curves(results, clipart, "dual", arms, [None])
            lines += ["![metrics against steps](dual_curves.png)", ""]
        tuned = _present(cells, "finetune", ("clip", "superclip"))
        if tuned:
            lines += [f"## 3. {STUDIES['finetune']}", "", "Both arms start from the OpenMoji CLIP of the same seed "
                      "(no class head); the SuperCLIP arm adds a freshly initialised head.", "",
                      *versus_table(results, clipart, "finetune", tuned[0], tuned), ""]
            figures["finetune_curves.png"] = plot_curves(results, clipart, "finetune", tuned, [None])
            lines += ["![metrics against steps](finetune_curves.png)", ""]
    return lines


def write_experiment_report(out: Path, mode, datas: dict, cell_runs: list) -> None:
    finished = [run for run in cell_runs if run.state() == "finished"]
    results = [run.load_result() for run in finished]
    by_name = {r["cell"]["name"]: r for r in results}
    figures = {}
    lines = [
        f"# Experiment: where SuperCLIP helps at small scale{' (SMOKE: the numbers mean nothing)' if mode.smoke else ''}",
        "",
        f"Written by `superclip demo --experiment` (`make experiment`). {len(finished)} of {len(cell_runs)} cells "
        f"finished; rerun to resume, `--cell NAME` (glob patterns allowed) runs some cells only, `--list-cells` "
        f"shows them. Every cell: `{MODEL}` trained by the stock trainer on a CSV whose order is fixed by the "
        f"seed. Numbers are % (mean ± std over seeds, number of seeds in brackets); ★: the difference exceeds "
        f"2 σ_Δ = 2 sqrt(s₁²/n₁ + s₂²/n₂) (s: std over seeds). With 3 seeds, expect about one ★ in twenty by "
        f"chance. Every seed's numbers: [seeds.md](seeds.md); every evaluation: [metrics.csv](metrics.csv).",
        "",
        *_study_sections(mode, datas, Results(results), figures),
        "## Cells", "", *_cells_table(cell_runs, by_name), "",
        "Trainer command of each cell: RUNS/CELL/cell.json.", "", f"Versions: {versions()}.", "",
    ]
    curves = {f"{r['method']}, b{r['cell']['schedule']['batch_size']}": r["losses"] for r in results
              if r["cell"]["study"] == "batch" and r["cell"]["seed"] == min(c.seed for c in mode.cells)}
    with staging_dir(out) as staging:
        (staging / "README.md").write_text("\n".join(lines), encoding="utf-8")
        (staging / "seeds.md").write_text(per_seed_table(results, datas), encoding="utf-8")
        (staging / "metrics.csv").write_text(csv_text(metric_records(by_name)), encoding="utf-8")
        (staging / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        for name, png in figures.items():
            (staging / name).write_bytes(png)
        if curves:
            (staging / "loss_curves.png").write_bytes(plot_losses(curves))
