"""The tar reader's fast path: a stretch of plain members (types '0' and 'x') parsed at once, in numpy.

Why: a Python loop over headers costs microseconds a member, and text-only webdataset shards hold a
pax-headed member every 1 KB. Every block that could be a header gets its size parsed at once, so walking
the chain is one list lookup a header; checksums, field formats, pax records and names are then handled for
the whole stretch. The stretch stops before anything else (other types, unusual field formats, a bad
checksum, pax records that could set path or size, a member not wholly in the buffer), which the careful
loop of tar_reader.py then handles, errors included.
"""

from __future__ import annotations

import itertools
import operator
from typing import Callable, List, Optional, Tuple

import numpy as np

from .members import TarRun, split_member_name

_OCT6 = 8 ** np.arange(5, -1, -1, dtype=np.int64)
_OCT11 = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_USTAR = np.frombuffer(b"ustar\x00", dtype=np.uint8)
_PAX_KEYS_THAT_MOVE_DATA = (b"path=", b"size=")
_NAME_COLS = np.arange(100)
_MTIME_RECORD = np.frombuffer(b" mtime=", dtype=np.uint8)

# (wanted, new key, first key, last key, names on demand, data starts, data lengths) of a stretch's members
_Named = Tuple[List[bool], List[bool], str, str, Callable[[], List[str]], np.ndarray, np.ndarray]


def _ascii_names_in_bulk(names: np.ndarray, want: Optional[str]) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(wanted, new key, first dot) per member from name fields [m, 100], in numpy; None: Python decides.

    Exact for ASCII names that all have a sample key and an extension (webdataset's rule, see
    split_member_name) and are not '__' meta names; the caller excludes NULs inside and ustar prefixes.
    """
    if not len(names) or (names >= 128).any() or ((names[:, 0] == 95) & (names[:, 1] == 95)).any():
        return None
    width = names.shape[1]
    cols = _NAME_COLS[:width]
    slash = names == 47
    last_slash = np.where(slash.any(axis=1), width - 1 - np.argmax(slash[:, ::-1], axis=1), -1)
    dots = (names == 46) & (cols > last_slash[:, None])
    first_dot = np.argmax(dots, axis=1)
    if not (dots.any(axis=1) & (first_dot > last_slash + 1)).all():
        return None
    if want is None:
        wanted = np.ones(len(names), dtype=bool)
    elif not want.isascii():
        wanted = np.zeros(len(names), dtype=bool)
    else:
        w = np.frombuffer(want.encode("ascii"), dtype=np.uint8)
        at = np.minimum(first_dot[:, None] + 1 + np.arange(len(w) + 1), width - 1)
        ext = np.take_along_axis(names, at, axis=1)
        ext = ext + 32 * ((ext >= 65) & (ext <= 90))  # ASCII lower(); want is lower case
        ends_there = (first_dot + 1 + len(w) >= width) | (ext[:, -1] == 0)  # columns past width are NUL
        wanted = (ext[:, :-1] == w).all(axis=1) & ends_there
    same = np.zeros(len(names), dtype=bool)
    same[1:] = (first_dot[1:] == first_dot[:-1]) & (
        (names[1:] == names[:-1]) | (cols >= first_dot[1:, None])).all(axis=1)
    return wanted, ~same, first_dot


def _only_mtime_records(heads9: np.ndarray, sizes: np.ndarray) -> bool:
    """Whether each pax data block (first 9 bytes, and its size) is a single 'NN mtime=...' record."""
    length = (heads9[:, 0].astype(np.int64) - 48) * 10 + (heads9[:, 1].astype(np.int64) - 48)
    digits = (heads9[:, :2] >= 48) & (heads9[:, :2] <= 57)
    return bool((digits.all(axis=1) & (heads9[:, 2:] == _MTIME_RECORD).all(axis=1) & (length == sizes)).all())


def _header_chain(blocks: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(header block numbers, member size by block, next header by block) of the chain from block 0.

    Only blocks of type '0' or 'x' with a plain octal size field are candidates; the chain ends at the
    first header whose member does not end within the blocks.
    """
    nb = len(blocks)
    typ = blocks[:, 156]
    cand = np.flatnonzero((typ == 0x30) | (typ == 0x78))
    field = np.take(blocks[:, 124:136], cand, axis=0).astype(np.int64)
    digits = field[:, :11] - 48
    ok = ((digits >= 0) & (digits <= 7)).all(axis=1) & ((field[:, 11] == 0) | (field[:, 11] == 32))
    nxt = np.full(nb + 1, -1, dtype=np.int64)
    good_cand = cand[ok]
    size_at = np.zeros(nb + 1, dtype=np.int64)  # member size by header block, parsed once
    size_at[good_cand] = digits[ok] @ _OCT11
    nxt[good_cand] = good_cand + 1 + (size_at[good_cand] + 511) // 512
    linked = good_cand[nxt[good_cand] <= nb]
    if len(linked) and linked[0] == 0 and (nxt[linked[:-1]] == linked[1:]).all():
        return linked, size_at, nxt  # the usual case: the candidates are exactly the chain from block 0
    nxt_list = nxt.tolist()  # data that looks like a header: walk the chain (one list lookup a header)
    chain: List[int] = []
    i = 0
    while 0 <= (j := nxt_list[i]) <= nb:  # nxt_list[nb] is -1: the walk ends at the buffer's end
        chain.append(i)
        i = j
    return np.asarray(chain, dtype=np.int64), size_at, nxt


def _checked_count(heads: np.ndarray) -> int:
    """How many headers, from the first, have a well-formed checksum field that matches."""
    chk = heads[:, 148:156].astype(np.int64)
    chk_digits = chk[:, :6] - 48
    fmt_ok = (chk[:, 6] == 0) & (chk[:, 7] == 32) & ((chk_digits >= 0) & (chk_digits <= 7)).all(axis=1)
    total = heads.sum(axis=1, dtype=np.uint32).astype(np.int64) - chk.sum(axis=1) + 256
    good = fmt_ok & (total == chk_digits @ _OCT6)
    return len(heads) if good.all() else int(np.argmin(good))


def _first_suspect_pax(buf, pos: int, blocks: np.ndarray, hp: np.ndarray, sizes: np.ndarray,
                       pax: np.ndarray) -> Optional[int]:
    """The first header (of those numbered pax) whose records could name a path or a size, else None."""
    widest = int(sizes[pax].max())
    data_at = np.minimum(hp[pax] + 1, len(blocks) - 1)  # a pax of size 0 has no data block: it matches nothing
    if widest < min(map(len, _PAX_KEYS_THAT_MOVE_DATA)):
        return None
    if widest > 512:
        at = (pos + (hp[pax] + 1) * 512).tolist()
        suspect = [r for r, a, k in zip(pax.tolist(), at, sizes[pax].tolist())
                   if any(needle in buf[a : a + k] for needle in _PAX_KEYS_THAT_MOVE_DATA)]
        return suspect[0] if suspect else None
    if _only_mtime_records(np.take(blocks[:, :9], data_at, axis=0), sizes[pax]):
        return None  # what tarfile writes for webdataset: one "NN mtime=..." record each
    data = np.take(blocks[:, :widest], data_at, axis=0)
    hit = np.zeros(len(pax), dtype=bool)
    limit = sizes[pax][:, None]
    for needle in _PAX_KEYS_THAT_MOVE_DATA:
        k = len(needle)
        if widest < k:
            continue
        match = np.ones((len(pax), widest - k + 1), dtype=bool)
        for t, byte in enumerate(needle):
            match &= data[:, t : widest - k + 1 + t] == byte
        hit |= (match & (np.arange(widest - k + 1) <= limit - k)).any(axis=1)
    suspect = pax[hit]
    return int(suspect[0]) if len(suspect) else None


def _names_of(member: np.ndarray, nul_inside: np.ndarray, prefixed: np.ndarray) -> Callable[[], List[str]]:
    """The member names of the headers, decoded on demand (ustar prefixes joined)."""

    def all_names() -> List[str]:
        raw = np.ascontiguousarray(member[:, :100]).view("S100").ravel().tolist()  # trailing NULs dropped
        for r in np.flatnonzero(nul_inside).tolist():
            raw[r] = raw[r].split(b"\0", 1)[0]
        for r in np.flatnonzero(prefixed).tolist():
            raw[r] = bytes(member[r, 345:500]).split(b"\0", 1)[0] + b"/" + raw[r]
        return [x.decode("utf-8", "surrogateescape") for x in raw]

    return all_names


def _named_members(member: np.ndarray, want: Optional[str], starts: np.ndarray, lens: np.ndarray) -> Optional[_Named]:
    """Keys, extensions and the wanted flag of the member headers, in numpy where the names allow; None: none has a key."""
    name_field = member[:, :100]
    zero = name_field == 0
    nul_inside = (zero[:, :-1] & ~zero[:, 1:]).any(axis=1)
    prefixed = (member[:, 257:263] == _USTAR).all(axis=1) & (member[:, 345] != 0)
    all_names = _names_of(member, nul_inside, prefixed)
    used = np.flatnonzero(~zero.all(axis=0))
    width = min(100, int(used[-1]) + 2) if len(used) else 1  # columns that hold names, and one NUL
    fast = None if nul_inside.any() or prefixed.any() else _ascii_names_in_bulk(name_field[:, :width], want)
    if fast is not None:
        wanted, new_key, first_dot = fast
        first_key, last_key = (bytes(name_field[r, : first_dot[r]]).decode("ascii") for r in (0, -1))
        return wanted.tolist(), new_key.tolist(), first_key, last_key, all_names, starts, lens
    named = all_names()
    parts = [split_member_name(nm) for nm in named]
    keep = [p is not None for p in parts]
    if not any(keep):
        return None
    named = list(itertools.compress(named, keep))
    parts = list(itertools.compress(parts, keep))
    keys = [p[0] for p in parts]
    wanted_l = [want is None or p[1] == want for p in parts]
    new_l = list(map(operator.ne, keys, [None, *keys[:-1]]))
    return wanted_l, new_l, keys[0], keys[-1], named.copy, starts[keep], lens[keep]


def tar_bulk(buf, pos: int, want: Optional[str], end: int) -> Optional[Tuple[TarRun, int]]:
    """Parse a run of plain members lying wholly in buf[pos:end]: (run, new pos), or None (nothing to take)."""
    nb = (end - pos) // 512
    if nb < 32:
        return None
    blocks = np.frombuffer(buf, dtype=np.uint8, count=nb * 512, offset=pos).reshape(nb, 512)
    hp, size_at, nxt = _header_chain(blocks)
    if len(hp) < 16:
        return None
    heads = np.take(blocks, hp, axis=0)
    sizes = size_at[hp]
    n = _checked_count(heads)
    typs = heads[:n, 156]
    pax = np.flatnonzero(typs == 0x78)
    if len(pax):  # a pax record that could name a path or size: the careful loop takes it from there
        suspect = _first_suspect_pax(buf, pos, blocks, hp, sizes, pax)
        if suspect is not None:
            n = min(n, suspect)
    while n and typs[n - 1] == 0x78:  # a pax header belongs with its member: leave both
        n -= 1
    if n < 1:
        return None
    rows = np.flatnonzero(typs[:n] == 0x30)
    if not len(rows):
        return None
    named = _named_members(heads[rows], want, pos + (hp[rows] + 1) * 512, sizes[rows])
    if named is None:
        return None
    wanted_l, new_l, first_key, last_key, names, starts, lens = named
    sel = np.asarray(wanted_l, dtype=bool)
    datas = [buf[a : a + k] for a, k in zip(starts[sel].tolist(), lens[sel].tolist())]
    return TarRun(datas, wanted_l, new_l, first_key, last_key, names), pos + int(nxt[hp[n - 1]]) * 512
