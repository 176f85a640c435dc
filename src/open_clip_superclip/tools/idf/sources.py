"""What the IDF tools read: input patterns, work units, caption keys, opening any URL, and CSV/TSV files.

`superclip idf` and `superclip cooccur` share these, so that both read the same corpus the same way.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import io
import os
from typing import Iterator, List, Optional, Sequence, Tuple

_GZIP_MAGIC = b"\x1f\x8b"
_LISTED_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".csv", ".tsv", ".csv.gz", ".tsv.gz")
CSV_BATCH = 4096  # rows per list of captions read from a CSV/TSV file


@dataclasses.dataclass(frozen=True)
class CaptionKey:
    """Where the caption lives: a webdataset member extension, or a field of the json member."""

    ext: str  # member extension, lower case, e.g. "txt" or "json"
    field: Optional[str] = None  # field inside the json member (dotted path allowed)

    @classmethod
    def parse(cls, spec: str) -> "CaptionKey":
        spec = spec.strip()
        if not spec:
            raise ValueError("empty caption key")
        if ":" in spec:
            ext, field = spec.split(":", 1)
            if ext.lower() != "json" or not field:
                raise ValueError(f"caption key {spec!r}: only json:FIELD takes a field")
            return cls("json", field)
        return cls(spec.lower())


@dataclasses.dataclass(frozen=True)
class Unit:
    """One piece of work: a shard, or one of `nparts` interleaved row subsets of a CSV/TSV file."""

    url: str
    kind: str  # "wds" or "csv"
    sep: str = ","
    part: int = 0
    nparts: int = 1

    @property
    def label(self) -> str:
        return self.url if self.nparts == 1 else f"{self.url} (rows {self.part} mod {self.nparts})"


@dataclasses.dataclass
class ReadStats:
    samples: int = 0  # webdataset samples or CSV rows read
    missing: int = 0  # samples without the caption key / field


def _listed_dir(url: str) -> Optional[List[str]]:
    """The shard and CSV files of a local directory (a path or file://DIR), sorted; None if url is not one."""
    local = url[len("file://"):] if url.startswith("file://") else url
    if "://" in local or local.startswith("pipe:") or not os.path.isdir(local):
        return None
    found = sorted(os.path.join(url, f) for f in os.listdir(local) if f.endswith(_LISTED_EXTENSIONS))
    if not found:
        raise ValueError(f"{url}: directory holds no .tar/.csv/.tsv files")
    return found


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Brace-expand patterns ('::' also separates sources, as in open_clip); a local dir lists its shards."""
    import braceexpand

    urls: List[str] = []
    for spec in inputs:
        for part in spec.split("::"):
            if not part:
                continue
            for u in braceexpand.braceexpand(part):
                listed = _listed_dir(u)
                urls.extend([u] if listed is None else listed)
    return urls


def _kind_of(url: str, input_format: str) -> Tuple[str, str]:
    """("wds" or "csv", separator) of an input: as --input-format says, else by its extension."""
    if input_format == "wds":
        return "wds", ","
    if input_format in ("csv", "tsv"):
        return "csv", "\t" if input_format == "tsv" else ","
    base = url.split("?", 1)[0].lower()
    if base.endswith((".tsv", ".tsv.gz")):
        return "csv", "\t"
    if base.endswith((".csv", ".csv.gz")):
        return "csv", ","
    return "wds", ","


def make_units(
    urls: Sequence[str], input_format: str = "auto", csv_parts: int = 1, csv_sep: Optional[str] = None
) -> List[Unit]:
    """Work units in input order; each CSV/TSV file is split into `csv_parts` row-interleaved parts."""
    units: List[Unit] = []
    for u in urls:
        kind, sep = _kind_of(u, input_format)
        if kind == "csv":
            sep = csv_sep if csv_sep is not None else sep
            k = max(1, int(csv_parts))
            units.extend(Unit(u, "csv", sep, p, k) for p in range(k))
        else:
            units.append(Unit(u, "wds"))
    return units


def is_local(url: str) -> bool:
    """A local path or file:// URL: a file the tar reader may seek in and memory-map."""
    return "://" not in url and not url.startswith("pipe:") or url.startswith("file://")


def open_url(url: str):
    """Open a shard for reading: local path, file://, pipe:CMD, or any fsspec URL (curl fallback)."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if url.startswith("file://"):
        return open(url[len("file://") :], "rb")
    if "://" not in url:
        return open(url, "rb")
    try:
        import fsspec

        return fsspec.open(url, "rb").open()
    except ImportError:  # e.g. http without aiohttp: webdataset's curl/gsutil handlers
        from webdataset.gopen import gopen

        return gopen(url, "rb")


class _Prefixed:
    """A read()-able stream with some already-read bytes put back in front (for format sniffing)."""

    def __init__(self, head: bytes, rest):
        self._head = head
        self._rest = rest

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                out, self._head = self._head + self._rest.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            if len(out) < n:
                out += self._rest.read(n - len(out))
            return out
        return self._rest.read(n)


class _Readable(io.RawIOBase):
    """Adapter so TextIOWrapper can sit on any object with read(n)."""

    def __init__(self, src):
        self._src = src

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._src.read(len(b))
        b[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def open_stream(url: str, may_seek: bool = False) -> Iterator[Tuple[object, bool]]:
    """(readable stream, seekable) of url, gunzipped if its first bytes say gzip; closes it afterwards.

    With may_seek, a local uncompressed file is given as itself, seekable (the tar reader maps it).
    Closing a pipe: stream also checks the command's exit status.
    """
    f = open_url(url)
    try:
        head = f.read(2)
        if head == _GZIP_MAGIC:
            yield gzip.GzipFile(fileobj=_Prefixed(head, f), mode="rb"), False
        elif may_seek and is_local(url):
            f.seek(0)
            yield f, True
        else:
            yield _Prefixed(head, f), False
    finally:
        f.close()


def iter_csv_batches(unit: Unit, column: str, stats: ReadStats) -> Iterator[List[str]]:
    """Captions of column `column` of the unit's rows (every nparts-th, from part), a list at a time."""
    with open_stream(unit.url) as (raw, _):
        text = io.TextIOWrapper(_Readable(raw), encoding="utf-8", newline="")
        csv.field_size_limit(1 << 30)
        reader = csv.reader(text, delimiter=unit.sep)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError("empty file (no header row)") from None
        if column not in header:
            raise ValueError(f"no column {column!r}; columns are {header}")
        col = header.index(column)
        part, k = unit.part, unit.nparts
        batch: List[str] = []
        for i, row in enumerate(reader):
            if i % k != part:
                continue
            stats.samples += 1
            if col >= len(row):
                stats.missing += 1
                continue
            batch.append(row[col])
            if len(batch) >= CSV_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch
