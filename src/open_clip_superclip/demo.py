"""`superclip demo` (`make demo`): CLIP and SuperCLIP trained on real data, benchmarked, reported.
`superclip demo --experiment` (`make experiment`): seeds x methods x batch sizes, resumable one cell at a time.

Every stage runs the tools a user would type, as subprocesses: the OpenMoji data (`superclip demo-data`), the
stock trainer (`python -m training.main`, i.e. open_clip_train with our flags, on the data in its CSV layout), the
real `clip_benchmark eval` console script and `superclip words`. So the demo checks the plugin end to end, not our
own code paths only.

The two demo runs differ only in the flag under test: `--model SuperCLIP-ViT-Tiny --superclip-lambda 0` is plain
CLIP (same towers, same initialisation: the factory draws the head after the towers), `--superclip-lambda 1` is
SuperCLIP. Seed, data order (see training_csv), batch, steps and schedule are the same.

A run ("cell") lives in RUNS/NAME: the trainer's own folder (out.log, params.txt, checkpoints/) plus cell.json
(the exact command; a different command starts the cell over), eval/ (clip_benchmark's JSON per dataset and
checkpoint) and result.json, written last: a cell with a result.json for the same command is finished and
skipped. An interrupted cell resumes from its last whole epoch (`--resume latest` with `--save-most-recent`).
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional
from .atomic import staging_dir, write_atomically


MODEL = "SuperCLIP-ViT-Tiny"
WORD_TEMPLATE = "an emoji of {}"
ATTRIBUTE_WORDS = ("skin", "tone", "light", "medium", "dark", "man", "woman", "person")

# The rows of the report tables: (dataset, metric). acc5 is left out of the probes: with 5 skin tones it is
# always 1, with 3 genders clip_benchmark reports NaN.
TABLE_ROWS = (
    ("emoji_heldout", "acc1"), ("emoji_heldout", "acc5"), ("emoji_heldout", "mean_per_class_recall"),
    ("emoji_skintone", "acc1"), ("emoji_skintone", "mean_per_class_recall"),
    ("emoji_gender", "acc1"), ("emoji_gender", "mean_per_class_recall"),
    ("emoji_retrieval", "image_retrieval_recall@1"), ("emoji_retrieval", "image_retrieval_recall@5"),
    ("emoji_retrieval", "image_retrieval_recall@10"), ("emoji_retrieval", "text_retrieval_recall@1"),
    ("emoji_retrieval", "text_retrieval_recall@5"), ("emoji_retrieval", "text_retrieval_recall@10"),
)
# The metrics plotted against training steps in the experiment report.
CURVE_ROWS = (("emoji_heldout", "acc5"), ("emoji_skintone", "acc1"), ("emoji_gender", "acc1"),
              ("emoji_retrieval", "image_retrieval_recall@5"))
DATASET_TITLES = {"emoji_heldout": "held-out zero-shot", "emoji_skintone": "skin-tone probe",
                  "emoji_gender": "gender probe", "emoji_retrieval": "held-out retrieval"}


class DemoError(RuntimeError):
    """A stage that failed; the message says where its log is."""


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Schedule:
    """What the trainer is told besides the flag under test."""
    batch_size: int
    epochs: int
    lr: float = 1e-3
    wd: float = 0.1
    warmup: float = 0.05  # share of the total steps
    samples_per_epoch: Optional[int] = None  # None: all training samples; N: the first N of them
    save_every: int = 0  # also evaluate every N epochs (0: the last epoch only)


@dataclass(frozen=True)
class Method:
    label: str
    lam: float
    idf: Optional[str] = None


METHODS = {
    "clip": Method("CLIP", 0.0),
    "superclip": Method("SuperCLIP", 1.0),
    "superclip-lam0.4": Method("SuperCLIP λ=0.4", 0.4),
    "superclip-lam1.6": Method("SuperCLIP λ=1.6", 1.6),
    "superclip-idfnone": Method("SuperCLIP without IDF", 1.0, "none"),
}


@dataclass(frozen=True)
class Cell:
    name: str
    method: str  # a METHODS key
    seed: int
    schedule: Schedule

    @property
    def group(self) -> str:
        """Cells that differ only in the seed."""
        return f"{self.method}-b{self.schedule.batch_size}"


@dataclass(frozen=True)
class Mode:
    """One way to run: the data it builds, its cells, where it writes."""
    name: str
    data: dict  # demo_data.build settings
    data_dir: str
    runs: str
    report: str
    cells: tuple


# Tuned on this data (ViT-Tiny, 64 px): batch 64 at lr 1e-3 learned fastest per sample among batch 32-256 and
# lr 5e-4-4e-3; one pass over the 12k training samples costs ~4 CPU-minutes per run on one core.
DEMO_SCHEDULE = Schedule(batch_size=64, epochs=1)
EXPERIMENT_SEEDS = (0, 1, 2)


def _demo_cells(schedule):
    return tuple(Cell(method, method, 0, schedule) for method in ("clip", "superclip"))


def _experiment_cells(batches, epochs, save_every, samples_per_epoch=None):
    """Seed-major, so a partial experiment has every group at one seed before any at two."""
    cells = []
    for seed in EXPERIMENT_SEEDS:
        for batch in batches:
            methods = ["clip", "superclip"] + (["superclip-lam0.4", "superclip-lam1.6", "superclip-idfnone"]
                                               if batch == batches[0] else [])
            schedule = Schedule(batch, epochs, save_every=save_every, samples_per_epoch=samples_per_epoch)
            cells += [Cell(f"{method}-b{batch}-s{seed}", method, seed, schedule) for method in methods]
    return tuple(cells)


FULL_DATA = {"limit": None, "train_copies": 4}
SMOKE_DATA = {"limit": 30, "train_copies": 2}


def get_mode(experiment: bool, smoke: bool) -> Mode:
    if not experiment:
        if smoke:
            return Mode("demo (smoke)", SMOKE_DATA, "demo_data/emoji-smoke", "demo_runs/smoke",
                        "demo_runs/smoke/report",
                        _demo_cells(Schedule(batch_size=16, epochs=1, samples_per_epoch=32)))
        return Mode("demo", FULL_DATA, "demo_data/emoji", "demo_runs", "demo_report", _demo_cells(DEMO_SCHEDULE))
    if smoke:
        return Mode("experiment (smoke)", SMOKE_DATA, "demo_data/emoji-smoke", "experiment_runs/smoke",
                    "experiment_runs/smoke/report",
                    _experiment_cells((8, 4), epochs=2, save_every=1, samples_per_epoch=16))
    # 10 passes: the class head needs steps to learn the vocabulary it predicts; evaluated every 2 passes.
    return Mode("experiment", FULL_DATA, "demo_data/emoji", "experiment_runs", "experiment_report",
                _experiment_cells((256, 32), epochs=10, save_every=2))


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    root: Path
    manifest: dict
    csv: dict = field(default_factory=dict)  # samples per epoch (None: all) -> training CSV

    @property
    def num_train(self) -> int:
        return self.manifest["train"]["num_samples"]

    @property
    def val_data(self) -> str:
        return self.manifest["val"]["val_data"]

    def eval_sets(self, task: str) -> list[str]:
        """clip_benchmark dataset names (wds/...) of one task that this build has."""
        return [name for name, info in self.manifest["eval"].items() if info["task"] == task]

    def fingerprint(self) -> dict:
        return {"root": str(self.root), "settings": self.manifest["settings"], "versions": self.manifest["versions"]}


def ensure_data(folder: Path, settings: dict, subsets=(None,)) -> Data:
    """The demo data (built or found up to date) and its training CSVs: all samples, and the first N for each N
    in subsets."""
    from .demo_data import build
    data = Data(Path(folder).absolute(), build(folder, **settings))
    data.csv = {rows: training_csv(data, rows) for rows in subsets}
    return data


def training_csv(data: Data, rows: Optional[int]) -> Path:
    """The training shards in open_clip's CSV layout (one PNG per sample, a tab-separated filepath/title table),
    in DATA-csv/ beside the data; rows: only the first N samples (they are in random order already).

    Why not the shards: open_clip's webdataset loader shuffles samples with webdataset's shuffle seeded from the
    process id and the clock, so no two runs see the same order. Its CSV loader draws the order from --seed: the
    CLIP and SuperCLIP runs then get the same batches in the same order, and a rerun repeats a run exactly.
    """
    import csv
    import tarfile
    folder = data.root.parent / f"{data.root.name}-csv"
    manifest = json.dumps(data.manifest, sort_keys=True).encode()
    source = json.dumps({"manifest_sha256": hashlib.sha256(manifest).hexdigest()})
    if not (folder / "source.json").is_file() or (folder / "source.json").read_text(encoding="utf-8") != source:
        with staging_dir(folder) as staging:
            (staging / "images").mkdir()
            table = io.StringIO()
            writer = csv.writer(table, delimiter="\t", lineterminator="\n")
            writer.writerow(["filepath", "title"])
            shards = json.loads((data.root / "train" / "sizes.json").read_text(encoding="utf-8"))
            for shard in sorted(shards):
                samples = {}
                with tarfile.open(data.root / "train" / shard) as tar:
                    for member in tar.getmembers():
                        key, _, extension = member.name.partition(".")
                        if extension in ("png", "txt"):
                            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
                for key in sorted(samples):
                    image = folder / "images" / f"{key}.png"
                    (staging / "images" / image.name).write_bytes(samples[key]["png"])
                    writer.writerow([str(image), samples[key]["txt"].decode("utf-8")])
            (staging / "train.csv").write_text(table.getvalue(), encoding="utf-8")
            (staging / "source.json").write_text(source, encoding="utf-8")
    if rows is None:
        return folder / "train.csv"
    subset = folder / f"train-{rows}.csv"
    if not subset.is_file():
        lines = (folder / "train.csv").read_text(encoding="utf-8").splitlines(keepends=True)[:rows + 1]
        write_atomically(subset, lambda f: f.write("".join(lines).encode("utf-8")))
    return subset


def chance_level(data: Data, dataset: str, metric: str) -> float:
    """The expected score of random embeddings: k/C for top-k of C classes, 1/C for mean per-class recall; for
    retrieval k/N (one right image of N per caption) and 1 - C(T-m, k)/C(T, k) (m right of T captions)."""
    info = data.manifest["eval"][f"wds/{dataset}"]
    match = re.fullmatch(r"acc(\d+)", metric)
    if info["task"] == "zeroshot_classification":
        classes = len(_lines(Path(info["root"]) / "classnames.txt"))
        if match:
            return min(int(match.group(1)), classes) / classes
        if metric == "mean_per_class_recall":
            return 1 / classes
    else:
        images = info["num_images"]
        k = int(metric.rsplit("@", 1)[1])
        if metric.startswith("image_retrieval_recall@"):
            return min(k, images) / images
        if metric.startswith("text_retrieval_recall@"):
            per_image = len(data.manifest["caption_templates"])
            texts = images * per_image
            return 1 - math.comb(texts - per_image, k) / math.comb(texts, k)
    raise ValueError(f"no chance level for {dataset} {metric}")


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- subprocesses
class Processes:
    """The child processes this run started, so an interrupt can stop exactly those."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: set = set()
        self.stopping = False

    def run(self, argv, log_path: Path, env: dict, cwd=None, poll=None, stdout_path: Optional[Path] = None) -> int:
        """Runs argv with its output appended to log_path (stdout to stdout_path if given); calls poll() about
        once a second meanwhile."""
        with open(log_path, "a", encoding="utf-8") as log, \
                (open(stdout_path, "w", encoding="utf-8") if stdout_path else contextlib.nullcontext(log)) as out:
            log.write(f"\n$ {' '.join(shlex.quote(a) for a in argv)}\n")
            log.flush()
            with self._lock:
                if self.stopping:
                    raise KeyboardInterrupt
                process = subprocess.Popen(argv, stdout=out, stderr=log, env=env, cwd=cwd)
                self._running.add(process)
            try:
                while True:
                    try:
                        return process.wait(timeout=1.0)
                    except subprocess.TimeoutExpired:
                        if poll:
                            poll()
            finally:
                with self._lock:
                    self._running.discard(process)
                if poll:
                    poll()

    def stop_all(self):
        with self._lock:
            self.stopping = True
            running = list(self._running)
        for process in running:
            process.terminate()  # the trainer's last whole epoch is on disk (epoch_latest.pt): it resumes from there
        for process in running:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def clip_benchmark_bin() -> str:
    """The console script installed next to this interpreter (what `clip_benchmark` runs in this venv)."""
    path = Path(sys.executable).parent / "clip_benchmark"
    if not path.is_file():
        found = shutil.which("clip_benchmark")
        if not found:
            raise DemoError(f"the clip_benchmark command is not installed (looked in {path.parent} and PATH): "
                            f"pip install clip_benchmark==1.6.2")
        return found
    return str(path)


def _braces(text) -> str:
    """clip_benchmark str.formats --output and --dataset_root: keep a path's own braces literal."""
    return str(text).replace("{", "{{").replace("}", "}}")


# ------------------------------------------------------------------------------------------------- a cell
@dataclass
class Runtime:
    """Machine-dependent settings of this invocation (not part of a cell's identity beyond the command)."""
    device: str
    precision: str
    workers: int
    jobs: int  # runs at a time
    cores: int
    processes: Processes = field(default_factory=Processes)
    progress: bool = True

    @property
    def threads(self) -> int:
        """Threads per concurrent run: the cores shared out, so runs do not fight over them."""
        return max(1, self.cores // self.jobs)


def steps_per_epoch(cell: Cell, data: Data) -> int:
    """open_clip's CSV loader drops the last partial batch."""
    return (cell.schedule.samples_per_epoch or data.num_train) // cell.schedule.batch_size


def trainer_argv(cell: Cell, data: Data, runs: Path, runtime: Runtime) -> list[str]:
    s, method = cell.schedule, METHODS[cell.method]
    total = steps_per_epoch(cell, data) * s.epochs
    argv = [sys.executable, "-m", "training.main", "--model", MODEL, "--superclip-lambda", f"{method.lam:g}"]
    if method.idf:
        argv += ["--superclip-idf", method.idf]
    argv += ["--train-data", str(data.csv[s.samples_per_epoch]), "--dataset-type", "csv",
             "--batch-size", str(s.batch_size), "--epochs", str(s.epochs), "--lr", f"{s.lr:g}", "--wd", f"{s.wd:g}",
             "--warmup", str(max(1, round(s.warmup * total))), "--seed", str(cell.seed),
             "--workers", str(runtime.workers), "--precision", runtime.precision, "--device", runtime.device,
             "--logs-dir", str(runs), "--name", cell.name, "--save-frequency", str(s.save_every),
             "--save-most-recent", "--resume", "latest", "--log-every-n-steps", str(max(1, total // 100)),
             "--report-to", ""]
    return argv


def evaluated_epochs(schedule: Schedule) -> list[int]:
    every = schedule.save_every
    epochs = set(range(every, schedule.epochs + 1, every)) if every else set()
    return sorted(epochs | {schedule.epochs})


TRAIN_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\s*(\d+) ")
LOSS_VALUE = re.compile(r"(\w+_loss|Loss): ([0-9.eE+-]+|nan|inf) \(")


def parse_train_log(out_log: Path, batch_size: int) -> list[dict]:
    """[{step, epoch, <loss name>: value}] from open_clip_train's out.log, in step order.

    A resumed run logs its redone epoch again: the last line for a step wins.
    """
    by_step = {}
    if not out_log.is_file():
        return []
    for line in out_log.read_text(encoding="utf-8", errors="replace").splitlines():
        match = TRAIN_LINE.search(line)
        if not match:
            continue
        epoch, seen, per_epoch = (int(g) for g in match.groups())
        step = epoch * (per_epoch // batch_size) + seen // batch_size
        entry = {"step": step, "epoch": epoch}
        entry.update({name.lower(): float(value) for name, value in LOSS_VALUE.findall(line)})
        by_step[step] = entry
    return [by_step[step] for step in sorted(by_step)]


class CellRun:
    """One cell's folder, its state, and its stages."""

    def __init__(self, cell: Cell, data: Data, runs: Path, runtime: Runtime):
        self.cell, self.data, self.runs, self.runtime = cell, data, runs, runtime
        self.dir = runs / cell.name
        self.checkpoints = self.dir / "checkpoints"
        self.eval_dir = self.dir / "eval"
        self.result_path = self.dir / "result.json"
        self.argv = trainer_argv(cell, data, runs, runtime)
        self.identity = {"cell": asdict(self.cell), "trainer": self.argv[1:], "data": data.fingerprint()}

    # state ---------------------------------------------------------------------------------------------
    def _saved_identity(self):
        try:
            return json.loads((self.dir / "cell.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def state(self) -> str:
        """finished / partial (resumable) / stale (other settings) / new."""
        if not self.dir.exists() or not any(self.dir.iterdir()):
            return "new"
        saved = self._saved_identity()
        if saved is None:
            return "foreign"
        if saved != self.identity:
            return "stale"
        return "finished" if self.result_path.is_file() else "partial"

    def prepare(self, retrain: bool) -> str:
        state = self.state()
        if state == "foreign":
            raise DemoError(f"{self.dir} exists but was not made by `superclip demo` (no cell.json): move it away "
                            f"or pick another --runs folder")
        if state == "stale" or (retrain and state != "new"):
            reason = "--retrain" if retrain else "its command or data changed since it was started (cell.json)"
            print(f"    {self.cell.name}: starting over: {reason}", flush=True)
            shutil.rmtree(self.dir)
            state = "new"
        if state == "new":
            self.dir.mkdir(parents=True, exist_ok=True)
            data = json.dumps(self.identity, indent=1).encode()
            write_atomically(self.dir / "cell.json", lambda f: f.write(data))
        return state

    # stages --------------------------------------------------------------------------------------------
    def train(self, bar=None) -> float:
        """Runs (or resumes) the trainer; returns its wall time, as recorded if it had finished earlier."""
        trained = self.dir / "trained.json"
        if trained.is_file():
            return json.loads(trained.read_text(encoding="utf-8"))["seconds"]
        final = self.final_checkpoint()
        total = self.total_steps()
        out_log = self.dir / "out.log"

        def poll():
            if bar is not None:
                logged = parse_train_log(out_log, self.cell.schedule.batch_size)
                bar.update((min(total, logged[-1]["step"]) if logged else 0) - bar.n)  # redrawn per mininterval

        start = time.monotonic()
        code = self.runtime.processes.run(self.argv, self.dir / "trainer.log", child_env(self.runtime.threads),
                                          poll=poll)
        if code != 0 or not final.is_file():
            raise DemoError(f"training {self.cell.name} failed (exit code {code}); see {self.dir / 'trainer.log'} "
                            f"and {out_log}:\n{_tail(self.dir / 'trainer.log')}")
        seconds = time.monotonic() - start
        (self.checkpoints / "epoch_latest.pt").unlink(missing_ok=True)  # the same state as the final epoch
        text = json.dumps({"seconds": round(seconds, 1)}).encode()
        write_atomically(trained, lambda f: f.write(text))
        return seconds

    def _result_file(self, dataset: str, epoch: int) -> Path:
        return self.eval_dir / f"{dataset.split('/', 1)[1]}_epoch_{epoch}.pt.json"

    def _read_metrics(self, dataset: str, epoch: int) -> Optional[dict]:
        try:
            return json.loads(self._result_file(dataset, epoch).read_text(encoding="utf-8"))["metrics"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def evaluate(self) -> float:
        """clip_benchmark eval over every evaluated epoch: one call per task (the two side by side), results
        already on disk kept."""
        self.eval_dir.mkdir(exist_ok=True)
        start = time.monotonic()
        calls = [call for call in map(self._eval_call, ("zeroshot_classification", "zeroshot_retrieval")) if call]
        run_parallel(calls, self._run_eval_call, len(calls), self.runtime.processes)
        return time.monotonic() - start

    def _eval_call(self, task: str):
        """(task, argv, [(dataset, epoch) it must produce]) or None when every result of the task is on disk."""
        datasets = self.data.eval_sets(task)
        todo = [epoch for epoch in evaluated_epochs(self.cell.schedule)
                if any(self._read_metrics(d, epoch) is None for d in datasets)]
        if not datasets or not todo:
            return None
        for dataset in datasets:  # a result cut short by an interrupt must not be skipped as done
            for epoch in todo:
                if self._read_metrics(dataset, epoch) is None:
                    self._result_file(dataset, epoch).unlink(missing_ok=True)
        checkpoints = [self.checkpoints / f"epoch_{epoch}.pt" for epoch in todo]
        for path in checkpoints:
            if not path.is_file():
                raise DemoError(f"{path} is gone but its evaluation is not complete: delete {self.dir} to train "
                                f"{self.cell.name} again")
        argv = [clip_benchmark_bin(), "eval", "--model", MODEL, "--pretrained", *map(str, checkpoints),
                "--dataset", *datasets, "--dataset_root", _braces(self.data.root / "eval") + "/{dataset}",
                "--task", task, "--output", _braces(self.eval_dir) + "/{dataset}_{pretrained}.json",
                "--batch_size", "256", "--num_workers", "0", "--seed", "0", "--skip_existing"]
        if task == "zeroshot_retrieval":
            argv += ["--recall_k", "1", "5", "10"]
        if self.runtime.device == "cpu":
            argv.append("--no_amp")
        return task, argv, [(d, e) for d in datasets for e in todo]

    def _run_eval_call(self, call) -> None:
        task, argv, expected = call
        log = self.dir / f"eval-{task}.log"
        code = self.runtime.processes.run(argv, log, child_env(self.runtime.threads))
        incomplete = [(d, e) for d, e in expected if self._read_metrics(d, e) is None]
        if code != 0 or incomplete:
            raise DemoError(f"clip_benchmark failed on {self.cell.name} (exit code {code}; no result for "
                            f"{incomplete}); see {log}:\n{_tail(log)}")

    def finish(self, train_seconds: float, eval_seconds: float) -> dict:
        """Writes result.json (the cell is finished from then on) and drops checkpoints no longer needed."""
        schedule = self.cell.schedule
        per_epoch = steps_per_epoch(self.cell, self.data)
        losses = parse_train_log(self.dir / "out.log", schedule.batch_size)
        datasets = [name.split("/", 1)[1] for name in self.data.manifest["eval"]]
        result = {
            "cell": asdict(self.cell), "method": METHODS[self.cell.method].label, "group": self.cell.group,
            "steps_per_epoch": per_epoch,
            "epochs": [{"epoch": epoch, "step": epoch * per_epoch,
                        "metrics": {d: self._read_metrics(f"wds/{d}", epoch) for d in datasets}}
                       for epoch in evaluated_epochs(schedule)],
            "losses": losses, "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
            "trainer": self.argv[1:],
        }
        text = json.dumps(result, indent=1).encode()
        write_atomically(self.result_path, lambda f: f.write(text))
        for path in self.checkpoints.glob("epoch_*.pt"):  # evaluated: keep only the final weights
            if path.name != f"epoch_{schedule.epochs}.pt":
                path.unlink()
        return result

    def load_result(self) -> dict:
        return json.loads(self.result_path.read_text(encoding="utf-8"))

    def total_steps(self) -> int:
        return steps_per_epoch(self.cell, self.data) * self.cell.schedule.epochs

    def train_stage(self, state: str, bars: "Bars") -> float:
        """train() with its progress bar and messages; state is what prepare() returned."""
        name = self.cell.name
        if state == "finished":
            print(f"    {name}: finished earlier with the same settings ({self.dir}); skipped (--retrain to train "
                  f"again)", flush=True)
            return 0.0
        print(f"    {name}: {'resuming' if state == 'partial' else 'training'} -> {self.dir}", flush=True)
        with bars.bar(name, self.total_steps()) as bar:
            seconds = self.train(bar)
        print(f"    {name}: trained ({self.total_steps()} steps) in {_duration(seconds)}", flush=True)
        return seconds

    def eval_stage(self, state: str, train_seconds: float) -> dict:
        if state == "finished":
            return self.load_result()
        seconds = self.evaluate()
        print(f"    {self.cell.name}: evaluated in {_duration(seconds)}", flush=True)
        return self.finish(train_seconds, seconds)

    def final_checkpoint(self) -> Path:
        return self.checkpoints / f"epoch_{self.cell.schedule.epochs}.pt"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------- scheduling
class Bars:
    """tqdm bars for the cells running at once, one line each."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._lock = threading.Lock()
        self._free = list(range(64))

    @contextlib.contextmanager
    def bar(self, description: str, total: int):
        if not self.enabled:
            yield None
            return
        from tqdm import tqdm
        with self._lock:
            position = self._free.pop(0)
        bar = tqdm(total=total, desc=description, unit="step", position=position, leave=False, dynamic_ncols=True,
                   mininterval=1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s, not 1
        try:
            yield bar
        finally:
            bar.close()
            with self._lock:
                self._free.append(position)
                self._free.sort()


def run_parallel(items, function, jobs: int, processes: Processes) -> list:
    """[function(item) for item in items], `jobs` at a time; the first failure stops the rest (exits their
    children)."""
    results, errors = [None] * len(items), []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(function, item): index for index, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except DemoError as error:
                    errors.append(error)
                    processes.stop_all()
        except KeyboardInterrupt:
            processes.stop_all()
            for future in futures:
                future.cancel()
            raise
    if errors:
        raise errors[0]
    return results


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: on a shared machine, wall time alone says little."""
    import resource
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


class Stages:
    """Prints each stage with its number, name, wall and CPU time."""

    def __init__(self, total: int):
        self.total, self.count, self.timings = total, 0, []
        self.start, self.start_cpu = time.monotonic(), cpu_seconds()

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.count += 1
        print(f"==> [{self.count}/{self.total}] {name}", flush=True)
        start, start_cpu = time.monotonic(), cpu_seconds()
        yield
        seconds, cpu = time.monotonic() - start, cpu_seconds() - start_cpu
        self.timings.append((name, seconds, cpu))
        print(f"    {name}: done in {_duration(seconds)} (CPU time {_duration(cpu)})", flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


# ----------------------------------------------------------------------------------------------- demo mode
def word_list(data: Data) -> list[str]:
    """The distinct words (2+ letters) of every emoji name in this build: the words the models were trained on,
    plus those of the held-out names."""
    words = set()
    for line in (data.root / "emoji.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("split") in ("train", "heldout"):
            words.update(word for word in re.findall(r"[^\W\d_]+", record["name"]) if len(word) > 1)
    return sorted(words)


def run_words(runs: Path, clip: CellRun, superclip: CellRun, data: Data, runtime: Runtime) -> Path:
    """`superclip words` (the paper's appendix A.4) for CLIP (model 1) vs SuperCLIP (model 2)."""
    folder = runs / "words"
    folder.mkdir(parents=True, exist_ok=True)
    words = "\n".join(word_list(data)) + "\n"
    write_atomically(folder / "words.txt", lambda f: f.write(words.encode()))
    argv = [sys.executable, "-m", "open_clip_superclip.words"]
    for run in (clip, superclip):  # relative paths (cwd = runs): the plot labels the models with them
        argv += ["--model", MODEL, "--pretrained", str(run.final_checkpoint().relative_to(runs))]
    argv += ["--images", data.val_data, "--words", str(folder / "words.txt"), "--template", WORD_TEMPLATE,
             "--csv", str(folder / "word_ranking.csv"), "--png", str(folder / "word_ranking.png"),
             "--workers", "0", "--device", runtime.device, "--no-progress"]
    log = folder / "words.log"
    for stale in (log, folder / "word_ranking.csv", folder / "word_ranking.png"):
        stale.unlink(missing_ok=True)
    code = runtime.processes.run(argv, log, child_env(runtime.cores), cwd=runs, stdout_path=folder / "report.txt")
    if code != 0 or not (folder / "word_ranking.csv").is_file():
        raise DemoError(f"superclip words failed (exit code {code}); see {log}:\n{_tail(log)}")
    return folder


def final_metrics(result: dict) -> dict:
    return result["epochs"][-1]["metrics"]


def _value(metrics: dict, dataset: str, metric: str) -> float:
    value = (metrics.get(dataset) or {}).get(metric)
    return float("nan") if value is None else float(value)


def _pct(value: float, signed=False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def table_rows(data: Data) -> list[tuple[str, str]]:
    present = {name.split("/", 1)[1] for name in data.manifest["eval"]}
    return [(dataset, metric) for dataset, metric in TABLE_ROWS if dataset in present]


def demo_table(data: Data, clip: dict, superclip: dict) -> tuple[str, list[dict]]:
    """The markdown table (percent) and its rows as records."""
    records = []
    lines = ["| eval set | metric | chance | CLIP | SuperCLIP | Δ SuperCLIP − CLIP | CLIP ÷ chance |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for dataset, metric in table_rows(data):
        chance = chance_level(data, dataset, metric)
        a, b = _value(final_metrics(clip), dataset, metric), _value(final_metrics(superclip), dataset, metric)
        records.append({"dataset": dataset, "metric": metric, "chance": chance, "clip": a, "superclip": b,
                        "delta": b - a})
        ratio = "n/a" if math.isnan(a) else f"{a / chance:.1f}×"
        lines.append(f"| {DATASET_TITLES[dataset]} (`{dataset}`) | {metric} | {_pct(chance)} | {_pct(a)} | "
                     f"{_pct(b)} | {_pct(b - a, signed=True)} | {ratio} |")
    return "\n".join(lines), records


def _figure(width, height):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def plot_losses(curves: dict) -> bytes:
    """curves: label -> parsed train log. Contrastive loss of every run; class loss where there is one."""
    figure = _figure(11, 4)
    left, right = figure.subplots(1, 2)
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
    return _png(figure)


def plot_metric_bars(records: list[dict]) -> bytes:
    """Horizontal bars per table row, CLIP and SuperCLIP; chance as a black tick."""
    import numpy as np
    figure = _figure(8, 0.45 * len(records) + 1.2)
    axes = figure.subplots()
    rows = np.arange(len(records))
    for k, (label, key) in enumerate((("CLIP", "clip"), ("SuperCLIP", "superclip"))):
        values = [100 * record[key] for record in records]
        axes.barh(rows + (k - 0.5) * 0.4, values, 0.4, label=label, color=f"C{k}")
    chance = [100 * record["chance"] for record in records]
    axes.scatter(chance, rows, marker="|", s=300, color="black", label="chance", zorder=3)
    axes.set_yticks(rows)
    axes.set_yticklabels([f"{r['dataset']}\n{r['metric']}" for r in records], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("%")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    axes.set_title("held-out concepts: CLIP Benchmark metrics")
    return _png(figure)


def attribute_word_ranks(words_csv: Path) -> tuple[int, list[tuple[str, int, int]]]:
    import csv
    with open(words_csv, encoding="utf-8", newline="") as handle:
        rows = {row["word"]: row for row in csv.DictReader(handle)}
    ranks = [(word, int(rows[word]["rank_1"]), int(rows[word]["rank_2"])) for word in ATTRIBUTE_WORDS if word in rows]
    return len(rows), ranks


def top_words(words_csv: Path, column: str, count: int = 20) -> list[str]:
    import csv
    with open(words_csv, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row["word"] for row in sorted(rows, key=lambda row: int(row[column]))[:count]]


def _settings_block(runs: dict, runtime: Runtime) -> list[str]:
    lines = ["Trainer commands (the stock open_clip trainer with this package's flags):", "", "```"]
    for run in runs.values():
        lines.append(" ".join(shlex.quote(a) for a in ["python", *run.argv[1:]]))
    lines += ["```", "",
              f"Device: {runtime.device}, precision {runtime.precision}, {runtime.threads} thread(s) per process, "
              f"{runtime.workers} data worker(s); {runtime.cores} CPU core(s) available."]
    return lines


def _versions() -> str:
    from importlib import metadata
    names = ("torch", "open_clip_torch", "clip_benchmark", "open_clip_superclip")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def write_demo_report(out: Path, mode: Mode, data: Data, runs: dict, results: dict, words: Path, runtime: Runtime,
                      stages: Stages, smoke: bool, reused: list) -> None:
    clip, superclip = results["clip"], results["superclip"]
    table, records = demo_table(data, clip, superclip)
    counts = data.manifest["counts"]
    schedule = mode.cells[0].schedule
    steps = clip["epochs"][-1]["step"]
    above = sum(1 for r in records if r["clip"] > r["chance"])
    twice = sum(1 for r in records if r["clip"] >= 2 * r["chance"])
    word_count, ranks = attribute_word_ranks(words / "word_ranking.csv")
    top_clip, top_super = (top_words(words / "word_ranking.csv", column) for column in ("rank_1", "rank_2"))
    timing_rows = [f"| {name} | {_duration(seconds)} | {_duration(cpu)} |" for name, seconds, cpu in stages.timings]
    title = "CLIP vs SuperCLIP on OpenMoji" + (" (SMOKE run: a few steps on a subset; the numbers mean nothing)"
                                               if smoke else "")
    lines = [
        f"# {title}",
        "",
        f"Written by `superclip demo{' --smoke 1' if smoke else ''}` (`make demo`). Two runs of the stock open_clip "
        f"trainer on the OpenMoji emoji data (`superclip demo-data`, see docs/demo_data.md): "
        f"{counts['train_samples']} training samples from {counts['train_emoji']} emoji, evaluated with "
        f"`clip_benchmark eval` on {counts['heldout_emoji']} emoji of {counts['concepts_heldout']} held-out concepts "
        f"(no skin-tone, gender or direction variant of them was trained on).",
        "",
        f"Both runs: `{MODEL}`, seed {mode.cells[0].seed}, batch {schedule.batch_size}, {steps} steps "
        f"({schedule.epochs} epoch(s) of {schedule.samples_per_epoch or data.num_train} samples), lr {schedule.lr:g} "
        f"cosine with {schedule.warmup:.0%} warmup, weight decay {schedule.wd:g}. The only difference: "
        f"`--superclip-lambda 0` (CLIP: no class head) vs `--superclip-lambda 1` (SuperCLIP).",
        "",
        "## Metrics (%, final checkpoint)",
        "",
        table,
        "",
        f"CLIP beats chance on {above} of {len(records)} metrics, by 2× or more on {twice}. Chance: k/C for top-k "
        f"over C classes, 1/C for mean per-class recall, k/N for image retrieval over N images, "
        f"1 − C(T−m, k)/C(T, k) for text retrieval (m = {len(data.manifest['caption_templates'])} right captions "
        f"among T). One seed: on the probes (a few hundred images) a few points are within run-to-run noise; "
        f"`make experiment` measures it over seeds.",
        "",
        "![metrics](metrics.png)",
        "",
        "## Training curves",
        "",
        "![losses](loss_curves.png)",
        "",
        "| run | steps | final contrastive loss | final class loss | train time |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, result in (("CLIP", clip), ("SuperCLIP", superclip)):
        last = result["losses"][-1] if result["losses"] else {}
        losses = [f"{last[key]:.4f}" if key in last else "–" for key in ("contrastive_loss", "class_loss")]
        lines.append(f"| {label} | {last.get('step', '–')} | {' | '.join(losses)} | "
                     f"{_duration(result['train_seconds'])} |")
    lines += [
        "",
        "## Word-image similarity (paper appendix A.4)",
        "",
        f"`superclip words`: each of the {word_count} words of the emoji names, in the prompt "
        f"\"{WORD_TEMPLATE.format('…')}\", ranked by its mean cosine similarity to the held-out images "
        f"(`{data.val_data}`). Model 1 = CLIP, model 2 = SuperCLIP. Full ranking: "
        f"[word_ranking.csv](word_ranking.csv), printed report: [word_ranking.txt](word_ranking.txt).",
        "",
        "![word ranks](word_ranking.png)",
        "",
        "| word | rank under CLIP | rank under SuperCLIP |",
        "|---|---:|---:|",
        *[f"| {word} | {a} | {b} |" for word, a, b in ranks],
        "",
        "Top 20 words — CLIP: " + ", ".join(top_clip),
        "",
        "Top 20 words — SuperCLIP: " + ", ".join(top_super),
        "",
        "## How this was run",
        "",
        *_settings_block(runs, runtime),
        "",
        f"Evaluation: `clip_benchmark eval --model {MODEL} --pretrained CKPT --dataset "
        f"{' '.join(data.eval_sets('zeroshot_classification'))} --dataset_root '{data.root}/eval/{{dataset}}' "
        f"--task zeroshot_classification` and the same with `--dataset wds/emoji_retrieval --task "
        f"zeroshot_retrieval --recall_k 1 5 10`; raw results in [metrics.csv](metrics.csv).",
        "",
        f"Versions: {_versions()}.",
        "",
        *([f"Reused from an earlier run with the same commands: {', '.join(reused)} (their training and evaluation "
           f"times are those of that run; `--retrain` trains again).", ""] if reused else []),
        "| stage | wall time | CPU time (all processes) |",
        "|---|---:|---:|",
        *timing_rows,
        f"| total (until the report) | {_duration(time.monotonic() - stages.start)} | "
        f"{_duration(cpu_seconds() - stages.start_cpu)} |",
        "",
    ]
    all_rows = _metric_records({"CLIP": clip, "SuperCLIP": superclip})
    with staging_dir(out) as staging:
        (staging / "README.md").write_text("\n".join(lines), encoding="utf-8")
        (staging / "metrics.csv").write_text(_csv(all_rows), encoding="utf-8")
        (staging / "summary.json").write_text(json.dumps({"table": records, "steps": steps}, indent=1),
                                              encoding="utf-8")
        (staging / "metrics.png").write_bytes(plot_metric_bars(records))
        (staging / "loss_curves.png").write_bytes(plot_losses({"CLIP": clip["losses"],
                                                               "SuperCLIP": superclip["losses"]}))
        shutil.copyfile(words / "word_ranking.png", staging / "word_ranking.png")
        shutil.copyfile(words / "word_ranking.csv", staging / "word_ranking.csv")
        shutil.copyfile(words / "report.txt", staging / "word_ranking.txt")


def _metric_records(results: dict) -> list[dict]:
    """Every metric clip_benchmark wrote, per run and evaluated epoch."""
    rows = []
    for label, result in results.items():
        for entry in result["epochs"]:
            for dataset, metrics in entry["metrics"].items():
                for metric, value in (metrics or {}).items():
                    rows.append({"run": label, "cell": result["cell"]["name"], "epoch": entry["epoch"],
                                 "step": entry["step"], "dataset": dataset, "metric": metric, "value": value})
    return rows


def _csv(rows: list[dict]) -> str:
    import csv
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------- experiment mode
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
    return mean, std


def _mean_pm(values: list[float]) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.2f}" + ("" if math.isnan(std) else f" ± {100 * std:.2f}") + f" ({len(values)})"


def plot_curves(data: Data, results: list[dict], batches: list[int]) -> bytes:
    """Metrics against optimizer steps: a row per batch size, a column per metric, a line per method (mean over
    seeds, shaded ± std)."""
    import numpy as np
    rows = [(d, m) for d, m in CURVE_ROWS if f"wds/{d}" in data.manifest["eval"]]
    figure = _figure(3.6 * len(rows), 3.0 * len(batches))
    grid = np.atleast_2d(figure.subplots(len(batches), len(rows), squeeze=False))
    methods = list(dict.fromkeys(r["cell"]["method"] for r in results))
    for i, batch in enumerate(batches):
        for j, (dataset, metric) in enumerate(rows):
            axes = grid[i][j]
            for colour, method in enumerate(methods):
                group = [r for r in results if r["cell"]["method"] == method
                         and r["cell"]["schedule"]["batch_size"] == batch]
                if not group:
                    continue
                steps = [entry["step"] for entry in group[0]["epochs"]]
                values = np.array([[_value(entry["metrics"], dataset, metric) for entry in r["epochs"]]
                                   for r in group]) * 100
                mean = np.nanmean(values, axis=0)
                axes.plot(steps, mean, marker="o", markersize=3, label=f"{METHODS[method].label} ({len(group)})",
                          color=f"C{colour}")
                if len(group) > 1:
                    std = np.nanstd(values, axis=0, ddof=1)
                    axes.fill_between(steps, mean - std, mean + std, alpha=0.15, color=f"C{colour}")
            axes.axhline(100 * chance_level(data, dataset, metric), color="black", linestyle=":", linewidth=1)
            axes.set_title(f"{dataset} {metric}, batch {batch}", fontsize=8)
            axes.set_xlabel("optimizer step", fontsize=7)
            axes.set_ylabel("%", fontsize=7)
            axes.tick_params(labelsize=7)
            axes.grid(alpha=0.3)
            if axes.get_legend_handles_labels()[0]:
                axes.legend(fontsize=6)
    return _png(figure)


def write_experiment_report(out: Path, mode: Mode, data: Data, cell_runs: list[CellRun]) -> None:
    finished = [run for run in cell_runs if run.state() == "finished"]
    results = [run.load_result() for run in finished]
    batches = sorted({cell.schedule.batch_size for cell in mode.cells}, reverse=True)
    groups = list(dict.fromkeys(cell.group for cell in mode.cells))
    rows = table_rows(data)
    by_group = {g: [r for r in results if r["group"] == g] for g in groups}
    group_cell = {cell.group: cell for cell in mode.cells}

    def finals(group, dataset, metric):
        return [_value(final_metrics(r), dataset, metric) for r in by_group[group]]

    header = "| eval set | metric | chance | " + " | ".join(
        f"{METHODS[group_cell[g].method].label}, batch {group_cell[g].schedule.batch_size}" for g in groups) + " |"
    lines = [
        f"# Experiment: CLIP vs SuperCLIP over seeds and batch sizes{' (SMOKE)' if 'smoke' in mode.name else ''}",
        "",
        f"Written by `superclip demo --experiment` (`make experiment`). {len(finished)} of {len(cell_runs)} cells "
        f"finished; rerun to resume, `--cell NAME` (glob patterns allowed) runs some cells only, `--list-cells` "
        f"shows them. Data: the OpenMoji demo set ({data.manifest['counts']['train_samples']} training samples, "
        f"{data.manifest['counts']['heldout_emoji']} held-out emoji). Every cell: `{MODEL}`, the same epochs, lr, "
        f"warmup share and weight decay; batch size, λ, IDF and seed vary as named.",
        "",
        "## Final checkpoint: mean ± std over seeds (%, number of seeds in brackets)",
        "",
        header,
        "|---|---|---:|" + "---:|" * len(groups),
    ]
    for dataset, metric in rows:
        cells = [_mean_pm(finals(g, dataset, metric)) for g in groups]
        lines.append(f"| {dataset} | {metric} | {_pct(chance_level(data, dataset, metric))} | " + " | ".join(cells)
                     + " |")
    if len(batches) == 2:
        big, small = batches
        lines += ["", f"## Small-batch drop: batch {big} minus batch {small} (points, mean over seeds)", "",
                  "Positive: the smaller batch scores lower. The paper's claim: the class loss needs no in-batch "
                  "negatives, so SuperCLIP drops less than CLIP when the batch shrinks.", "",
                  "| eval set | metric | CLIP drop | SuperCLIP drop |", "|---|---|---:|---:|"]
        for dataset, metric in rows:
            drops = []
            for method in ("clip", "superclip"):
                a = _mean_std(finals(f"{method}-b{big}", dataset, metric))[0]
                b = _mean_std(finals(f"{method}-b{small}", dataset, metric))[0]
                drops.append(_pct(a - b, signed=True))
            lines.append(f"| {dataset} | {metric} | {drops[0]} | {drops[1]} |")
    lines += ["", "## Metrics against training steps", "",
              "Mean over the finished seeds (shaded: ± std), dotted: chance. Each run is evaluated every "
              f"{mode.cells[0].schedule.save_every or mode.cells[0].schedule.epochs} epoch(s).", "",
              "![curves](metrics_vs_steps.png)", "", "![losses](loss_curves.png)", "",
              "## Cells", "", "| cell | method | batch | seed | state | train time |", "|---|---|---:|---:|---|---:|"]
    for run in cell_runs:
        state = run.state()
        seconds = next((r["train_seconds"] for r in results if r["cell"]["name"] == run.cell.name), None)
        lines.append(f"| {run.cell.name} | {METHODS[run.cell.method].label} | {run.cell.schedule.batch_size} | "
                     f"{run.cell.seed} | {state} | {_duration(seconds) if seconds else '–'} |")
    lines += ["", "Trainer command of each cell: RUNS/CELL/cell.json; raw metrics per evaluated epoch: "
              "[metrics.csv](metrics.csv).", "", f"Versions: {_versions()}.", ""]
    curves = {}
    for group in groups:
        if by_group[group]:
            curves[f"{METHODS[group_cell[group].method].label}, b{group_cell[group].schedule.batch_size}"] = \
                by_group[group][0]["losses"]
    with staging_dir(out) as staging:
        (staging / "README.md").write_text("\n".join(lines), encoding="utf-8")
        (staging / "metrics.csv").write_text(_csv(_metric_records({r["cell"]["name"]: r for r in results})),
                                             encoding="utf-8")
        (staging / "metrics_vs_steps.png").write_bytes(plot_curves(data, results, batches))
        (staging / "loss_curves.png").write_bytes(plot_losses(curves))


# ------------------------------------------------------------------------------------------------- running
def detect_runtime(jobs: Optional[int], workers: int, progress: bool) -> Runtime:
    import torch
    cuda = torch.cuda.is_available()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Runtime(device="cuda" if cuda else "cpu", precision="amp_bf16" if cuda else "fp32", workers=workers,
                   jobs=jobs or (2 if cores >= 2 or cuda else 1), cores=cores, progress=progress)


def run_cells(cell_runs: list[CellRun], runtime: Runtime, retrain: bool, on_finished=None) -> None:
    """Trains then evaluates each cell, `runtime.jobs` cells at a time; on_finished(run) after each."""
    lock, bars = threading.Lock(), Bars(runtime.progress)

    def one(run: CellRun):
        state = run.prepare(retrain)
        run.eval_stage(state, run.train_stage(state, bars))
        if on_finished and state != "finished":
            with lock:
                on_finished(run)

    run_parallel(cell_runs, one, runtime.jobs, runtime.processes)


def mode_subsets(mode: Mode) -> set:
    return {cell.schedule.samples_per_epoch for cell in mode.cells}


def select_cells(mode: Mode, patterns: list[str]) -> list[Cell]:
    if not patterns:
        return list(mode.cells)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(cell.name, p) for cell in mode.cells)]
    if unmatched:
        raise DemoError(f"--cell {', '.join(unmatched)} matches no cell of the {mode.name}; the cells: "
                        f"{', '.join(cell.name for cell in mode.cells)}")
    return [cell for cell in mode.cells if any(fnmatch.fnmatchcase(cell.name, p) for p in patterns)]


def run_demo(args, mode: Mode, runtime: Runtime) -> int:
    stages = Stages(5)
    bars = Bars(runtime.progress)
    runs_dir = Path(args.runs or mode.runs).absolute()
    out = Path(args.out or mode.report).absolute()
    with stages("data: OpenMoji images + CLDR names (superclip demo-data)"):
        data = ensure_data(Path(args.data or mode.data_dir), mode.data, mode_subsets(mode))
        print(f"    {data.root}: {data.num_train} training samples; eval sets {', '.join(data.manifest['eval'])}",
              flush=True)
    runs = {cell.name: CellRun(cell, data, runs_dir, runtime) for cell in mode.cells}
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
        write_demo_report(out, mode, data, runs, results, words, runtime, stages, bool(args.smoke), reused)
    table, _ = demo_table(data, results["clip"], results["superclip"])
    print(f"\n{table}\n\nreport: {out / 'README.md'} (total {_duration(time.monotonic() - stages.start)})",
          flush=True)
    return 0


def run_experiment(args, mode: Mode, runtime: Runtime) -> int:
    selected = select_cells(mode, args.cell)
    data = ensure_data(Path(args.data or mode.data_dir), mode.data, mode_subsets(mode))
    runs_dir = Path(args.runs or mode.runs).absolute()
    out = Path(args.out or mode.report).absolute()
    all_runs = [CellRun(cell, data, runs_dir, runtime) for cell in mode.cells]
    if args.list_cells:
        for run in all_runs:
            print(f"{run.cell.name:<26} {run.state():<9} {METHODS[run.cell.method].label}, batch "
                  f"{run.cell.schedule.batch_size}, seed {run.cell.seed}")
        return 0
    chosen = [run for run in all_runs if run.cell in selected]
    todo = [run for run in chosen if args.retrain or run.state() != "finished"]
    print(f"==> {mode.name}: {len(chosen)} cell(s) selected, {len(chosen) - len(todo)} finished earlier, "
          f"{len(todo)} to run, {runtime.jobs} at a time with {runtime.threads} thread(s) each -> {runs_dir}",
          flush=True)
    start = time.monotonic()
    run_cells(chosen, runtime, args.retrain,  # the report follows every finished cell: a long run can be stopped
              on_finished=lambda run: write_experiment_report(out, mode, data, all_runs))
    if not todo:
        write_experiment_report(out, mode, data, all_runs)
    finished = sum(run.state() == "finished" for run in all_runs)
    print(f"==> {finished} of {len(all_runs)} cells finished; report: {out / 'README.md'} "
          f"({_duration(time.monotonic() - start)})", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="superclip demo",
        description="Train tiny CLIP and SuperCLIP on the OpenMoji demo data with the stock open_clip trainer, "
                    "benchmark both with clip_benchmark, rank words, and write demo_report/. With --experiment: "
                    "3 seeds x {CLIP, SuperCLIP} x batch {256, 32} plus the lambda and IDF ablations, resumable.")
    parser.add_argument("--smoke", type=int, choices=(0, 1), default=0,
                        help="1: the whole pipeline on a 30-concept subset with a few steps (CI); default 0")
    parser.add_argument("--experiment", action="store_true", help="run the experiment grid instead of the demo")
    parser.add_argument("--cell", action="append", default=[], metavar="NAME",
                        help="experiment: run only this cell (glob patterns allowed, repeatable)")
    parser.add_argument("--list-cells", action="store_true", help="experiment: list the cells and their state")
    parser.add_argument("--data", help="dataset folder (default demo_data/emoji, smoke: demo_data/emoji-smoke)")
    parser.add_argument("--runs", help="training runs folder (default demo_runs or experiment_runs)")
    parser.add_argument("--out", help="report folder (default demo_report or experiment_report)")
    parser.add_argument("--jobs", type=int, help="runs at a time (default 2; each gets cores/jobs threads)")
    parser.add_argument("--workers", type=int, default=1, help="data loader workers per run (default 1)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a run finished earlier")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.cell or args.list_cells) and not args.experiment:
        parser.error("--cell and --list-cells select experiment cells: add --experiment")
    if args.jobs is not None and args.jobs < 1 or args.workers < 1:
        parser.error("--jobs and --workers must be >= 1")
    mode = get_mode(args.experiment, bool(args.smoke))
    try:
        select_cells(mode, args.cell)
    except DemoError as error:
        parser.error(str(error))
    runtime = detect_runtime(args.jobs, args.workers, not args.no_progress)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a job scheduler's stop: like Ctrl-C
    try:
        return (run_experiment if args.experiment else run_demo)(args, mode, runtime)
    except DemoError as error:
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


if __name__ == "__main__":
    sys.exit(main())
