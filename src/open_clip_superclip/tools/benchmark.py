"""`superclip benchmark`: a suite of local webdataset evaluations, run by CLIP Benchmark over checkpoints.

Each evaluation is clip_benchmark's own ``eval`` command (its CLI entry point, with the arguments one would type),
run in one worker process per model: a single interpreter start per model instead of per dataset, while a
dataset that fails (an exception, or clip_benchmark exiting) is recorded and the next one runs; a worker that
dies outright (out of memory, a crash in native code) is restarted after the run that killed it.

Writes OUT/results.csv and OUT/results.md (one row per model x dataset x metric; a failed run is one row with
its error), OUT/results.png (grouped bars), and per run clip_benchmark's JSON and a log under OUT/runs/.

Suite file (YAML)::

    datasets:                    # folders in clip_benchmark's wds layout (`superclip make-wds` writes them)
      - root: data/emoji-cls     # relative paths start at the suite file's folder
        task: zeroshot_classification   # optional: from the folder (dataset_type.txt = retrieval)
        name: emoji-cls          # optional (default: folder name)
        split: test              # optional (default: test)
      - data/emoji-captions      # just the root
    models:                      # optional; more with --checkpoint on the command line
      - pretrained: logs/superclip/checkpoints/epoch_10.pt
        model: SuperCLIP-ViT-B-16        # optional for a trainer checkpoint (read from the run's params.txt)
        label: superclip                 # optional
      - model: local-dir:exported/clip   # a `superclip export` folder needs no pretrained
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from open_clip_superclip.atomic import local_output_path, write_atomically
from ._clip_benchmark import eval_argv, literal_braces
from ._plots import figure, png_bytes
from .checkpoints import SCHEMA_PREFIXES, read_run_settings, superclip_counterpart

TASKS = ("zeroshot_classification", "zeroshot_retrieval")
LOG_NAME = "clip_benchmark.log"  # one per model, under OUT/runs/N-LABEL/
TABLE_FIELDS = ("model", "architecture", "pretrained", "dataset", "task", "metric", "value", "status", "error")
_WORKER = "import sys; from open_clip_superclip.tools.benchmark import worker_main; sys.exit(worker_main(sys.argv[1:]))"


class SuiteError(ValueError):
    pass


@dataclass
class Dataset:
    name: str
    root: Path
    task: str
    split: str = "test"

    def problem(self) -> Optional[str]:
        """What clip_benchmark would trip over in the folder layout, found before any model is loaded."""
        if not self.root.is_dir():
            return f"{self.root} is not a folder"
        needed = [Path(self.split, "nshards.txt")]
        if self.task == "zeroshot_classification":
            needed += [Path("classnames.txt"), Path("zeroshot_classification_templates.txt")]
        missing = [str(p) for p in needed if not (self.root / p).is_file()]
        return f"{self.root} lacks {', '.join(missing)}" if missing else None


@dataclass
class Model:
    label: str
    model: Optional[str]
    pretrained: str
    problem: Optional[str] = None
    note: Optional[str] = None


@dataclass
class Run:
    index: int
    model: Model
    dataset: Dataset
    folder: Path

    @property
    def output(self) -> Path:
        return self.folder / f"{_slug(self.dataset.name)}.json"

    @property
    def status(self) -> Path:
        return self.folder / f"{_slug(self.dataset.name)}.status.json"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


# --------------------------------------------------------------------------------------------------- suite
def infer_task(root: Path) -> str:
    """clip_benchmark's own rule: dataset_type.txt saying `retrieval`, else classification."""
    type_file = root / "dataset_type.txt"
    kind = type_file.read_text(encoding="utf-8").strip().lower() if type_file.is_file() else "classification"
    return "zeroshot_retrieval" if kind == "retrieval" else "zeroshot_classification"


def _entry(item, what: str, allowed: set, required: str) -> dict:
    entry = {required: item} if isinstance(item, str) else item
    if not isinstance(entry, dict) or not entry.get(required):
        raise SuiteError(f"each {what} needs `{required}`: got {item!r}")
    unknown = set(entry) - allowed
    if unknown:
        raise SuiteError(f"{what} {item!r}: unknown key(s) {sorted(unknown)} (allowed: {sorted(allowed)})")
    return entry


def _unique(names, what: str):
    seen = set()
    for name in names:
        if name in seen:
            raise SuiteError(f"two {what}s are named {name!r}: give them distinct names")
        seen.add(name)


def load_suite(path) -> tuple[list[Dataset], list[dict]]:
    """(datasets, model entries) of a suite file."""
    import yaml
    given, path = os.fspath(path), Path(path)
    try:
        suite = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SuiteError(f"cannot read the suite {given}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise SuiteError(f"cannot read the suite {given}: {error}") from error
    if not isinstance(suite, dict) or not suite.get("datasets"):
        raise SuiteError(f"{path}: a suite is a mapping with a `datasets` list (and optionally `models`)")
    unknown = set(suite) - {"datasets", "models"}
    if unknown:
        raise SuiteError(f"{path}: unknown key(s) {sorted(unknown)} (allowed: datasets, models)")
    base = path.parent
    datasets = []
    for item in suite["datasets"]:
        entry = _entry(item, "dataset", {"root", "name", "task", "split"}, "root")
        root = (base / str(entry["root"])).absolute()
        task = entry.get("task") or infer_task(root)
        if task not in TASKS:
            raise SuiteError(f"dataset {entry['root']}: task must be one of {TASKS}, got {task!r}")
        datasets.append(Dataset(str(entry.get("name") or root.name), root, task, str(entry.get("split", "test"))))
    _unique((d.name for d in datasets), "dataset")
    models = []
    for item in suite.get("models") or []:
        if not isinstance(item, dict) or not (item.get("pretrained") or item.get("model")):
            raise SuiteError(f"each model needs `pretrained` (a checkpoint) and/or `model`: got {item!r}")
        entry = _entry(item, "model", {"pretrained", "model", "label"}, "pretrained" if "pretrained" in item
                       else "model")
        if entry.get("pretrained"):
            candidate = base / str(entry["pretrained"])
            entry["pretrained"] = str(candidate.absolute()) if candidate.exists() else str(entry["pretrained"])
        if str(entry.get("model", "")).startswith("local-dir:"):
            entry["model"] = "local-dir:" + str((base / entry["model"][len("local-dir:"):]).absolute())
        models.append(entry)
    return datasets, models


def _default_label(model: Optional[str], pretrained: str) -> str:
    if not pretrained:
        return Path(model.split(":", 1)[-1]).name if model else "model"
    path = Path(pretrained)
    if path.parent.name == "checkpoints":  # LOGS/NAME/checkpoints/epoch_N.pt
        return f"{path.parent.parent.name}/{path.stem}"
    return path.stem if path.suffix else pretrained


def resolve_model(model: Optional[str], pretrained: str, label: Optional[str] = None) -> Model:
    """Fills in the model name from the run's params.txt and finds what would make every run of it fail."""
    import open_clip
    entry = Model(label or _default_label(model, pretrained), model, pretrained or "")
    is_file = bool(pretrained) and os.path.isfile(pretrained)
    settings = read_run_settings(pretrained) if is_file else None
    if not entry.model and settings is not None and settings.model:
        entry.model = settings.model
        entry.note = f"model {settings.model} (from {settings.params_path})"
    with_weights = bool(entry.model) and entry.model.startswith(SCHEMA_PREFIXES)
    if not entry.model:
        entry.problem = f"no model name for {pretrained}: pass --model or give `model:` in the suite"
    elif with_weights and pretrained:
        entry.problem = f"open_clip ignores pretrained ({pretrained}) for {entry.model}: give one or the other"
    elif not with_weights and open_clip.get_model_config(entry.model) is None:
        entry.problem = f"unknown model {entry.model!r}"
    elif pretrained and not is_file and not open_clip.get_pretrained_cfg(entry.model, pretrained):
        entry.problem = f"{pretrained} is neither a file nor a pretrained tag of {entry.model}"
    elif settings is not None and settings.non_default_flags():
        entry.problem = (f"trained with {', '.join(settings.non_default_flags())} ({settings.params_path}); "
                         f"clip_benchmark rebuilds the model from its name alone and would not apply them: run "
                         f"`superclip export {pretrained} DIR` and benchmark model `local-dir:DIR`")
    elif settings is not None and settings.superclip and settings.model == entry.model \
            and open_clip.get_model_config(entry.model).get("superclip_cfg") is None:
        counterpart = superclip_counterpart(entry.model)
        if counterpart is None:
            entry.problem = (f"{pretrained} is a stock {entry.model} trained with the SuperCLIP head, and no "
                             f"SuperCLIP model has the same towers: export it with `superclip export`")
        else:
            entry.model, entry.note = counterpart, f"evaluated as {counterpart} (stock {entry.model} + class head)"
    return entry


def _checkpoint_arg(text: str, model: Optional[str]) -> Model:
    label, sep, path = text.partition("=")
    if not sep or os.sep in label or os.path.exists(text):  # a path such as lr=1e-3/checkpoints/epoch_1.pt
        label, path = None, text
    return resolve_model(model, path, label)


# -------------------------------------------------------------------------------------------------- running
def clip_benchmark_argv(run: Run, options) -> list[str]:
    """The `clip_benchmark eval` arguments of one run."""
    return eval_argv(run.model.model, run.model.pretrained, f"wds/{run.dataset.name}",
                     literal_braces(run.dataset.root), run.dataset.task, literal_braces(run.output),
                     batch_size=options.batch_size, num_workers=options.num_workers, recall_k=options.recall_k,
                     no_amp=options.no_amp, extra=("--split", run.dataset.split))


def _write_status(run_status: Path, error: Optional[str], seconds: float = 0.0):
    data = json.dumps({"error": error, "seconds": round(seconds, 3)}).encode()
    write_atomically(run_status, lambda f: f.write(data))


def _progress(text: str):
    print(text, file=sys.stderr, flush=True)


def worker_main(argv) -> int:
    """The per-model worker: runs clip_benchmark's CLI for each run of a spec file, one after the other."""
    from clip_benchmark.cli import main as clip_benchmark_main
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    with open(spec["log"], "a", encoding="utf-8") as log:
        for run in spec["runs"]:
            _progress(f"[{run['index']}/{spec['total']}] {run['label']} x {run['dataset']} ({run['task']}): running")
            print(f"\n===== clip_benchmark eval {' '.join(run['argv'])}", file=log, flush=True)
            Path(run["output"]).unlink(missing_ok=True)
            sys.argv = ["clip_benchmark", "eval", *run["argv"]]
            start, error = time.monotonic(), None
            sink = sys.stderr if spec["verbose"] else log
            try:
                with _redirected(None if spec["verbose"] else log):
                    clip_benchmark_main()
            except SystemExit as exit_:
                if exit_.code not in (None, 0):
                    error = f"clip_benchmark exited with {exit_.code!r}"
            except Exception as exc:  # one dataset's failure must not stop the others
                traceback.print_exc(file=sink)
                error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            sink.flush()
            if error is None and not Path(run["output"]).is_file():
                error = "clip_benchmark wrote no result"
            seconds = time.monotonic() - start
            _write_status(Path(run["status"]), error, seconds)
            outcome = f"ok ({seconds:.1f} s)" if error is None else f"FAILED: {error} (log: {spec['log']})"
            _progress(f"[{run['index']}/{spec['total']}] {run['label']} x {run['dataset']}: {outcome}")
    return 0


class _redirected:
    """Sends Python-level stdout/stderr (clip_benchmark's prints, tqdm, warnings) to the log; None: unchanged."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        self.saved = sys.stdout, sys.stderr
        if self.stream is not None:
            sys.stdout = sys.stderr = self.stream

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self.saved


def run_model(runs: list[Run], options, total: int) -> None:
    """Evaluates one model's runs in a worker process; restarts it past a run that killed it."""
    folder = runs[0].folder
    log, spec_path = folder / LOG_NAME, folder / "spec.json"
    pending = runs
    while pending:
        spec = {"total": total, "log": str(log), "verbose": options.verbose, "runs": [
            {"index": r.index, "label": r.model.label, "dataset": r.dataset.name, "task": r.dataset.task,
             "argv": clip_benchmark_argv(r, options), "output": str(r.output), "status": str(r.status)}
            for r in pending]}
        spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
        returncode = subprocess.run([sys.executable, "-c", _WORKER, str(spec_path)]).returncode
        unfinished = [r for r in pending if not r.status.is_file()]
        if not unfinished:
            return
        crashed, pending = unfinished[0], unfinished[1:]
        error = f"the evaluation process died (exit code {returncode}) during this run; see {log}"
        _write_status(crashed.status, error)
        _progress(f"[{crashed.index}/{total}] {crashed.model.label} x {crashed.dataset.name}: FAILED: {error}")


# -------------------------------------------------------------------------------------------------- results
def collect_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for run in runs:
        base = {"model": run.model.label, "architecture": run.model.model or "", "pretrained": run.model.pretrained,
                "dataset": run.dataset.name, "task": run.dataset.task}
        error = run.model.problem or run.dataset.problem()
        if error is None:
            error = json.loads(run.status.read_text(encoding="utf-8"))["error"]
        if error is None:
            try:
                metrics = json.loads(run.output.read_text(encoding="utf-8"))["metrics"]
            except (OSError, ValueError, KeyError) as exc:
                error = f"unreadable clip_benchmark result {run.output}: {exc}"
        if error is not None:
            rows.append({**base, "metric": "", "value": "", "status": "failed", "error": error})
            continue
        rows += [{**base, "metric": metric, "value": float(value), "status": "ok", "error": ""}
                 for metric, value in metrics.items()]
    return rows


def _format_value(value) -> str:
    return "" if value == "" else "nan" if math.isnan(value) else f"{value:.4f}"


def write_tables(rows: list[dict], out: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = buffer.getvalue().encode()
    write_atomically(out / "results.csv", lambda f: f.write(data))

    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(TABLE_FIELDS) + " |", "|" + "---|" * len(TABLE_FIELDS)]
    for row in rows:
        lines.append("| " + " | ".join(cell(_format_value(row[k]) if k == "value" else row[k])
                                       for k in TABLE_FIELDS) + " |")
    text = ("\n".join(lines) + "\n").encode()
    write_atomically(out / "results.md", lambda f: f.write(text))


def plot_results(rows: list[dict], path: Path) -> None:
    """Grouped bars: one group per dataset x metric, one bar per model; failed model x dataset pairs marked x."""
    models = list(dict.fromkeys(row["model"] for row in rows))
    groups = list(dict.fromkeys((row["dataset"], row["metric"]) for row in rows if row["status"] == "ok"))
    groups += [(d, "") for d in dict.fromkeys(row["dataset"] for row in rows) if d not in {g[0] for g in groups}]
    values = {(row["model"], row["dataset"], row["metric"]): row["value"] for row in rows if row["status"] == "ok"}
    failed = {(row["model"], row["dataset"]) for row in rows if row["status"] == "failed"}

    fig = figure(max(6.0, 0.35 * len(groups) * max(1, len(models)) + 2), 4.5, dpi=120, layout="tight")
    axes = fig.add_subplot()
    width = 0.8 / max(1, len(models))
    for m, model in enumerate(models):
        xs = [g + (m - (len(models) - 1) / 2) * width for g in range(len(groups))]
        heights = [values.get((model, dataset, metric), float("nan")) for dataset, metric in groups]
        axes.bar(xs, heights, width, label=model, color=f"C{m}")  # NaN (e.g. acc5 with < 5 classes): no bar
        fails = [x for x, (dataset, _) in zip(xs, groups) if (model, dataset) in failed]
        axes.plot(fails, [0.02] * len(fails), "x", color=f"C{m}", markersize=8)
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels([f"{d}\n{m}" if m else f"{d}\n(failed)" for d, m in groups], rotation=30, ha="right",
                         fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("score")
    axes.set_title("CLIP Benchmark (x: run failed)" if failed else "CLIP Benchmark")
    axes.legend(fontsize=8)
    data = png_bytes(fig)
    write_atomically(path, lambda f: f.write(data))


# ------------------------------------------------------------------------------------------------------ CLI
def build_parser():
    parser = argparse.ArgumentParser(
        prog="superclip benchmark",
        description="Evaluate checkpoints on a suite of local webdataset folders with CLIP Benchmark "
                    "(clip_benchmark eval) and write a results table and chart.",
        epilog="Suite format: see `python -c 'import open_clip_superclip.tools.benchmark as b; print(b.__doc__)'` "
               "or docs/evaluation.md.")
    parser.add_argument("suite", help="suite file (YAML): datasets, optionally models")
    parser.add_argument("--out", required=True, help="output folder (results.csv, results.md, results.png, runs/)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="[LABEL=]PATH",
                        help="checkpoint to evaluate (trainer epoch_N.pt or bare state dict); repeatable")
    parser.add_argument("--model", help="model config for the --checkpoint files (default: each run's params.txt)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4, help="clip_benchmark data loader workers")
    parser.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10], help="retrieval recall@k")
    parser.add_argument("--no-amp", action="store_true", help="evaluate without autocast")
    parser.add_argument("--verbose", action="store_true", help="show clip_benchmark's output (default: in the logs)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0 or min(args.recall_k) < 1:
        parser.error("--batch-size and --recall-k must be >= 1, --num-workers >= 0")
    try:
        datasets, model_entries = load_suite(args.suite)
        models = [resolve_model(e.get("model"), e.get("pretrained", ""), e.get("label")) for e in model_entries]
        models += [_checkpoint_arg(text, args.model) for text in args.checkpoint]
        if not models:
            raise SuiteError("nothing to evaluate: give --checkpoint or a `models` list in the suite")
        _unique((m.label for m in models), "model (label)")
        out = Path(local_output_path(args.out, "--out")).absolute()
        if out.exists() and not out.is_dir():
            raise SuiteError(f"--out {args.out} exists and is not a folder")
    except (SuiteError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    runs = []
    for m, model in enumerate(models):
        folder = out / "runs" / f"{m}-{_slug(model.label)}"
        folder.mkdir(parents=True, exist_ok=True)
        runs += [Run(len(runs) + d + 1, model, dataset, folder) for d, dataset in enumerate(datasets)]
    for run in runs:  # results of an earlier benchmark in the same folder must not pass for this one's
        for stale in (run.output, run.status, run.folder / LOG_NAME):
            stale.unlink(missing_ok=True)
    _progress(f"benchmark: {len(models)} model(s) x {len(datasets)} dataset(s) = {len(runs)} runs -> {out}")
    for model in models:
        if model.note:
            _progress(f"  {model.label}: {model.note}")
    for model in models:
        model_runs = [r for r in runs if r.model is model]
        for run in model_runs:
            problem = model.problem or run.dataset.problem()
            if problem:
                _progress(f"[{run.index}/{len(runs)}] {model.label} x {run.dataset.name}: FAILED: {problem}")
        runnable = [r for r in model_runs if not (model.problem or r.dataset.problem())]
        if runnable:
            run_model(runnable, args, len(runs))

    rows = collect_rows(runs)
    write_tables(rows, out)
    plot_results(rows, out / "results.png")
    failed = sorted({(r["model"], r["dataset"]) for r in rows if r["status"] == "failed"})
    _progress(f"wrote {out / 'results.csv'}, results.md, results.png"
              + (f"; {len(failed)} of {len(runs)} runs failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
