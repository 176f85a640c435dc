"""Running cells: the stock trainer and `clip_benchmark eval` as child processes, resumable, some at a time.

A cell lives in RUNS/NAME: the trainer's own folder (out.log, params.txt, checkpoints/) plus cell.json (its
identity: the cell, the exact command, the data; a different identity starts the cell over), eval/
(clip_benchmark's JSON per dataset and checkpoint) and result.json, written last: a cell with a result.json for
the same identity is finished and skipped. An interrupted cell resumes from its last whole epoch
(`--resume latest` with `--save-most-recent`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from open_clip_superclip.atomic import write_atomically

from .._clip_benchmark import clip_benchmark_bin, eval_argv, literal_braces
from .cells import METHODS, MODEL, Cell
from .data import Data

TASKS = ("zeroshot_classification", "zeroshot_retrieval")
RECALL_K = (1, 5, 10)  # retrieval recall@k, for k up to the number of images (clip_benchmark fails beyond)
TRAIN_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\s*(\d+) ")
LOSS_VALUE = re.compile(r"(\w+_loss|Loss): ([0-9.eE+-]+|nan|inf) \(")


class DemoError(RuntimeError):
    """A stage that failed; the message says where its log is."""


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


def detect_runtime(jobs: Optional[int], workers: int, progress: bool) -> Runtime:
    import torch
    cuda = torch.cuda.is_available()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Runtime(device="cuda" if cuda else "cpu", precision="amp_bf16" if cuda else "fp32", workers=workers,
                   jobs=jobs or (2 if cores >= 2 or cuda else 1), cores=cores, progress=progress)


def steps_per_epoch(cell: Cell, data: Data) -> int:
    """open_clip's CSV loader drops the last partial batch."""
    return min(cell.schedule.samples_per_epoch or data.num_train, data.num_train) // cell.schedule.batch_size


def trainer_argv(cell: Cell, data: Data, runs: Path, runtime: Runtime, init: Optional[Path] = None) -> list:
    s, method = cell.schedule, METHODS[cell.method]
    total = steps_per_epoch(cell, data) * s.epochs
    argv = [sys.executable, "-m", "training.main", "--model", MODEL, "--superclip-lambda", f"{method.lam:g}"]
    if method.idf:
        argv += ["--superclip-idf", method.idf]
    argv += [*method.flags, "--train-data", str(data.csv[s.samples_per_epoch]), "--dataset-type", "csv",
             "--batch-size", str(s.batch_size), "--epochs", str(s.epochs), "--lr", f"{s.lr:g}", "--wd", f"{s.wd:g}",
             "--warmup", str(max(1, round(s.warmup * total))), "--seed", str(cell.seed),
             "--workers", str(runtime.workers), "--precision", runtime.precision, "--device", runtime.device,
             "--logs-dir", str(runs), "--name", cell.name, "--save-frequency", str(s.save_every),
             "--save-most-recent", "--resume", "latest", "--log-every-n-steps", str(max(1, total // 100)),
             "--report-to", ""]
    if init is not None:
        argv += ["--pretrained", str(init)]
    return argv


def evaluated_epochs(cell: Cell) -> list:
    every, epochs = cell.schedule.save_every, cell.schedule.epochs
    return sorted((set(range(every, epochs + 1, every)) if every else set()) | {epochs})


def parse_train_log(out_log: Path, batch_size: int) -> list:
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


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


class CellRun:
    """One cell's folder, its state, and its stages."""

    def __init__(self, cell: Cell, data: Data, runs: Path, runtime: Runtime, source: Optional[Cell] = None):
        """source: the cell named by ``cell.init``, whose final weights this one starts from."""
        self.cell, self.data, self.runs, self.runtime, self.source = cell, data, runs, runtime, source
        self.dir = runs / cell.name
        self.checkpoints = self.dir / "checkpoints"
        self.eval_dir = self.dir / "eval"
        self.result_path = self.dir / "result.json"
        init = None if source is None else runs / source.name / "checkpoints" / f"epoch_{source.schedule.epochs}.pt"
        self.argv = trainer_argv(cell, data, runs, runtime, init)
        self.identity = {"cell": asdict(self.cell), "trainer": self.argv[1:], "data": data.fingerprint()}

    # state ---------------------------------------------------------------------------------------------
    def _saved_identity(self):
        try:
            return json.loads((self.dir / "cell.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def state(self) -> str:
        """finished / partial (resumable) / stale (other settings) / foreign (not ours) / new."""
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
            text = json.dumps(self.identity, indent=1).encode()
            write_atomically(self.dir / "cell.json", lambda f: f.write(text))
        return state

    # stages --------------------------------------------------------------------------------------------
    def train(self, bar=None) -> float:
        """Runs (or resumes) the trainer; returns its wall time, as recorded if it had finished earlier."""
        trained = self.dir / "trained.json"
        if trained.is_file():
            return json.loads(trained.read_text(encoding="utf-8"))["seconds"]
        total, out_log = self.total_steps(), self.dir / "out.log"

        def poll():
            if bar is not None:
                logged = parse_train_log(out_log, self.cell.schedule.batch_size)
                bar.update((min(total, logged[-1]["step"]) if logged else 0) - bar.n)  # redrawn per mininterval

        start = time.monotonic()
        code = self.runtime.processes.run(self.argv, self.dir / "trainer.log", child_env(self.runtime.threads),
                                          poll=poll)
        if code != 0 or not self.final_checkpoint().is_file():
            raise DemoError(f"training {self.cell.name} failed (exit code {code}); see {self.dir / 'trainer.log'} "
                            f"and {out_log}:\n{tail(self.dir / 'trainer.log')}")
        seconds = time.monotonic() - start
        (self.checkpoints / "epoch_latest.pt").unlink(missing_ok=True)  # the same state as the final epoch
        text = json.dumps({"seconds": round(seconds, 1)}).encode()
        write_atomically(trained, lambda f: f.write(text))
        return seconds

    def _result_file(self, dataset: str, epoch: int) -> Path:
        return self.eval_dir / f"{dataset.split('/', 1)[1]}_epoch_{epoch}.pt.json"

    def read_metrics(self, dataset: str, epoch: int) -> Optional[dict]:
        try:
            return json.loads(self._result_file(dataset, epoch).read_text(encoding="utf-8"))["metrics"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def evaluate(self) -> float:
        """clip_benchmark eval over every evaluated epoch: one call per task (the two side by side), results
        already on disk kept."""
        self.eval_dir.mkdir(exist_ok=True)
        start = time.monotonic()
        calls = [call for call in map(self._eval_call, TASKS) if call]
        run_parallel(calls, self._run_eval_call, len(calls), self.runtime.processes)
        return time.monotonic() - start

    def _eval_call(self, task: str):
        """(task, argv, [(dataset, epoch) it must produce]) or None when every result of the task is on disk."""
        datasets = self.data.eval_sets(task)
        todo = [epoch for epoch in evaluated_epochs(self.cell)
                if any(self.read_metrics(d, epoch) is None for d in datasets)]
        if not datasets or not todo:
            return None
        for dataset in datasets:  # a result cut short by an interrupt must not be skipped as done
            for epoch in todo:
                if self.read_metrics(dataset, epoch) is None:
                    self._result_file(dataset, epoch).unlink(missing_ok=True)
        checkpoints = [self.checkpoints / f"epoch_{epoch}.pt" for epoch in todo]
        for path in checkpoints:
            if not path.is_file():
                raise DemoError(f"{path} is gone but its evaluation is not complete: delete {self.dir} to train "
                                f"{self.cell.name} again")
        smallest = min(self.data.manifest["eval"][d]["num_images"] for d in datasets)
        argv = [clip_benchmark_bin(), "eval", *eval_argv(
            MODEL, checkpoints, datasets, literal_braces(self.data.root / "eval") + "/{dataset}", task,
            literal_braces(self.eval_dir) + "/{dataset}_{pretrained}.json", no_amp=self.runtime.device == "cpu",
            recall_k=[k for k in RECALL_K if k <= smallest], extra=("--seed", "0", "--skip_existing"))]
        return task, argv, [(d, e) for d in datasets for e in todo]

    def _run_eval_call(self, call) -> None:
        task, argv, expected = call
        log = self.dir / f"eval-{task}.log"
        code = self.runtime.processes.run(argv, log, child_env(self.runtime.threads))
        incomplete = [(d, e) for d, e in expected if self.read_metrics(d, e) is None]
        if code != 0 or incomplete:
            raise DemoError(f"clip_benchmark failed on {self.cell.name} (exit code {code}; no result for "
                            f"{incomplete}); see {log}:\n{tail(log)}")

    def finish(self, train_seconds: float, eval_seconds: float) -> dict:
        """Writes result.json (the cell is finished from then on) and drops checkpoints no longer needed."""
        schedule = self.cell.schedule
        per_epoch = steps_per_epoch(self.cell, self.data)
        datasets = [name.split("/", 1)[1] for name in self.data.manifest["eval"]]
        result = {
            "cell": asdict(self.cell), "method": METHODS[self.cell.method].label, "group": self.cell.group,
            "steps_per_epoch": per_epoch,
            "epochs": [{"epoch": epoch, "step": epoch * per_epoch,
                        "metrics": {d: self.read_metrics(f"wds/{d}", epoch) for d in datasets}}
                       for epoch in evaluated_epochs(self.cell)],
            "losses": parse_train_log(self.dir / "out.log", schedule.batch_size),
            "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
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

    def final_checkpoint(self) -> Path:
        return self.checkpoints / f"epoch_{self.cell.schedule.epochs}.pt"

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
        print(f"    {name}: trained ({self.total_steps()} steps) in {duration(seconds)}", flush=True)
        return seconds

    def eval_stage(self, state: str, train_seconds: float) -> dict:
        if state == "finished":
            return self.load_result()
        seconds = self.evaluate()
        print(f"    {self.cell.name}: evaluated in {duration(seconds)}", flush=True)
        return self.finish(train_seconds, seconds)


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

    def stopping_on_failure(item):
        try:
            return function(item)
        except DemoError:
            processes.stop_all()  # here, before this worker thread takes the next item, not later in the caller
            raise

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(stopping_on_failure, item): index for index, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except DemoError as error:
                    errors.append(error)
                except KeyboardInterrupt:
                    if not errors:
                        raise
                    # stopped because another item failed: that failure is the one to report
        except KeyboardInterrupt:
            processes.stop_all()
            for future in futures:
                future.cancel()
            raise
    if errors:
        raise errors[0]
    return results


def wait_for_source(run: CellRun, scheduled: set, processes: Processes, poll_seconds: float = 2.0) -> None:
    """A fine-tuning cell starts from another cell's final weights: waits until that cell has finished."""
    source = run.source.name
    while not (run.runs / source / "result.json").is_file():
        if source not in scheduled:
            raise DemoError(f"{run.cell.name} starts from {source}, which has not finished and is not selected: "
                            f"run it first (--cell {source})")
        if processes.stopping:
            raise DemoError(f"{run.cell.name}: not started: the run is stopping")
        time.sleep(poll_seconds)


def run_cells(cell_runs: list, runtime: Runtime, retrain: bool, on_finished=None) -> None:
    """Trains then evaluates each cell, `runtime.jobs` cells at a time; on_finished(run) after each."""
    lock, bars = threading.Lock(), Bars(runtime.progress)
    scheduled = {run.cell.name for run in cell_runs}

    def one(run: CellRun):
        if runtime.processes.stopping:  # queued behind a failure or an interrupt: do not start
            return
        if run.source is not None:
            wait_for_source(run, scheduled, runtime.processes)
        state = run.prepare(retrain)
        run.eval_stage(state, run.train_stage(state, bars))
        if on_finished and state != "finished":
            with lock:
                on_finished(run)

    run_parallel(cell_runs, one, runtime.jobs, runtime.processes)


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
        print(f"    {name}: done in {duration(seconds)} (CPU time {duration(cpu)})", flush=True)
