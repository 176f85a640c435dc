"""`superclip demo` (`make demo`): CLIP and SuperCLIP trained on real data, benchmarked, reported.
`superclip demo --experiment` (`make experiment`): the evidence over seeds, resumable one cell at a time.

Every stage runs the tools a user would type, as subprocesses: the data builders (`superclip demo-data`,
`superclip clipart-data`), the stock trainer (`python -m training.main`, i.e. open_clip_train with our flags),
the real `clip_benchmark eval` console script and `superclip words`. So the demo checks the plugin end to end.

The two demo runs differ only in the flag under test: `--model SuperCLIP-ViT-Tiny --superclip-lambda 0` is plain
CLIP (same towers, same initialisation: the factory draws the head after the towers), `--superclip-lambda 1` is
SuperCLIP. Seed, data order, batch, steps and schedule are the same.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from open_clip_superclip.atomic import write_atomically

from .cells import MODEL, Grid, Mode, Schedule, demo_cells, experiment_cells, select_cells
from .data import Data, ensure_data, word_list
from .experiment_report import write_experiment_report
from .report import WORD_TEMPLATE, demo_table, write_demo_report
from .runner import (Bars, CellRun, DemoError, Runtime, Stages, child_env, detect_runtime, duration, run_cells,
                     run_parallel, tail)

# Tuned on this data (ViT-Tiny, 64 px): batch 64 at lr 1e-3 learned fastest per sample among batch 32-256 and
# lr 5e-4-4e-3; one pass over the 12k training samples costs ~4 CPU-minutes per run on one core.
DEMO_SCHEDULE = Schedule(batch_size=64, epochs=1)
FULL_EMOJI = {"limit": None, "train_copies": 4}
SMOKE_EMOJI = {"limit": 30, "train_copies": 2}
# The experiment: one rendering per emoji and 4 passes (each emoji seen 4 times: the demo's 12k samples), so
# that passes end in checkpoints to evaluate; sized to the 4-hour budget in docs/experiments.md.
EXPERIMENT_EMOJI = {"limit": None, "train_copies": 1}
EXPERIMENT_CLIPART = {"heldout_frac": 0.2}
SMOKE_CLIPART = {"heldout_frac": 0.5, "min_class_size": 1, "limit": 40}
EXPERIMENT_GRID = Grid(seeds=(0, 1, 2), batches=(256, 64, 16), ablation_batch=64, emoji_epochs=4, clipart_epochs=4,
                       emoji_eval_every=2)
SMOKE_GRID = Grid(seeds=(0,), batches=(8, 4), ablation_batch=8, emoji_epochs=2, clipart_epochs=1,
                  ablations=("superclip-idfnone",), dual_arms=("clip-mix", "superclip-dual"),
                  finetune_methods=("superclip",), clipart_batch=4, samples_per_epoch=16)


def get_mode(experiment: bool, smoke: bool) -> Mode:
    if not experiment:
        if smoke:
            return Mode("demo (smoke)", {"emoji": SMOKE_EMOJI}, {"emoji": "demo_data/emoji-smoke"}, "demo_runs/smoke",
                        "demo_runs/smoke/report", demo_cells(Schedule(batch_size=16, epochs=1, samples_per_epoch=32)))
        return Mode("demo", {"emoji": FULL_EMOJI}, {"emoji": "demo_data/emoji"}, "demo_runs", "demo_report",
                    demo_cells(DEMO_SCHEDULE))
    if smoke:
        return Mode("experiment (smoke)", {"emoji": SMOKE_EMOJI, "clipart": SMOKE_CLIPART},
                    {"emoji": "demo_data/emoji-smoke", "clipart": "demo_data/clipart-smoke"},
                    "experiment_runs/smoke", "experiment_runs/smoke/report", experiment_cells(SMOKE_GRID))
    return Mode("experiment", {"emoji": EXPERIMENT_EMOJI, "clipart": EXPERIMENT_CLIPART},
                {"emoji": "demo_data/emoji-x1", "clipart": "demo_data/clipart"}, "experiment_runs",
                "experiment_report", experiment_cells(EXPERIMENT_GRID))


def load_datas(args, mode: Mode, cells) -> dict:
    """The data sets the given cells train on, built or found up to date, with their training CSVs; and the
    other data sets of the mode where they were built earlier (so the report keeps their finished cells)."""
    folders = {"emoji": args.data, "clipart": args.clipart_data}
    needed = {cell.dataset for cell in cells}
    datas = {}
    for key in mode.data:
        settings = dict(mode.data[key])
        if key == "clipart" and args.clipart_source:
            settings["source"] = args.clipart_source
        subsets = {cell.schedule.samples_per_epoch for cell in mode.cells if cell.dataset == key}
        data = ensure_data(key, folders[key] or mode.data_dirs[key], settings, subsets, build=key in needed)
        if data is not None:
            datas[key] = data
    return datas


def cell_runs(mode: Mode, datas: dict, runs_dir: Path, runtime: Runtime) -> list:
    by_name = {cell.name: cell for cell in mode.cells}
    return [CellRun(cell, datas[cell.dataset], runs_dir, runtime, by_name.get(cell.init))
            for cell in mode.cells if cell.dataset in datas]


def run_words(runs: Path, clip: CellRun, superclip: CellRun, data: Data, runtime: Runtime) -> Path:
    """`superclip words` (the paper's appendix A.4) for CLIP (model 1) vs SuperCLIP (model 2)."""
    folder = runs / "words"
    folder.mkdir(parents=True, exist_ok=True)
    words = "\n".join(word_list(data)) + "\n"
    write_atomically(folder / "words.txt", lambda f: f.write(words.encode()))
    argv = [sys.executable, "-m", "open_clip_superclip.tools.cli", "words"]
    for run in (clip, superclip):  # relative paths (cwd = runs): the plot labels the models with them
        argv += ["--model", MODEL, "--pretrained", str(run.final_checkpoint().relative_to(runs))]
    argv += ["--images", data.word_images, "--words", str(folder / "words.txt"), "--template", WORD_TEMPLATE,
             "--csv", str(folder / "word_ranking.csv"), "--png", str(folder / "word_ranking.png"),
             "--workers", "0", "--device", runtime.device, "--no-progress"]
    log = folder / "words.log"
    for stale in (log, folder / "word_ranking.csv", folder / "word_ranking.png"):
        stale.unlink(missing_ok=True)
    code = runtime.processes.run(argv, log, child_env(runtime.cores), cwd=runs, stdout_path=folder / "report.txt")
    if code != 0 or not (folder / "word_ranking.csv").is_file():
        raise DemoError(f"superclip words failed (exit code {code}); see {log}:\n{tail(log)}")
    return folder


def run_demo(args, mode: Mode, runtime: Runtime) -> int:
    stages, bars = Stages(5), Bars(runtime.progress)
    runs_dir, out = Path(args.runs or mode.runs).absolute(), Path(args.out or mode.report).absolute()
    with stages("data: OpenMoji images + CLDR names (superclip demo-data)"):
        data = load_datas(args, mode, mode.cells)["emoji"]
        print(f"    {data.root}: {data.num_train} training samples; eval sets {', '.join(data.manifest['eval'])}",
              flush=True)
    runs = {run.cell.name: run for run in cell_runs(mode, {"emoji": data}, runs_dir, runtime)}
    states = {name: run.prepare(args.retrain) for name, run in runs.items()}
    with stages(f"train CLIP and SuperCLIP: {len(runs)} runs of the stock trainer, {runtime.jobs} at a time, "
                f"{runtime.threads} thread(s) each"):
        seconds = run_parallel(list(runs.values()), lambda run: run.train_stage(states[run.cell.name], bars),
                               runtime.jobs, runtime.processes)
        train_seconds = dict(zip(runs, seconds))
    with stages("benchmark both: clip_benchmark eval (held-out zero-shot, skin tone, gender, retrieval)"):
        results = run_parallel(list(runs.values()),
                               lambda run: run.eval_stage(states[run.cell.name], train_seconds[run.cell.name]),
                               runtime.jobs, runtime.processes)
        results = dict(zip(runs, results))
    with stages("word-image similarity ranking (superclip words)"):
        words = run_words(runs_dir, runs["clip"], runs["superclip"], data, runtime)
    with stages(f"report -> {out}"):
        reused = [name for name, state in states.items() if state == "finished"]
        write_demo_report(out, mode, data, runs, results, words, runtime, stages, reused)
    table, _ = demo_table(data, results["clip"], results["superclip"])
    print(f"\n{table}\n\nreport: {out / 'README.md'} (total {duration(time.monotonic() - stages.start)})",
          flush=True)
    return 0


def run_experiment(args, mode: Mode, runtime: Runtime) -> int:
    selected = select_cells(mode.cells, args.cell)
    datas = load_datas(args, mode, mode.cells if args.list_cells else selected)
    runs_dir, out = Path(args.runs or mode.runs).absolute(), Path(args.out or mode.report).absolute()
    all_runs = cell_runs(mode, datas, runs_dir, runtime)
    if args.list_cells:
        for run in all_runs:
            print(f"{run.cell.name:<30} {run.state():<9} {run.cell.study}: {run.cell.method}, batch "
                  f"{run.cell.schedule.batch_size}, seed {run.cell.seed}")
        return 0
    chosen = [run for run in all_runs if run.cell in selected]
    todo = [run for run in chosen if args.retrain or run.state() != "finished"]
    print(f"==> {mode.name}: {len(chosen)} cell(s) selected, {len(chosen) - len(todo)} finished earlier, "
          f"{len(todo)} to run, {runtime.jobs} at a time with {runtime.threads} thread(s) each -> {runs_dir}",
          flush=True)
    start = time.monotonic()
    run_cells(chosen, runtime, args.retrain,  # the report follows every finished cell: a long run can be stopped
              on_finished=lambda run: write_experiment_report(out, mode, datas, all_runs))
    if not todo:
        write_experiment_report(out, mode, datas, all_runs)
    finished = sum(run.state() == "finished" for run in all_runs)
    print(f"==> {finished} of {len(all_runs)} cells finished; report: {out / 'README.md'} "
          f"({duration(time.monotonic() - start)})", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="superclip demo",
        description="Train tiny CLIP and SuperCLIP on the OpenMoji demo data with the stock open_clip trainer, "
                    "benchmark both with clip_benchmark, rank words, and write demo_report/. With --experiment: "
                    "the evidence over 3 seeds (small-batch study, DualCaption, fine-tuning), resumable.")
    parser.add_argument("--smoke", type=int, choices=(0, 1), default=0,
                        help="1: the whole pipeline on small subsets with a few steps (CI); default 0")
    parser.add_argument("--experiment", action="store_true", help="run the experiment grid instead of the demo")
    parser.add_argument("--cell", action="append", default=[], metavar="NAME",
                        help="experiment: run only this cell (glob patterns allowed, repeatable)")
    parser.add_argument("--list-cells", action="store_true", help="experiment: list the cells and their state")
    parser.add_argument("--data", help="OpenMoji dataset folder (default demo_data/emoji; experiment: "
                                       "demo_data/emoji-x1; smoke: demo_data/emoji-smoke)")
    parser.add_argument("--clipart-data", help="experiment: Open Clip Art dataset folder (default demo_data/clipart)")
    parser.add_argument("--clipart-source", help="experiment: the openclipart svg/ + png/ tree to build it from "
                                                 "(default: see `superclip clipart-data --help`)")
    parser.add_argument("--runs", help="training runs folder (default demo_runs or experiment_runs)")
    parser.add_argument("--out", help="report folder (default demo_report or experiment_report)")
    parser.add_argument("--jobs", type=int, help="runs at a time (default 2; each gets cores/jobs threads)")
    parser.add_argument("--workers", type=int, default=1, help="data loader workers per run (default 1)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a run finished earlier")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.cell or args.list_cells or args.clipart_data or args.clipart_source) and not args.experiment:
        parser.error("--cell, --list-cells and --clipart-* belong to the experiment: add --experiment")
    if args.jobs is not None and args.jobs < 1 or args.workers < 1:
        parser.error("--jobs and --workers must be >= 1")
    mode = get_mode(args.experiment, bool(args.smoke))
    try:
        select_cells(mode.cells, args.cell)
    except ValueError as error:
        parser.error(f"{error} ({mode.name})")
    runtime = detect_runtime(args.jobs, args.workers, not args.no_progress)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a job scheduler's stop: like Ctrl-C
    try:
        return (run_experiment if args.experiment else run_demo)(args, mode, runtime)
    except (DemoError, FileExistsError, RuntimeError) as error:
        print(f"superclip demo: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        runtime.processes.stop_all()
        print("\nsuperclip demo: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
