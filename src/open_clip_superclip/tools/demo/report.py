"""The demo's report: one seed of CLIP and SuperCLIP side by side, with the word ranking (demo_report/)."""
from __future__ import annotations

import csv
import io
import json
import math
import shlex
import shutil
import time
from pathlib import Path

from open_clip_superclip.atomic import staging_dir

from .._plots import figure, png_bytes
from .cells import MODEL
from .data import SET_TITLES, chance_level
from .runner import cpu_seconds, duration

WORD_TEMPLATE = "an emoji of {}"
ATTRIBUTE_WORDS = ("skin", "tone", "light", "medium", "dark", "man", "woman", "person")


def final_metrics(result: dict) -> dict:
    return result["epochs"][-1]["metrics"]


def metric_value(metrics: dict, dataset: str, metric: str) -> float:
    value = (metrics.get(dataset) or {}).get(metric)
    return math.nan if value is None else float(value)


def pct(value: float, signed=False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def demo_table(data, clip: dict, superclip: dict) -> tuple:
    """The markdown table (percent) and its rows as records."""
    records = []
    lines = ["| eval set | metric | chance | CLIP | SuperCLIP | Δ SuperCLIP − CLIP | CLIP ÷ chance |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for dataset, metric in data.table_rows():
        chance = chance_level(data, dataset, metric)
        a = metric_value(final_metrics(clip), dataset, metric)
        b = metric_value(final_metrics(superclip), dataset, metric)
        records.append({"dataset": dataset, "metric": metric, "chance": chance, "clip": a, "superclip": b,
                        "delta": b - a})
        ratio = "n/a" if math.isnan(a) else f"{a / chance:.1f}×"
        lines.append(f"| {SET_TITLES[dataset]} (`{dataset}`) | {metric} | {pct(chance)} | {pct(a)} | "
                     f"{pct(b)} | {pct(b - a, signed=True)} | {ratio} |")
    return "\n".join(lines), records


def plot_losses(curves: dict) -> bytes:
    """curves: label -> parsed train log. Contrastive loss of every run; class loss where there is one."""
    fig = figure(11, 4)
    left, right = fig.subplots(1, 2)
    for colour, (label, log) in enumerate(curves.items()):
        steps = [entry["step"] for entry in log]
        left.plot(steps, [entry.get("contrastive_loss", math.nan) for entry in log], label=label, color=f"C{colour}")
        if any("class_loss" in entry for entry in log):
            right.plot(steps, [entry.get("class_loss", math.nan) for entry in log], label=label,
                       color=f"C{colour}")
    left.set(title="contrastive loss (per logged step)", xlabel="optimizer step", ylabel="loss")
    right.set(title="class loss (SuperCLIP runs)", xlabel="optimizer step")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    return png_bytes(fig)


def plot_metric_bars(records: list) -> bytes:
    """Horizontal bars per table row, CLIP and SuperCLIP; chance as a black tick."""
    import numpy as np
    fig = figure(8, 0.45 * len(records) + 1.2)
    axes = fig.subplots()
    rows = np.arange(len(records))
    for k, (label, key) in enumerate((("CLIP", "clip"), ("SuperCLIP", "superclip"))):
        axes.barh(rows + (k - 0.5) * 0.4, [100 * record[key] for record in records], 0.4, label=label,
                  color=f"C{k}")
    axes.scatter([100 * record["chance"] for record in records], rows, marker="|", s=300, color="black",
                 label="chance", zorder=3)
    axes.set_yticks(rows)
    axes.set_yticklabels([f"{r['dataset']}\n{r['metric']}" for r in records], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("%")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    axes.set_title("held-out concepts: CLIP Benchmark metrics")
    return png_bytes(fig)


def _word_rows(words_csv: Path) -> list:
    with open(words_csv, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def attribute_word_ranks(words_csv: Path) -> tuple:
    rows = {row["word"]: row for row in _word_rows(words_csv)}
    ranks = [(word, int(rows[word]["rank_1"]), int(rows[word]["rank_2"])) for word in ATTRIBUTE_WORDS if word in rows]
    return len(rows), ranks


def top_words(words_csv: Path, column: str, count: int = 20) -> list:
    return [row["word"] for row in sorted(_word_rows(words_csv), key=lambda row: int(row[column]))[:count]]


def versions() -> str:
    from importlib import metadata
    found = []
    for name in ("torch", "open_clip_torch", "clip_benchmark", "open_clip_superclip"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def metric_records(results: dict) -> list:
    """Every metric clip_benchmark wrote, per run and evaluated epoch."""
    rows = []
    for label, result in results.items():
        for entry in result["epochs"]:
            for dataset, metrics in entry["metrics"].items():
                for metric, value in (metrics or {}).items():
                    rows.append({"run": label, "cell": result["cell"]["name"], "epoch": entry["epoch"],
                                 "step": entry["step"], "dataset": dataset, "metric": metric, "value": value})
    return rows


def csv_text(rows: list) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _intro(mode, data, clip: dict, smoke: bool) -> list:
    counts, schedule = data.manifest["counts"], mode.cells[0].schedule
    return [
        "# CLIP vs SuperCLIP on OpenMoji" + (" (SMOKE run: a few steps on a subset; the numbers mean nothing)"
                                              if smoke else ""),
        "",
        f"Written by `superclip demo{' --smoke 1' if smoke else ''}` (`make demo`). Two runs of the stock open_clip "
        f"trainer on the OpenMoji emoji data (`superclip demo-data`, see docs/demo_data.md): "
        f"{counts['train_samples']} training samples from {counts['train_emoji']} emoji, evaluated with "
        f"`clip_benchmark eval` on {counts['heldout_emoji']} emoji of {counts['concepts_heldout']} held-out concepts "
        f"(no skin-tone, gender or direction variant of them was trained on).",
        "",
        f"Both runs: `{MODEL}`, seed {mode.cells[0].seed}, batch {schedule.batch_size}, {clip['epochs'][-1]['step']} "
        f"steps ({schedule.epochs} epoch(s) of {schedule.samples_per_epoch or data.num_train} samples), lr "
        f"{schedule.lr:g} cosine with {schedule.warmup:.0%} warmup, weight decay {schedule.wd:g}. The only "
        f"difference: `--superclip-lambda 0` (CLIP: no class head) vs `--superclip-lambda 1` (SuperCLIP).",
    ]


def _metrics_section(data, table: str, records: list) -> list:
    above = sum(1 for r in records if r["clip"] > r["chance"])
    twice = sum(1 for r in records if r["clip"] >= 2 * r["chance"])
    return [
        "## Metrics (%, final checkpoint)", "", table, "",
        f"CLIP beats chance on {above} of {len(records)} metrics, by 2× or more on {twice}. Chance: k/C for top-k "
        f"over C classes, 1/C for mean per-class recall, k/N for image retrieval over N images, "
        f"1 − C(T−m, k)/C(T, k) for text retrieval (m = {len(data.manifest['caption_templates'])} right captions "
        f"among T). One seed: on the probes (a few hundred images) a few points are within run-to-run noise; "
        f"`make experiment` measures it over seeds (docs/experiments.md).",
        "", "![metrics](metrics.png)", "", "## Training curves", "", "![losses](loss_curves.png)", "",
        "| run | steps | final contrastive loss | final class loss | train time |", "|---|---:|---:|---:|---:|",
    ]


def _loss_rows(clip: dict, superclip: dict) -> list:
    lines = []
    for label, result in (("CLIP", clip), ("SuperCLIP", superclip)):
        last = result["losses"][-1] if result["losses"] else {}
        losses = [f"{last[key]:.4f}" if key in last else "–" for key in ("contrastive_loss", "class_loss")]
        lines.append(f"| {label} | {last.get('step', '–')} | {' | '.join(losses)} | "
                     f"{duration(result['train_seconds'])} |")
    return lines


def _words_section(data, words: Path) -> list:
    word_count, ranks = attribute_word_ranks(words / "word_ranking.csv")
    top_clip, top_super = (top_words(words / "word_ranking.csv", column) for column in ("rank_1", "rank_2"))
    return [
        "", "## Word-image similarity (paper appendix A.4)", "",
        f"`superclip words`: each of the {word_count} words of the emoji names, in the prompt "
        f"\"{WORD_TEMPLATE.format('…')}\", ranked by its mean cosine similarity to the held-out images "
        f"(`{data.word_images}`). Model 1 = CLIP, model 2 = SuperCLIP. Full ranking: "
        f"[word_ranking.csv](word_ranking.csv), printed report: [word_ranking.txt](word_ranking.txt).",
        "", "![word ranks](word_ranking.png)", "", "| word | rank under CLIP | rank under SuperCLIP |", "|---|---:|---:|",
        *[f"| {word} | {a} | {b} |" for word, a, b in ranks], "",
        "Top 20 words — CLIP: " + ", ".join(top_clip), "", "Top 20 words — SuperCLIP: " + ", ".join(top_super),
    ]


def _how_section(data, runs: dict, runtime, stages, reused: list) -> list:
    lines = ["", "## How this was run", "", "Trainer commands (the stock open_clip trainer with this package's flags):",
             "", "```", *[" ".join(shlex.quote(a) for a in ["python", *run.argv[1:]]) for run in runs.values()],
             "```", "",
             f"Device: {runtime.device}, precision {runtime.precision}, {runtime.threads} thread(s) per process, "
             f"{runtime.workers} data worker(s); {runtime.cores} CPU core(s) available.", "",
             f"Evaluation: `clip_benchmark eval --model {MODEL} --pretrained CKPT --dataset "
             f"{' '.join(data.eval_sets('zeroshot_classification'))} --dataset_root '{data.root}/eval/{{dataset}}' "
             f"--task zeroshot_classification` and the same with `--dataset wds/emoji_retrieval --task "
             f"zeroshot_retrieval --recall_k 1 5 10`; raw results in [metrics.csv](metrics.csv).", "",
             f"Versions: {versions()}.", ""]
    if reused:
        lines += [f"Reused from an earlier run with the same commands: {', '.join(reused)} (their training and "
                  f"evaluation times are those of that run; `--retrain` trains again).", ""]
    lines += ["| stage | wall time | CPU time (all processes) |", "|---|---:|---:|",
              *[f"| {name} | {duration(seconds)} | {duration(cpu)} |" for name, seconds, cpu in stages.timings],
              f"| total (until the report) | {duration(time.monotonic() - stages.start)} | "
              f"{duration(cpu_seconds() - stages.start_cpu)} |", ""]
    return lines


def write_demo_report(out: Path, mode, data, runs: dict, results: dict, words: Path, runtime, stages,
                      reused: list) -> None:
    clip, superclip = results["clip"], results["superclip"]
    table, records = demo_table(data, clip, superclip)
    lines = [*_intro(mode, data, clip, mode.smoke), "", *_metrics_section(data, table, records),
             *_loss_rows(clip, superclip), *_words_section(data, words), *_how_section(data, runs, runtime, stages,
                                                                                      reused)]
    steps = clip["epochs"][-1]["step"]
    with staging_dir(out) as staging:
        (staging / "README.md").write_text("\n".join(lines), encoding="utf-8")
        (staging / "metrics.csv").write_text(csv_text(metric_records({"CLIP": clip, "SuperCLIP": superclip})),
                                             encoding="utf-8")
        (staging / "summary.json").write_text(json.dumps({"table": records, "steps": steps}, indent=1),
                                              encoding="utf-8")
        (staging / "metrics.png").write_bytes(plot_metric_bars(records))
        (staging / "loss_curves.png").write_bytes(plot_losses({"CLIP": clip["losses"],
                                                               "SuperCLIP": superclip["losses"]}))
        shutil.copyfile(words / "word_ranking.png", staging / "word_ranking.png")
        shutil.copyfile(words / "word_ranking.csv", staging / "word_ranking.csv")
        shutil.copyfile(words / "report.txt", staging / "word_ranking.txt")
