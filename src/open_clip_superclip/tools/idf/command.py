"""`superclip idf`: the command line, the per-unit counting task, and writing the counts file.

See docs/idf.md. Exit status: 0 written, 1 a unit failed or the file could not be written (nothing
written), 2 a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...atomic import local_output_path
from ...idf_counts import merge_idf_counts, save_idf_counts, tokenizer_identity, tokenizer_vocab_size
from .captions import iter_caption_batches
from .cleaning import ftfy_gate
from .counter import COUNT_BATCH, DocFreqCounter
from .distributed import all_reduce_counts, destroy_process_group, dist_env, with_rank0_status
from .parallel import UnitFailure, run_units
from .sources import CaptionKey, ReadStats, Unit, expand_inputs, make_units
from .tokenizer import get_tokenizer

TOOL = "open_clip_superclip.tools.idf"  # recorded in the file's meta
_COUNTERS: Dict[Tuple[str, int], DocFreqCounter] = {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="superclip idf",
        description="Count token document frequencies (IDF statistics) over a caption corpus, "
        "or merge counts files. See docs/idf.md.",
    )
    p.add_argument("inputs", nargs="*", help="webdataset shards (braceexpand patterns, local paths, fsspec URLs, "
                   "pipe:CMD), CSV/TSV files, or with --merge: counts files to sum")
    p.add_argument("-o", "--output", required=True, help="output counts file (.npz), written atomically")
    p.add_argument("--merge", action="store_true", help="sum the counts files given as inputs")
    p.add_argument("--model", default="", help="open_clip model whose tokenizer to use (default: CLIP BPE)")
    p.add_argument("--key", default="txt", help="caption member of a webdataset sample: txt (default), another "
                   "extension, or json:FIELD for a field of the json member")
    p.add_argument("--csv-key", default="title", help="caption column of CSV/TSV inputs (default: title, as open_clip)")
    p.add_argument("--csv-separator", default=None, help="CSV separator (default: ',' for .csv, tab for .tsv)")
    p.add_argument("--input-format", choices=("auto", "wds", "csv", "tsv"), default="auto",
                   help="input type; auto decides by file extension")
    p.add_argument("-j", "--jobs", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument("--limit", type=int, default=None, help="stop after N captions (sequential, rank 0 only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dist-backend", default="gloo", choices=("gloo", "nccl"),
                   help="torch.distributed backend under torchrun (default gloo)")
    p.add_argument("--dist-timeout", type=float, default=86400.0,
                   help="seconds a rank waits for the others at the final all_reduce (default 86400)")
    p.add_argument("--word-cache", dest="max_word_cache", type=int, default=500_000, metavar="N",
                   help="distinct words whose token ids each process keeps (default 500000, ~75 MB)")
    return p


def _process_counter(model: str, max_cache: int) -> DocFreqCounter:
    """One counter per process and tokenizer, so the word cache stays warm from shard to shard."""
    k = (model, max_cache)
    if k not in _COUNTERS:
        _COUNTERS[k] = DocFreqCounter(get_tokenizer(model), max_cache=max_cache)
    return _COUNTERS[k]


def count_unit(
    unit: Unit,
    report: Callable[[int], None],
    model: str,
    key: CaptionKey,
    csv_key: str,
    limit: Optional[int] = None,
    max_cache: int = 500_000,
):
    """Document frequencies of one unit: (doc_freq int64 [V], captions, samples, missing)."""
    counter = _process_counter(model, max_cache)
    counter.reset()
    stats = ReadStats()
    batches = iter_caption_batches(unit, key, csv_key, stats)
    wanted = limit
    try:
        pending: List[str] = []
        for batch in batches:
            if wanted is not None:
                batch = batch[:wanted]
                wanted -= len(batch)
            pending.extend(batch)
            if len(pending) >= COUNT_BATCH or wanted == 0:
                report(counter.add_many(pending))
                pending = []
            if wanted == 0:
                break
        report(counter.add_many(pending))
    finally:
        batches.close()
    df, n = counter.result()
    out = (df.copy(), n, stats.samples, stats.missing)
    counter.reset()
    return out


@dataclasses.dataclass
class _Run:
    """One counting run on this rank. Its vector: doc_freq [vocab], then captions, samples, missing, failed."""

    args: argparse.Namespace
    units: List[Unit]
    rank: int
    world: int
    local_rank: int
    jobs: int
    vocab: int
    ident: str
    t0: float

    @property
    def mine(self) -> List[Unit]:
        """This rank's units: every world-th; with --limit, all of them on rank 0."""
        if self.args.limit is not None:
            return self.units if self.rank == 0 else []
        return self.units[self.rank :: self.world]


def _usage_error(e) -> int:
    print(f"superclip idf: error: {e}", file=sys.stderr)
    return 2


def _merge(args: argparse.Namespace) -> int:
    """--merge: rank 0 sums the counts files given as inputs."""
    if dist_env()[0] != 0:
        return 0  # under a launcher, rank 0 alone merges
    try:
        n, v = merge_idf_counts(args.inputs, args.output)
    except ValueError as e:
        print(f"superclip idf --merge: error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(args.inputs)} files: {n} captions, vocab {v} -> {args.output}")
    return 0


def _prepare(args: argparse.Namespace, urls: List[str]) -> _Run:
    """The units and tokenizer of a run; the tokenizer and ftfy gate are built before forking, for the workers."""
    rank, world, local_rank = dist_env()
    jobs = 1 if args.limit is not None else max(1, args.jobs)
    units = make_units(urls, args.input_format, csv_parts=world * jobs if args.limit is None else 1,
                       csv_sep=args.csv_separator)
    tok = get_tokenizer(args.model)
    ftfy_gate()
    return _Run(args, units, rank, world, local_rank, jobs, tokenizer_vocab_size(tok), tokenizer_identity(tok),
                time.time())


def _count_mine(run: _Run, key: CaptionKey) -> Tuple[np.ndarray, List[str]]:
    """This rank's counts vector and error messages (the run goes on to the all-reduce either way)."""
    args, vocab = run.args, run.vocab
    vec = np.zeros(vocab + 4, dtype=np.int64)

    def add(_i, result) -> None:
        df, n, samples, missing = result
        vec[:vocab] += df
        vec[vocab] += n
        vec[vocab + 1] += samples
        vec[vocab + 2] += missing

    errors: List[str] = []
    try:
        task = functools.partial(count_unit, model=args.model, key=key, csv_key=args.csv_key,
                                 max_cache=args.max_word_cache)
        info = f" rank 0 of {run.world}" if run.world > 1 else ""
        run_units(run.mine, task, add, run.jobs, desc="idf", progress=not args.no_progress and run.rank == 0,
                  position_info=info, limit=args.limit, count_of=lambda r: r[1])
    except UnitFailure as e:
        errors = [f"{u}: {msg}" for u, msg in e.errors]
    except Exception as e:  # noqa: BLE001 - anything else must still reach the all_reduce
        errors = [f"{type(e).__name__}: {e}"]
    if errors:
        vec[vocab + 3] = 1
        for msg in errors:
            print(f"superclip idf: rank {run.rank}: failed: {msg}" if run.world > 1 else f"superclip idf: failed: {msg}",
                  file=sys.stderr, flush=True)
    return vec, errors


def _report_failure(run: _Run, failed: int, all_errors: List[Optional[List[str]]]) -> int:
    """Rank 0 repeats every rank's errors; status 1."""
    if run.rank == 0:
        for r, errs in enumerate(all_errors):
            for msg in errs or []:
                where = f" (rank {r})" if run.world > 1 else ""
                print(f"superclip idf: error{where}: {msg}", file=sys.stderr)
        print(f"superclip idf: {failed} rank(s)/run(s) failed; {run.args.output} was NOT written", file=sys.stderr)
    return 1


def _write(run: _Run, vec: np.ndarray) -> int:
    """Rank 0 writes the counts file and says what it counted; status 0, or 1 if it cannot write."""
    args, vocab = run.args, run.vocab
    n = int(vec[vocab])
    meta = {
        "tool": TOOL,
        "inputs": list(args.inputs),
        "num_units": len(run.units),
        "key": args.key,
        "csv_key": args.csv_key,
        "model": args.model,
        "limit": args.limit,
        "samples": int(vec[vocab + 1]),
        "samples_missing_caption": int(vec[vocab + 2]),
        "world_size": run.world,
        "jobs": run.jobs,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        save_idf_counts(args.output, vec[:vocab], n, run.ident, meta)
    except (OSError, ValueError) as e:
        print(f"superclip idf: error writing {args.output}: {e}", file=sys.stderr)
        return 1
    dt = max(time.time() - run.t0, 1e-9)
    miss = int(vec[vocab + 2])
    print(
        f"superclip idf: {n} captions from {len(run.units)} unit(s) in {dt:.1f}s ({n / dt:,.0f} captions/s); "
        f"{int(np.count_nonzero(vec[:vocab]))} distinct tokens; "
        f"{miss} sample(s) without caption; wrote {args.output}"
    )
    return 0


def _count(args: argparse.Namespace, key: CaptionKey, urls: List[str]) -> int:
    """Count this rank's units, sum over ranks, and let rank 0 write the file (or report every failure)."""
    run = _prepare(args, urls)
    vec, errors = _count_mine(run, key)
    all_errors: List[Optional[List[str]]] = [errors]
    own_pg = False
    if run.world > 1:
        vec, all_errors, own_pg = all_reduce_counts(vec, errors, args.dist_backend, args.dist_timeout, run.local_rank)
    failed = int(vec[run.vocab + 3])
    status = 0
    try:
        if failed:
            status = _report_failure(run, failed, all_errors)
        elif run.rank == 0:
            status = _write(run, vec)
        if run.world > 1:
            status = with_rank0_status(status)
    finally:
        if own_pg:
            destroy_process_group()
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`superclip idf ARGS`; returns the exit status (0, 1 or 2: see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        args.output = local_output_path(args.output, "-o")
    except ValueError as e:
        return _usage_error(e)
    if args.merge:
        return _merge(args)
    if not args.inputs:
        return _usage_error("no inputs given")
    try:
        key = CaptionKey.parse(args.key)
        urls = expand_inputs(args.inputs)
    except ValueError as e:
        return _usage_error(e)
    return _count(args, key, urls)
