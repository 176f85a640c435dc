"""A small strict tar reader for webdataset shards: runs of members with their keys, extensions and data.

Why not tarfile: it costs ~50-100 us a member. This reader checks every header checksum, refuses truncation
and a missing end-of-archive block, and handles ustar, pax and GNU long names. Long stretches of plain
members go through tar_bulk.py (numpy); everything else through the careful loop here, a member at a time,
which also raises the errors.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import zlib
from typing import Dict, Iterator, Optional, Tuple

from .members import TarRun, split_member_name
from .tar_bulk import tar_bulk

_CHUNK = 4 << 20  # bytes read at a time from a stream; also the longest stretch tar_bulk parses
_BULK_MIN = 65536  # tar_bulk is tried when at least this much is buffered
_BULK_PAUSE = 64  # members the careful loop takes after tar_bulk found nothing to take
_ZERO_BLOCK = bytes(512)
_TAR_SIZE_SUM_TYPE = struct.Struct("124x12s12x8sB")  # size, chksum, typeflag
_TAR_NAMES = struct.Struct("100s157x6s82x155s")  # name, magic, prefix
_EXTENDED_TYPES = (0x78, 0x67, 0x4C, 0x4B)  # x g L K: extended headers
_END = object()  # the careful loop met the end-of-archive block


def _octal(field: bytes, what: str, offset: int) -> int:
    """A numeric header field (octal, or GNU base-256); an error naming the field and the byte offset."""
    if field[:1] and field[0] & 0x80:  # GNU base-256 for big values
        return int.from_bytes(field[1:], "big")
    s = field.split(b"\0", 1)[0].strip(b" ")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise ValueError(f"invalid tar header at byte {offset}: bad {what} field {field!r}") from None


def _pax_records(data: bytes, offset: int) -> Dict[str, str]:
    """The "LEN key=value\\n" records of a pax header's data."""
    out = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise ValueError(f"invalid pax header at byte {offset}")
        length = int(data[pos:sp])
        rec = data[sp + 1 : pos + length - 1]
        k, _, v = rec.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _checksum_ok(hdr: bytes, stored: int) -> bool:
    """Exact tar header checksum test (unsigned, or the signed variant some old tars use)."""
    unsigned = sum(hdr) - sum(hdr[148:156]) + 256
    return unsigned == stored or unsigned - 256 * sum(b > 127 for b in hdr[:148] + hdr[156:]) == stored


class _Window:
    """The bytes of a tar stream around the read position: buf[pos:] comes next, buf[0] is at stream offset base.

    A memory-mapped file is one window over the whole file (no copy; unwanted data is never touched);
    other streams are read in 4 MB chunks, unwanted data read and dropped (or seeked over).
    """

    def __init__(self, f, mapped):
        self.f = f
        self.mapped = mapped is not None
        self.buf = b"" if mapped is None else mapped
        self.pos = 0
        self.base = 0
        self.readinto = getattr(f, "readinto", None)

    def need(self, n: int) -> bool:
        """Make n bytes available at pos, reading a chunk (straight into the new buffer where possible)."""
        if len(self.buf) - self.pos >= n or self.mapped:
            return len(self.buf) - self.pos >= n
        self.base += self.pos
        if self.readinto is None:
            return self._read_parts(n)
        new = bytearray(max(_CHUNK, n))
        have = len(self.buf) - self.pos
        new[:have] = memoryview(self.buf)[self.pos :]
        with memoryview(new) as view:
            while have < n:
                got = self.readinto(view[have:])
                if not got:
                    break
                have += got
        del new[have:]
        self.buf, self.pos = new, 0
        return have >= n

    def _read_parts(self, n: int) -> bool:
        """need() for streams without readinto."""
        parts = [self.buf[self.pos :]]
        have = len(parts[0])
        while have < n:
            more = self.f.read(max(_CHUNK, n - have))
            if not more:
                break
            parts.append(more)
            have += len(more)
        self.buf, self.pos = b"".join(parts), 0
        return have >= n

    def take(self, size: int, padded: int, cut_short: str) -> bytes:
        """The next `size` bytes (a view where buf allows), moving past `padded`; ValueError(cut_short) if cut."""
        if len(self.buf) - self.pos < padded and not self.need(padded):
            raise ValueError(cut_short)
        data = self.buf[self.pos : self.pos + size]
        self.pos += padded
        return data

    def skip(self, padded: int, name: str, seekable: bool) -> None:
        """Move past `padded` bytes of member data that reach beyond the buffer: seek, or read and drop."""
        if self.mapped:
            raise ValueError(f"truncated tar: member {name!r} cut short")
        todo = padded - (len(self.buf) - self.pos)
        self.base += len(self.buf)
        self.buf, self.pos = b"", 0
        if seekable:
            here = self.f.tell()
            end = self.f.seek(0, 2)
            if here + todo > end:
                raise ValueError(f"truncated tar: member {name!r} cut short")
            self.f.seek(here + todo)
        else:
            left = todo
            while left:
                got = self.f.read(min(left, 1 << 22))
                if not got:
                    raise ValueError(f"truncated tar: member {name!r} cut short")
                left -= len(got)
        self.base += todo


def _size_field(sz: bytes, off: int) -> int:
    """The member size of a header's size field (octal, or GNU base-256 for big values)."""
    if sz[0] & 0x80:
        return _octal(sz, "size", off)
    try:
        return int(sz.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        return _octal(sz, "size", off)


def _header_name(w: _Window, off: int) -> str:
    """The member name of the header at stream offset off, with its ustar prefix."""
    raw_name, magic, raw_prefix = _TAR_NAMES.unpack_from(w.buf, off - w.base)
    i = raw_name.find(0)
    name = (raw_name if i < 0 else raw_name[:i]).decode("utf-8", "surrogateescape")
    if raw_prefix[0] and magic == b"ustar\x00":
        name = raw_prefix.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
    return name


def _member_key(typ: int, name: str, off: int) -> Tuple[Optional[str], Optional[str]]:
    """(sample key, extension) of a regular member; (None, None) for links, devices, folders and fifos."""
    if typ == 0x30 or typ == 0 or typ == 0x37:
        return split_member_name(name) or (None, None)
    if 0x31 <= typ <= 0x36:
        return None, None
    raise ValueError(f"unsupported tar member type {chr(typ)!r} for {name!r} at byte {off}")


class _Extended:
    """What extended headers (GNU long name, pax path/size) say about the next member."""

    def __init__(self):
        self.long_name: Optional[str] = None
        self.pax: Dict[str, str] = {}

    def read(self, data: bytes, off: int, typ: int) -> None:
        """Take in the data of an extended header of type typ at stream offset off."""
        if typ == 0x78:
            if b"path=" in data or b"size=" in data:
                self.pax = _pax_records(data, off)
        elif typ == 0x4C:
            self.long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")

    def apply(self, w: _Window, off: int, size: int) -> Tuple[str, int]:
        """(name, size) of the member whose header is at off, then forget the extended headers."""
        if self.long_name is not None:
            name = self.long_name
            self.long_name = None
        elif "path" in self.pax:
            name = self.pax["path"]
        else:
            name = _header_name(w, off)
        if self.pax:
            if "size" in self.pax:
                size = int(self.pax["size"])
            self.pax = {}
        return name, size


def _careful_member(w: _Window, ext: _Extended, want: Optional[str], seekable: bool):
    """The next header, a member at a time: a TarRun of one member, None (nothing to yield) or _END.

    The hot path of shards that tar_bulk cannot take (GNU long names, pax paths, tails), so the usual
    case runs on locals without further calls. The checksum is first tested modulo 65521 with
    zlib.adler32 (C speed; corrupting fewer than 257 bytes always changes it), then exactly, before an
    error is raised.
    """
    buf, pos = w.buf, w.pos
    if len(buf) - pos < 512:
        if not w.need(512):
            if len(w.buf) - w.pos == 0:
                raise ValueError(
                    "truncated tar: no end-of-archive block" if w.base + w.pos else "empty file, not a tar archive"
                )
            raise ValueError(f"truncated tar: partial header at byte {w.base + w.pos}")
        buf, pos = w.buf, w.pos
    off = w.base + pos
    sz, chk, typ = _TAR_SIZE_SUM_TYPE.unpack_from(buf, pos)
    try:
        stored = int(chk.rstrip(b"\0 "), 8)
    except ValueError:
        if buf[pos : pos + 512] == _ZERO_BLOCK:
            return _END
        stored = _octal(chk, "checksum", off)
    hdr = buf[pos : pos + 512]
    if ((zlib.adler32(hdr) & 0xFFFF) + 255 - sum(chk) - stored) % 65521 and not _checksum_ok(hdr, stored):
        raise ValueError(f"invalid tar header at byte {off} (checksum mismatch): corrupt or not a tar file")
    size = _size_field(sz, off)
    w.pos = pos = pos + 512
    padded = (size + 511) & ~511
    if typ in _EXTENDED_TYPES:
        if len(buf) - pos >= padded:
            w.pos = pos + padded
            ext.read(buf[pos : pos + size], off, typ)
        else:
            ext.read(w.take(size, padded, f"truncated tar: extended header at byte {off} cut short"), off, typ)
        return None
    if ext.long_name is None and not ext.pax:
        name = _header_name(w, off)
    else:
        name, size = ext.apply(w, off, size)
        padded = (size + 511) & ~511
    key, extension = _member_key(typ, name, off)
    if key is not None and (want is None or extension == want):
        if len(buf) - pos >= padded:
            w.pos = pos + padded
            return TarRun.one(name, key, buf[pos : pos + size])
        return TarRun.one(name, key, w.take(size, padded, f"truncated tar: member {name!r} cut short"))
    if len(buf) - pos >= padded:
        w.pos = pos + padded
    else:
        w.skip(padded, name, seekable)
    return None if key is None else TarRun.one(name, key, None)


def _scan_tar(f, want: Optional[str], seekable: bool, mapped) -> Iterator[TarRun]:
    """The reader behind iter_tar_runs; `mapped` is the whole file when it is memory-mapped."""
    w = _Window(f, mapped)
    ext = _Extended()
    bulk_pause = 0
    while True:
        if ext.long_name is None and not ext.pax and len(w.buf) - w.pos >= _BULK_MIN:
            if bulk_pause:
                bulk_pause -= 1
            else:
                bulk = tar_bulk(w.buf, w.pos, want, min(len(w.buf), w.pos + _CHUNK))
                if bulk is not None:
                    run, w.pos = bulk
                    yield run
                    continue
                bulk_pause = _BULK_PAUSE  # nothing bulk-able here: the careful loop takes a stretch
        run = _careful_member(w, ext, want, seekable)
        if run is _END:
            return
        if run is not None:
            yield run


def _map_file(f):
    """The file memory-mapped read-only, or None (not a file, empty, or not mappable)."""
    if not hasattr(f, "fileno"):
        return None
    try:
        if hasattr(mmap, "MAP_POPULATE"):  # Linux: map the pages up front, not a fault each
            return mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # an empty file, or one that cannot be mapped: read it
        return None


def iter_tar_runs(f, want: Optional[str] = None, seekable: bool = False) -> Iterator[TarRun]:
    """Yield the regular members of a tar stream as runs: parallel lists of names, keys, extensions, data.

    Keys and extensions follow webdataset (key = name up to the first dot of the base name,
    extension lower-cased; names without one and __meta__ names are skipped). Data is read only
    for extension `want` (all members when None), else None. Seekable local files are memory-mapped.
    """
    mapped = _map_file(f) if seekable else None
    try:
        yield from _scan_tar(f, want, seekable, mapped)
    finally:
        if mapped is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view: the GC unmaps it
                mapped.close()


def iter_tar_members(
    f, want: Optional[str] = None, seekable: bool = False
) -> Iterator[Tuple[str, str, str, Optional[bytes]]]:
    """Yield (name, sample key, extension, data) for the regular members of a tar stream (see iter_tar_runs)."""
    for run in iter_tar_runs(f, want, seekable):
        datas = iter(run.datas)
        for name, wanted in zip(run.names(), run.wanted):
            yield (name, *split_member_name(name), bytes(next(datas)) if wanted else None)
