"""The single caption reader shared by `superclip idf` and `superclip cooccur`: a unit -> lists of captions.

Shards go through small stages, as webdataset's tariterators.py does: open the stream (sources.open_stream),
its members in runs (tar_reader.iter_tar_runs), the captions of each run, and a tally of samples without one.
Errors are raised, not handled here: a shard that cannot be read stops the run, and the runner
(parallel.run_units) names it.
"""

from __future__ import annotations

import itertools
import json
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .members import TarRun, split_member_name
from .sources import CaptionKey, ReadStats, Unit, iter_csv_batches, open_stream
from .tar_reader import iter_tar_runs


def _json_field(obj, field: str):
    """obj[field], else the dotted path field (a.b.c) into nested objects; None where absent."""
    if isinstance(obj, dict) and field in obj:
        return obj[field]
    cur = obj
    for part in field.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return None
    return cur


def _captions_of_value(value, where: str) -> List[str]:
    """A caption field's captions: none, one string, or a list of strings; anything else is an error."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError(f"{where}: caption field is {type(value).__name__}, expected a string or list of strings")


def _decode_captions(run: TarRun, ext: str) -> List[str]:
    """The wanted members as UTF-8 text; on failure, an error naming the first sample that is not."""
    try:
        return [d.decode("utf-8") for d in run.datas]
    except UnicodeDecodeError:
        for d, name in zip(run.datas, itertools.compress(run.names(), run.wanted)):
            try:
                d.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"sample {split_member_name(name)[0]!r}: {ext} member is not UTF-8 ({e})") from None
        raise


def _json_captions(run: TarRun, field: str) -> Tuple[List[str], List[bool]]:
    """Captions of the json members' `field`, and per member whether it gave at least one."""
    out: List[str] = []
    has = [False] * len(run.wanted)
    at = [i for i, w in enumerate(run.wanted) if w]
    names = run.names()
    for i, d in zip(at, run.datas):
        where = f"sample {split_member_name(names[i])[0]!r}"
        try:
            obj = json.loads(d.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: json member is not UTF-8 ({e})") from None
        except ValueError as e:
            raise ValueError(f"{where}: json member does not parse ({e})") from None
        caps = _captions_of_value(_json_field(obj, field), where)
        if caps:
            has[i] = True
            out.extend(caps)
    return out, has


class _SampleTally:
    """Counts samples (runs of members with one key) and those without a caption, run by run."""

    def __init__(self, stats: ReadStats):
        self.stats = stats
        self.key: Optional[str] = None  # key of the sample in progress
        self.found = False  # whether it has a caption so far

    def add(self, run: TarRun, has: List[bool]) -> None:
        if len(has) == 1:  # the careful tar loop gives one member at a time
            if run.first_key != self.key:
                self.close()
                self.stats.samples += 1
                self.key, self.found = run.first_key, has[0]
            else:
                self.found = self.found or has[0]
            return
        new = np.asarray(run.new_key, dtype=bool)
        new[0] = run.first_key != self.key
        starts = np.flatnonzero(new)
        if not len(starts):
            self.found = self.found or any(has)
            return
        first = int(starts[0])
        if self.key is not None and not (self.found or any(has[:first])):
            self.stats.missing += 1
        sample_of = np.cumsum(new)[first:] - 1
        got = np.bincount(sample_of[np.asarray(has[first:], dtype=bool)], minlength=len(starts)) > 0
        self.stats.samples += len(starts)
        self.stats.missing += int(len(starts) - 1 - np.count_nonzero(got[:-1]))
        self.key, self.found = run.last_key, bool(got[-1])

    def close(self) -> None:
        if self.key is not None and not self.found:
            self.stats.missing += 1
        self.key = None


def _run_captions(runs: Iterable[TarRun], key: CaptionKey) -> Iterator[Tuple[TarRun, List[str], List[bool]]]:
    """(run, its captions, per member whether it gave one) for each run of members."""
    for run in runs:
        if key.field is None:
            yield run, _decode_captions(run, key.ext), run.wanted
        else:
            yield (run, *_json_captions(run, key.field))


def _tallied(items: Iterable[Tuple[TarRun, List[str], List[bool]]], stats: ReadStats) -> Iterator[List[str]]:
    """The non-empty lists of captions, counting samples and samples without a caption into stats."""
    tally = _SampleTally(stats)
    for run, caps, has in items:
        tally.add(run, has)
        if caps:
            yield caps
    tally.close()


def iter_shard_batches(unit: Unit, key: CaptionKey, stats: ReadStats) -> Iterator[List[str]]:
    """Captions of a webdataset shard, a list per run of members."""
    with open_stream(unit.url, may_seek=True) as (stream, seekable):
        yield from _tallied(_run_captions(iter_tar_runs(stream, key.ext, seekable), key), stats)


def iter_caption_batches(
    unit: Unit, key: CaptionKey, csv_key: str = "title", stats: Optional[ReadStats] = None
) -> Iterator[List[str]]:
    """The single caption reader shared by `superclip idf` and `superclip cooccur`, a list at a time."""
    stats = stats if stats is not None else ReadStats()
    if unit.kind == "csv":
        return iter_csv_batches(unit, csv_key, stats)
    return iter_shard_batches(unit, key, stats)


def iter_captions(
    unit: Unit, key: CaptionKey, csv_key: str = "title", stats: Optional[ReadStats] = None
) -> Iterator[str]:
    """iter_caption_batches, a caption at a time."""
    batches = iter_caption_batches(unit, key, csv_key, stats)
    try:
        for batch in batches:
            yield from batch
    finally:
        batches.close()
