"""Running work units in this process or in a process pool, with a progress bar and errors that name the shard.

Why one runner: `superclip idf` and `superclip cooccur` both fan shards out to workers and must stop at the
first failing shard, saying which one, without pickling anything that a worker cannot send back.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from .sources import Unit

_PROGRESS_QUEUE = None  # in a worker: where it reports captions done


def _worker_init(queue) -> None:
    """In each worker: the queue its tasks report progress to (a bar cannot cross processes)."""
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = queue


def _report_from_worker(n: int) -> None:
    if _PROGRESS_QUEUE is not None and n:
        _PROGRESS_QUEUE.put(n)


def _guarded(task, unit: Unit):
    """Run task in a worker; return errors as strings so nothing unpicklable crosses processes."""
    try:
        return "ok", task(unit, _report_from_worker)
    except BaseException as e:  # noqa: BLE001 - reported with the shard's name
        return "error", f"{type(e).__name__}: {e}"


class UnitFailure(Exception):
    """One or more units failed; message names each failing shard with its error."""

    def __init__(self, errors: List[Tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{u}: {e}" for u, e in errors))


def _mp_context():
    """fork where there is one: workers inherit the tokenizer and the ftfy gate, built once before the pool."""
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def _progress_bar(desc: str, enabled: bool):
    from tqdm import tqdm

    class _Bar(tqdm):
        monitor_interval = 0  # no monitor thread: worker processes are forked while the bar lives

    return _Bar(desc=desc, unit="cap", unit_scale=True, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5)


class _Progress:
    """The bar (captions) and its 'shards done/total' postfix."""

    def __init__(self, bar, total: int, position_info: str):
        self.bar = bar
        self.total = total
        self.done = 0
        self.info = position_info
        self.show()

    def show(self) -> None:
        self.bar.set_postfix_str(f"shards {self.done}/{self.total}{self.info}", refresh=False)


def _drain(queue, bar) -> None:
    """Move the captions the workers reported onto the bar."""
    try:
        while True:
            bar.update(queue.get_nowait())
    except Exception:  # noqa: BLE001 - queue.Empty
        pass


def _run_in_process(units: Sequence[Unit], task: Callable, on_result: Callable, progress: _Progress,
                    errors: List[Tuple[str, str]], limit: Optional[int], count_of: Optional[Callable]) -> None:
    """Units in order in this process; with a limit, each task gets limit=<captions still wanted>."""
    remaining = None if limit is None else int(limit)
    for i, u in enumerate(units):
        if remaining is not None and remaining <= 0:
            break
        try:
            if remaining is None:
                result = task(u, progress.bar.update)
            else:
                result = task(u, progress.bar.update, limit=remaining)
        except Exception as e:  # noqa: BLE001
            errors.append((u.label, f"{type(e).__name__}: {e}"))
            break
        on_result(i, result)
        if remaining is not None:
            remaining -= count_of(result)
        progress.done += 1
        progress.show()


def _collect(fut, i: int, units: Sequence[Unit], on_result: Callable, progress: _Progress,
             errors: List[Tuple[str, str]]) -> None:
    """Hand a finished worker's result to on_result, or record its error under the unit's label."""
    try:
        status, value = fut.result()
    except Exception as e:  # noqa: BLE001 - e.g. a worker killed by the OOM killer
        status, value = "error", f"worker process died ({type(e).__name__}: {e})"
    if status == "ok":
        on_result(i, value)
        progress.done += 1
    else:
        errors.append((units[i].label, value))


def _run_in_pool(units: Sequence[Unit], task: Callable, on_result: Callable, jobs: int, progress: _Progress,
                 errors: List[Tuple[str, str]]) -> None:
    """Units in a pool of min(jobs, units) forked workers; the first error cancels what has not started."""
    ctx = _mp_context()
    queue = ctx.Queue()
    with cf.ProcessPoolExecutor(
        max_workers=min(jobs, len(units)), mp_context=ctx, initializer=_worker_init, initargs=(queue,)
    ) as pool:
        futs = {pool.submit(_guarded, task, u): i for i, u in enumerate(units)}
        pending = set(futs)
        try:
            while pending and not errors:
                finished, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                _drain(queue, progress.bar)
                for fut in finished:
                    _collect(fut, futs[fut], units, on_result, progress, errors)
                progress.show()
        finally:
            for fut in pending:
                fut.cancel()
            _drain(queue, progress.bar)
    _drain(queue, progress.bar)
    queue.close()


def run_units(
    units: Sequence[Unit],
    task: Callable,
    on_result: Callable[[int, object], None],
    jobs: int = 1,
    desc: str = "captions",
    progress: bool = True,
    position_info: str = "",
    limit: Optional[int] = None,
    count_of: Optional[Callable[[object], int]] = None,
) -> None:
    """Run task(unit, report) over units, in-process (jobs<=1) or in a process pool.

    Each result goes to on_result(unit_index, result) as it arrives, so nothing per-shard piles up.
    task must be picklable (a module-level function or a functools.partial of one). The first
    failure stops the run and raises UnitFailure naming the shard(s). With `limit`, units run in
    order in this process, task gets limit=<captions still wanted>, and count_of(result) says how
    many captions a result used.
    """
    bar = _progress_bar(desc, progress)
    errors: List[Tuple[str, str]] = []
    try:
        shown = _Progress(bar, len(units), position_info)
        if limit is not None or jobs <= 1 or len(units) <= 1:
            _run_in_process(units, task, on_result, shown, errors, limit, count_of)
        else:
            _run_in_pool(units, task, on_result, jobs, shown, errors)
    finally:
        bar.close()
    if errors:
        raise UnitFailure(errors)
