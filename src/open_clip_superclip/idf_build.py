"""Offline IDF statistics for SuperCLIP: token document frequencies over a caption corpus.

`superclip idf` counts, for every token id of the text tokenizer, in how many captions it occurs
(between SOT and EOT, over the whole caption, no 77-token cut). The result file seeds or replaces the
online IDF counts of the class loss. The format and the loader live here too; see docs/idf.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import csv
import dataclasses
import datetime
import functools
import gzip
import hashlib
import io
import itertools
import json
import mmap
import multiprocessing as mp
import operator
import os
import re
import struct
import sys
import time
import zipfile
import zlib
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from .atomic import local_output_path, write_atomically

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "superclip-idf-counts"
FORMAT_VERSION = 1
_REQUIRED_FIELDS = ("format", "format_version", "doc_freq", "num_captions", "vocab_size", "tokenizer")

# ---------------------------------------------------------------------------------------------------
# File format: save / load / merge
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IDFCounts:
    """Document frequencies of a caption corpus, as loaded from a counts file."""

    doc_freq: "torch.Tensor"  # float64 [vocab_size]; exact for counts below 2**53
    num_captions: int
    vocab_size: int
    tokenizer: str
    meta: dict = dataclasses.field(default_factory=dict)

    def weights(self) -> "torch.Tensor":
        """IDF weights log((N + 1) / (df + 1)) in float64, the same formula as the online loss."""
        import torch

        from .idf import idf_weights
        return idf_weights(self.doc_freq, torch.tensor(float(self.num_captions), dtype=torch.float64))


def save_idf_counts(
    path: str,
    doc_freq,
    num_captions: int,
    tokenizer: str,
    meta: Optional[dict] = None,
) -> None:
    """Validate and atomically write a counts file (.npz, no pickles)."""
    df = np.asarray(doc_freq)
    if df.ndim != 1 or df.size == 0:
        raise ValueError(f"doc_freq must be a non-empty 1-D array, got shape {df.shape}")
    if df.dtype.kind == "f":
        if not np.all(np.isfinite(df)) or np.any(df != np.round(df)):
            raise ValueError("doc_freq must hold whole numbers")
    df = df.astype(np.int64)
    n = int(num_captions)
    if n < 0 or (df.size and (df.min() < 0 or df.max() > n)):
        raise ValueError("doc_freq must lie in [0, num_captions]")
    if not tokenizer:
        raise ValueError("tokenizer identity must be a non-empty string")
    arrays = {
        "format": np.array(FORMAT_NAME),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "doc_freq": df,
        "num_captions": np.array(n, dtype=np.int64),
        "vocab_size": np.array(df.size, dtype=np.int64),
        "tokenizer": np.array(str(tokenizer)),
        "meta_json": np.array(json.dumps(meta or {}, sort_keys=True)),
    }
    write_atomically(path, lambda f: np.savez_compressed(f, **arrays))


def _read_counts_file(path: str) -> Tuple[np.ndarray, int, int, str, dict]:
    """Read and check a counts file; every problem becomes a ValueError that names the file."""
    path = os.fspath(path)

    def bad(msg: str) -> ValueError:
        return ValueError(f"IDF counts file {path!r}: {msg}")

    if not os.path.exists(path):
        raise bad("file not found")
    if os.path.isdir(path):
        raise bad("is a directory, not a counts file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _REQUIRED_FIELDS if k not in z.files]
            if "format" in z.files and str(z["format"]) != FORMAT_NAME:
                raise bad(f"not a {FORMAT_NAME} file (format field is {str(z['format'])!r})")
            if missing:
                raise bad(f"missing field(s) {', '.join(missing)}")
            fields = {k: z[k] for k in z.files}  # reading every member checks its zip CRC
    except ValueError as e:
        if str(e).startswith("IDF counts file"):
            raise
        raise bad(f"unreadable, truncated or corrupt ({type(e).__name__}: {e})") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, TypeError) as e:
        raise bad(f"unreadable, truncated or corrupt ({type(e).__name__}: {e})") from e

    def scalar_int(name: str) -> int:
        a = fields[name]
        if a.shape != () or a.dtype.kind not in "iu":
            raise bad(f"field {name} must be an integer scalar, got dtype {a.dtype} shape {a.shape}")
        return int(a)

    version = scalar_int("format_version")
    if version != FORMAT_VERSION:
        raise bad(f"format version {version}; this code reads version {FORMAT_VERSION}")
    n = scalar_int("num_captions")
    vocab = scalar_int("vocab_size")
    df = fields["doc_freq"]
    if df.dtype.kind not in "iu":
        raise bad(f"doc_freq must be integer, got dtype {df.dtype}")
    if df.ndim != 1 or df.shape[0] != vocab:
        raise bad(f"doc_freq has shape {tuple(df.shape)} but vocab_size is {vocab}")
    if vocab <= 0:
        raise bad(f"vocab_size must be positive, got {vocab}")
    if n < 0:
        raise bad(f"num_captions is negative ({n})")
    df = df.astype(np.int64)
    if df.min() < 0:
        raise bad(f"doc_freq has negative counts (min {int(df.min())} at token {int(df.argmin())})")
    if df.max() > n:
        raise bad(
            f"doc_freq exceeds num_captions ({int(df.max())} > {n} at token {int(df.argmax())})"
        )
    tok = fields["tokenizer"]
    if tok.shape != () or tok.dtype.kind != "U" or not str(tok):
        raise bad("field tokenizer must be a non-empty string")
    meta = {}
    if "meta_json" in fields:
        try:
            meta = json.loads(str(fields["meta_json"]))
        except ValueError as e:
            raise bad(f"field meta_json is not valid JSON ({e})") from e
    return df, n, vocab, str(tok), meta


def load_idf_counts(
    path: str, vocab_size: Optional[int] = None, tokenizer: Optional[str] = None
) -> IDFCounts:
    """Load a counts file; optionally insist on a vocabulary size and tokenizer identity.

    Raises ValueError naming the file for a missing, corrupt, mis-versioned or inconsistent file.
    """
    import torch

    df, n, vocab, tok, meta = _read_counts_file(path)
    if vocab_size is not None and int(vocab_size) != vocab:
        raise ValueError(
            f"IDF counts file {os.fspath(path)!r}: vocab_size {vocab} does not match the expected {int(vocab_size)}"
        )
    if tokenizer is not None and tokenizer != tok:
        raise ValueError(
            f"IDF counts file {os.fspath(path)!r}: built with tokenizer {tok!r}, expected {tokenizer!r}"
        )
    return IDFCounts(
        doc_freq=torch.from_numpy(df.astype(np.float64)),
        num_captions=n,
        vocab_size=vocab,
        tokenizer=tok,
        meta=meta,
    )


def merge_idf_counts(paths: Sequence[str], out: str) -> Tuple[int, int]:
    """Sum several counts files of one tokenizer into `out`; refuse mixed tokenizers or vocab sizes."""
    if not paths:
        raise ValueError("--merge needs at least one input file")
    total = None
    n_total = 0
    first = None
    for p in paths:
        df, n, vocab, tok, _ = _read_counts_file(p)
        if first is None:
            first = (p, vocab, tok)
            total = np.zeros(vocab, dtype=np.int64)
        elif (vocab, tok) != first[1:]:
            raise ValueError(
                f"cannot merge {p!r} (tokenizer {tok!r}, vocab {vocab}) with {first[0]!r} "
                f"(tokenizer {first[2]!r}, vocab {first[1]})"
            )
        total += df
        n_total += n
    meta = {
        "tool": "open_clip_superclip.idf_build --merge",
        "merged_from": [os.path.abspath(p) for p in paths],
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    save_idf_counts(out, total, n_total, first[2], meta)
    return n_total, first[1]


# ---------------------------------------------------------------------------------------------------
# Tokenizer and the fast, exact document-frequency counter
# ---------------------------------------------------------------------------------------------------

_TOKENIZERS: Dict[str, object] = {}


def _tokenizer_module():
    """open_clip's tokenizer module, without importing the whole open_clip package if not yet imported.

    Why: `import open_clip` also loads torchvision, timm and the model code (~10 s on a busy CPU);
    open_clip/tokenizer.py itself has no package-relative imports, so it is loaded from its file.
    """
    mod = sys.modules.get("open_clip.tokenizer")
    if mod is not None:
        return mod
    name = "open_clip_superclip._open_clip_tokenizer"
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    try:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
        path = os.path.join(os.path.dirname(spec.origin), "tokenizer.py")
        tspec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(tspec)
        sys.modules[name] = mod
        tspec.loader.exec_module(mod)
        return mod
    except Exception:  # noqa: BLE001 - any surprise: the ordinary import
        sys.modules.pop(name, None)
        import open_clip.tokenizer

        return open_clip.tokenizer


def get_tokenizer(model: str = ""):
    """open_clip's tokenizer for `model` (plain CLIP BPE SimpleTokenizer when empty); cached per process."""
    if model not in _TOKENIZERS:
        if model:
            import open_clip

            _TOKENIZERS[model] = open_clip.get_tokenizer(model)
        else:
            _TOKENIZERS[model] = _tokenizer_module().SimpleTokenizer()
    return _TOKENIZERS[model]


def _simple_tokenizer_classes() -> list:
    out = []
    for name in ("open_clip.tokenizer", "open_clip_superclip._open_clip_tokenizer"):
        mod = sys.modules.get(name)
        if mod is not None:
            out.append(mod.SimpleTokenizer)
    return out


def _is_simple_tokenizer(tok) -> bool:
    """True for open_clip's SimpleTokenizer (encode not overridden): the per-word fast path applies."""
    return any(isinstance(tok, c) and type(tok).encode is c.encode for c in _simple_tokenizer_classes())


def tokenizer_identity(tok) -> str:
    """A string that changes when the tokenizer class, cleaning, vocabulary or ids change."""
    cached = getattr(tok, "_superclip_identity", None)
    if cached:
        return cached
    h = hashlib.sha256()
    if any(isinstance(tok, c) for c in _simple_tokenizer_classes()):
        items = sorted(tok.encoder.items(), key=lambda kv: kv[1])
        for t, i in items:
            h.update(f"{i}\t{t}\n".encode("utf-8", "surrogatepass"))
        clean = getattr(tok.clean_fn, "__name__", "custom").replace("_clean_", "")
        bpe_name = "bpe_simple_vocab_16e6" if len(tok.encoder) == 49408 else "bpe"
        name = type(tok).__name__
        ident = f"open_clip.{name}/{bpe_name}/{tok.vocab_size}/clean={clean}/vocab-sha256={h.hexdigest()[:16]}"
    else:
        hf = getattr(tok, "tokenizer", None)
        if hf is None or not hasattr(hf, "get_vocab"):
            raise ValueError(f"unsupported tokenizer type {type(tok).__name__}")
        for t, i in sorted(hf.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{i}\t{t}\n".encode("utf-8", "surrogatepass"))
        src = getattr(hf, "name_or_path", "") or "unknown"
        ident = f"open_clip.{type(tok).__name__}/{src}/{len(hf)}/vocab-sha256={h.hexdigest()[:16]}"
    try:
        tok._superclip_identity = ident
    except AttributeError:
        pass
    return ident


def tokenizer_vocab_size(tok) -> int:
    if hasattr(tok, "vocab_size") and not hasattr(tok, "tokenizer"):
        return int(tok.vocab_size)
    return len(tok.tokenizer)


def _clean_lower_exact(text: str) -> str:
    """open_clip's 'lower' cleaning, imported rather than copied so it cannot drift."""
    global _CLEAN_LOWER
    _CLEAN_LOWER = _tokenizer_module().get_clean_fn("lower")
    return _CLEAN_LOWER(text)


_CLEAN_LOWER: Callable[[str], str] = _clean_lower_exact


_RISKY_AMP = re.compile(r"&(?! |\Z)")  # an '&' that html.unescape or ftfy could read as an entity


class _FtfyGate:
    """Computes ftfy.fix_text(t) at C speed for most captions, or says it cannot (returns None).

    ftfy.fix_and_explain repeats passes until one changes nothing. A pass is: unescape_html (skipped
    when the text holds '<'), fix_encoding (a no-op for ASCII and unless badness.is_bad), a fixed
    list of fixers that each rewrite only certain characters, then NFC normalisation. So a text
    comes back unchanged when it holds none of those characters, is NFC-normal and is not 'bad'.
    When its only such characters are curly quotes, the first pass yields uncurl_quotes(t) and the
    second pass leaves that alone under the same conditions. ftfy.fix_text fixes text a line at a time
    (each line with its '\n'), and so does the gate (multi-line text with an entity is left to ftfy).
    The character set comes from ftfy's own
    tables and regexes and is checked against every fixer on all characters; any surprise (another
    ftfy version with other fixers or defaults) turns the gate off (every call returns None).
    """

    def __init__(self):
        self.ok = False
        try:
            self._build()
            self.ok = True
        except Exception:  # noqa: BLE001 - never guess: fall back to ftfy itself
            self.ok = False

    def _build(self) -> None:
        import html
        import unicodedata

        import ftfy
        import ftfy.badness as badness
        import ftfy.chardata as cd

        fixers = ["fix_c1_controls", "fix_latin_ligatures", "fix_character_width", "uncurl_quotes",
                  "fix_line_breaks", "fix_surrogates", "remove_terminal_escapes", "remove_control_chars"]
        names = set()
        stack = list(ftfy.fix_and_explain.__code__.co_consts)
        while stack:
            c = stack.pop()
            if isinstance(c, tuple):
                stack.extend(c)
            elif isinstance(c, str) and c in ftfy.FIXERS:
                names.add(c)
        if names != set(fixers) | {"unescape_html"}:
            raise RuntimeError(f"ftfy runs other fixers: {sorted(names)}")
        cfg = ftfy.TextFixerConfig()
        if (cfg.normalization != "NFC" or not cfg.fix_encoding or cfg.unescape_html != "auto"
                or not all(getattr(cfg, n) for n in fixers)):
            raise RuntimeError("ftfy defaults differ")
        every = "".join(chr(i) for i in range(0x110000) if not 0xD800 <= i < 0xE000 and i != 10)
        quotes = set(cd.SINGLE_QUOTE_RE.findall(every)) | set(cd.DOUBLE_QUOTE_RE.findall(every))
        touched = {chr(k) for k in (*cd.LIGATURES, *cd.WIDTH_MAP, *cd.CONTROL_CHARS)} | quotes
        touched.update(cd.C1_CONTROL_RE.findall(every))
        touched.update(chr(i) for i in range(0xD800, 0xE000))  # surrogates
        touched.update("\n\r\x85\u2028\u2029\x1b")
        safe = "".join(ch for ch in every if ch not in touched)
        if any(ftfy.FIXERS[n](safe) != safe for n in fixers):
            raise RuntimeError("a fixer changes characters outside its tables")
        if any(ftfy.FIXERS[n]("a\nb\n") != "a\nb\n" for n in fixers):
            raise RuntimeError("a fixer changes '\\n' (the gate fixes text a line at a time)")
        uncurl = ftfy.FIXERS["uncurl_quotes"]
        if any(ch not in "'\"" for ch in uncurl("".join(sorted(quotes)))):
            raise RuntimeError("uncurl_quotes maps to other characters")
        self.limit = int(cfg.max_decode_length)
        self.is_nfc = functools.partial(unicodedata.is_normalized, "NFC")
        self.is_bad = _windowed_is_bad(badness.BADNESS_RE) or badness.is_bad
        self.unescape_ftfy = ftfy.FIXERS["unescape_html"]
        self.unescape_html = html.unescape
        self.uncurl = uncurl
        self.untouched = frozenset(touched).isdisjoint
        self.unquoted = frozenset(touched - quotes).isdisjoint

    def fix_text(self, t: str, line_end: str = "") -> Optional[str]:
        """ftfy's fix of the segment t + line_end, less line_end, for t without '\n' or an '&' that could
        start an entity; None if unsure. line_end is "" or "\n": ftfy fixes text a line at a time, each
        line with its '\n', which every fixer and NFC leave alone; only the badness test sees it."""
        if self.untouched(t):
            if t.isascii():
                return t
            if len(t) <= self.limit and self.is_nfc(t) and not self.is_bad(t + line_end):
                return t
            return None
        if not t.isascii() and self.unquoted(t) and len(t) <= self.limit:
            if self.is_nfc(t) and not self.is_bad(t + line_end):
                u = self.uncurl(t)
                if self.is_nfc(u) and not self.is_bad(u + line_end):
                    return u
        return None

    def basic_clean(self, t: str) -> Optional[str]:
        """open_clip's basic_clean(t) before its strip (html.unescape twice after ftfy), or None."""
        if not self.ok or len(t) > self.limit:
            return None
        if "&" not in t or _RISKY_AMP.search(t) is None:  # html.unescape has nothing to decode, before or after
            if "\n" not in t:
                return self.fix_text(t)
            *lines, last = t.split("\n")
            fixed = [self.fix_text(line, "\n") for line in lines]
            fixed.append(self.fix_text(last))
            return None if None in fixed else "\n".join(fixed)
        if "\n" in t:
            return None
        if "<" in t:  # ftfy leaves entities alone; open_clip's html.unescape decodes them
            w = self.fix_text(t)
            return None if w is None else self.unescape_html(self.unescape_html(w))
        v = self.unescape_ftfy(t)  # the first step of ftfy's first pass
        if "\n" in v or ("&" in v and _RISKY_AMP.search(v) is not None):
            return None  # a later pass would decode again
        return self.fix_text(v)


_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")


def _windowed_is_bad(rx) -> Optional[Callable[[str], bool]]:
    """ftfy's is_bad(t), searching only around the non-ASCII characters of t; None if not provable.

    Exact when every alternative of the badness regex needs a non-ASCII character and a match is at
    most W characters long: a match then lies within W - 1 characters of one, i.e. inside an island
    [non-ASCII run start - W + 1, run end + W) (overlapping islands merged). The regex is checked for
    both properties and for anchors other than '^' (which a search from pos > 0 never matches) or
    lookarounds, so whether an island holds a match depends only on its text and on whether it starts
    the caption: islands repeat across captions ("café", emoji), and their answers are cached.
    """
    try:
        try:
            import re._parser as sre_parse
        except ImportError:  # Python < 3.11
            import sre_parse
        from re import _constants as c
    except ImportError:
        return None
    try:
        tree = sre_parse.parse(rx.pattern, rx.flags)
        width = tree.getwidth()[1]
        if rx.flags & (re.IGNORECASE | re.MULTILINE) or width > 64:
            return None

        def nonascii_item(op, av) -> bool:
            if op is c.LITERAL:
                return av >= 128
            if op is c.IN:
                for iop, iav in av:
                    if iop is c.LITERAL and iav >= 128:
                        continue
                    if iop is c.RANGE and iav[0] >= 128:
                        continue
                    return False
                return True
            if op is c.SUBPATTERN:
                return needs_nonascii(av[-1])
            if op is c.BRANCH:
                return all(needs_nonascii(b) for b in av[1])
            return False

        def needs_nonascii(seq) -> bool:
            return any(nonascii_item(op, av) for op, av in seq)

        def anchors_ok(seq) -> bool:
            for op, av in seq:
                if op is c.AT and av is not c.AT_BEGINNING:
                    return False
                if op in (c.ASSERT, c.ASSERT_NOT, c.GROUPREF, c.GROUPREF_EXISTS):
                    return False
                if op is c.SUBPATTERN and not anchors_ok(av[-1]):
                    return False
                if op is c.BRANCH and not all(anchors_ok(b) for b in av[1]):
                    return False
                if op in (c.MAX_REPEAT, c.MIN_REPEAT) and not anchors_ok(av[2]):
                    return False
            return True

        if not (needs_nonascii(tree) and anchors_ok(tree)):
            return None
    except Exception:  # noqa: BLE001
        return None
    search = rx.search
    spots = _NON_ASCII_RUN.finditer
    seen: Dict[Tuple[str, bool], bool] = {}

    def is_bad(t: str) -> bool:
        islands = []
        for m in spots(t):
            a, b = max(0, m.start() - width + 1), min(len(t), m.end() - 1 + width)
            if islands and a <= islands[-1][1]:
                islands[-1][1] = b
            else:
                islands.append([a, b])
        for a, b in islands:
            key = (t[a:b], a == 0)  # a match inside [a, b) depends on these alone
            bad = seen.get(key)
            if bad is None:
                if len(seen) > 200_000:
                    seen.clear()
                bad = seen[key] = search(t, a, b) is not None
            if bad:
                return True
        return False

    return is_bad


_FTFY_GATE: Optional[_FtfyGate] = None


def ftfy_gate() -> _FtfyGate:
    """The per-process ftfy gate (built once, ~0.5 s; built before forking so workers inherit it)."""
    global _FTFY_GATE
    if _FTFY_GATE is None:
        _FTFY_GATE = _FtfyGate()
    return _FTFY_GATE


def trivial_clean(text: str) -> Optional[str]:
    """X with open_clip's 'lower' cleaning of text == " ".join(X.split()).lower(); None if unsure.

    X is text itself for printable ASCII without an '&' that could start an entity; otherwise the
    ftfy gate computes ftfy + html.unescape exactly where it can. None: run open_clip's cleaning.
    """
    if text.isascii() and text.isprintable() and ("&" not in text or _RISKY_AMP.search(text) is None):
        return text
    return ftfy_gate().basic_clean(text)


def clean_lower(text: str) -> str:
    """open_clip's lower cleaning, skipping ftfy/html where they provably change nothing."""
    t = trivial_clean(text)
    if t is not None:
        return " ".join(t.split()).lower()
    return _CLEAN_LOWER(text)


class _Growable:
    """An int64 numpy array with amortised O(1) append (the per-word token table)."""

    def __init__(self):
        self.a = np.zeros(1024, dtype=np.int64)
        self.n = 0

    def extend(self, values: Sequence[int]) -> None:
        k = len(values)
        if self.n + k > len(self.a):
            new = np.zeros(max(2 * len(self.a), self.n + k), dtype=np.int64)
            new[: self.n] = self.a[: self.n]
            self.a = new
        self.a[self.n : self.n + k] = values
        self.n += k

    def view(self) -> np.ndarray:
        return self.a[: self.n]


COUNT_BATCH = 8192  # captions per numpy pass of DocFreqCounter: amortises its fixed costs
_SEP = "\x01"  # joins printable captions into one string; never inside a printable caption


_MIX1, _MIX2, _MIX3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0x632BE59BD9B4E019), np.uint64(0xD6E8FEB86659FD93)
_BYTE_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)  # the low k bytes


class _PackedWordIndex:
    """Word -> row for words of 1-16 ASCII bytes without NUL, looked up for a whole batch in numpy.

    A word's bytes, packed little-endian into two uint64 keys, are the word itself (no byte is 0,
    so the length is implied): the index is exact, not a hash of the text. Open addressing with
    linear probing, at most half full; probes run as vectorised rounds.
    """

    def __init__(self, bits: int = 16):
        self.bits = bits
        self.k1 = np.zeros(1 << bits, dtype=np.uint64)
        self.k2 = np.zeros(1 << bits, dtype=np.uint64)
        self.row = np.full(1 << bits, -1, dtype=np.int64)  # -1: empty slot
        self.size = 0

    def _slot(self, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        """Top bits of a multiplicative mix of both keys (uint64 products wrap, as intended)."""
        h = (k1 * _MIX1) ^ ((k2 + _MIX2) * _MIX3)
        return (h >> np.uint64(64 - self.bits)).astype(np.int64)

    def lookup(self, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        """Rows of the words, -1 where absent."""
        out = np.full(len(k1), -1, dtype=np.int64)
        todo = np.arange(len(k1))
        slot = self._slot(k1, k2)
        mask = (1 << self.bits) - 1
        while len(todo):
            row = self.row[slot]
            hit = (row >= 0) & (self.k1[slot] == k1[todo]) & (self.k2[slot] == k2[todo])
            out[todo[hit]] = row[hit]
            go = (row >= 0) & ~hit
            todo, slot = todo[go], (slot[go] + 1) & mask
        return out

    def insert(self, k1: np.ndarray, k2: np.ndarray, rows: np.ndarray) -> None:
        """Add distinct words that are not in the index yet."""
        if 2 * (self.size + len(rows)) > (1 << self.bits):
            used = self.row >= 0
            old = (self.k1[used], self.k2[used], self.row[used])
            bits = self.bits
            while 2 * (self.size + len(rows)) > (1 << bits):
                bits += 1
            self.__init__(bits)
            self.insert(*old)
        self.size += len(rows)
        todo = np.arange(len(rows))
        slot = self._slot(k1, k2)
        mask = (1 << self.bits) - 1
        while len(todo):
            free = self.row[slot] < 0
            taken, first = np.unique(slot[free], return_index=True)  # one word per free slot this round
            won = todo[free][first]
            self.k1[taken], self.k2[taken], self.row[taken] = k1[won], k2[won], rows[won]
            placed = np.zeros(len(rows), dtype=bool)
            placed[won] = True
            go = ~placed[todo]
            todo, slot = todo[go], (slot[go] + 1) & mask


_NO_MERGE = float("inf")
_UNICODE_CLASSES = (r"[\p{L}]", r"[\p{N}]", r"[^\s\p{L}\p{N}]")  # those of SimpleTokenizer's pattern


def ascii_twin_pattern(pat) -> Optional["re.Pattern"]:
    """A stdlib `re` twin of SimpleTokenizer's `regex` pattern, equal on ASCII text and ~3x faster; or None.

    The twin is the same pattern text with each Unicode class replaced by the explicit set of
    ASCII characters it matches. It is used only where the pattern has no other Unicode construct
    and each twin class provably matches the same ASCII characters (checked here, with the
    pattern's flags), so on ASCII input both engines walk the same alternatives over the same
    characters.
    """
    try:
        import regex
    except ImportError:
        return None
    if pat.flags & ~(regex.IGNORECASE | regex.UNICODE | regex.VERSION0):
        return None
    flags = re.IGNORECASE if pat.flags & regex.IGNORECASE else 0
    ascii_chars = [chr(i) for i in range(128)]
    twin = pat.pattern
    for uni in _UNICODE_CLASSES:
        u = regex.compile(uni, pat.flags)
        members = [c for c in ascii_chars if u.fullmatch(c)]
        asc = "[" + "".join(f"\\x{ord(c):02x}" for c in members) + "]"
        a = re.compile(asc, flags)
        if not members or any(bool(u.fullmatch(c)) != bool(a.fullmatch(c)) for c in ascii_chars):
            return None
        twin = twin.replace(uni, asc)
    if "\\p" in twin or "\\P" in twin:
        return None
    return re.compile(twin, flags)


class DocFreqCounter:
    """Counts, per token id, the captions containing it; ids equal tokenizer.encode(caption) exactly.

    Why it is fast: SimpleTokenizer.encode cleans every caption with ftfy + html.unescape and runs
    its regex over it. Where the cleaning's result can be had without running ftfy (printable
    ASCII without entities: nothing to do; most other text: the ftfy gate, see _FtfyGate) ftfy is
    skipped. The regex never matches across whitespace, so encoding a caption equals encoding each
    whitespace-separated word of the cleaned text; every distinct word gets an index and its ids
    are computed once. A batch of captions is then lower-cased and split in one C call, mapped to
    word indices in one pass, and expanded to (caption, token) pairs, deduplicated and counted in
    numpy. Other captions take open_clip's own cleaning function, then the same word table.
    Tokenizers other than SimpleTokenizer are counted with their own encoder, caption by caption.
    """

    def __init__(self, tokenizer, max_cache: int = 500_000):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer_vocab_size(tokenizer)
        self.doc_freq = np.zeros(self.vocab_size, dtype=np.int64)
        self.num_captions = 0
        self._max_cache = max_cache
        self._pieces: Dict[str, tuple] = {}  # regex piece -> ids
        self._reset_words()
        if _is_simple_tokenizer(tokenizer):
            self._mode = "words"
            self._clean = tokenizer.clean_fn
            base = next(c for c in _simple_tokenizer_classes() if isinstance(tokenizer, c))
            self._ascii_fast = tokenizer.clean_fn is sys.modules[base.__module__].get_clean_fn("lower")
            self._ranks = tokenizer.bpe_ranks
            self._ascii_pat = ascii_twin_pattern(tokenizer.pat)
        else:
            self._mode = "generic"
            self._clean = getattr(tokenizer, "clean_fn", lambda s: s)
            self._ascii_fast = False

    def _reset_words(self) -> None:
        self._index: Dict[str, int] = {_SEP: 0}  # cleaned word -> row of the word table
        self._starts = _Growable()  # row -> first position in _toks
        self._lens = _Growable()  # row -> number of token ids
        self._toks = _Growable()  # token ids of all words, back to back
        self._starts.extend([0])
        self._lens.extend([0])
        self._packed = _PackedWordIndex()  # the same rows, for short ASCII words

    def _bpe(self, token: str) -> List[str]:
        """SimpleTokenizer.bpe(token).split(" "), ~2.8x faster (new words are most of a cold start).

        The same algorithm: merge the adjacent pair of lowest merge rank, every occurrence left to
        right, until no pair has a rank (ranks are distinct, so the pair chosen is the same). The pair
        ranks are kept in a list and only the two neighbours of each merge are looked up again, where
        open_clip rebuilds every pair each round: a round costs a C-level min() instead of a dict
        lookup per symbol. A merged symbol never forms the chosen pair with a neighbour (it is longer
        than either half), so the next occurrence is the next entry of that rank. Tokens in the
        tokenizer's cache (its special tokens) come from there. Exactness is tested against open_clip's
        BPE and SimpleTokenizer.encode on unicode, emoji, entities, URLs, long captions and 100+ locales.
        """
        hit = self.tokenizer.cache.get(token)
        if hit is not None:
            return hit.split(" ")
        ranks = self._ranks
        word = [*token[:-1], token[-1] + "</w>"]
        pair_ranks = [ranks.get(pair, _NO_MERGE) for pair in zip(word, word[1:])]
        while pair_ranks:
            best = min(pair_ranks)
            if best == _NO_MERGE:
                break
            at = pair_ranks.index(best)
            while True:
                merged = word[at] + word[at + 1]
                word[at : at + 2] = [merged]
                del pair_ranks[at]
                if at:
                    pair_ranks[at - 1] = ranks.get((word[at - 1], merged), _NO_MERGE)
                if at < len(pair_ranks):
                    pair_ranks[at] = ranks.get((merged, word[at + 1]), _NO_MERGE)
                if best not in pair_ranks:  # the entries up to `at` are not `best`: any is further right
                    break
                at = pair_ranks.index(best, at + 1)
        return word

    def _piece_ids(self, piece: str) -> tuple:
        """Ids of one regex piece: the body of SimpleTokenizer.encode's loop."""
        be = self.tokenizer.byte_encoder
        enc = self.tokenizer.encoder
        return tuple(enc[t] for t in self._bpe("".join(be[b] for b in piece.encode("utf-8"))))

    def _add_words(self, new: List[str]) -> None:
        """Tokenize distinct new words in one pass and append them to the word table.

        The regex runs once over the words joined by spaces: its pieces never hold whitespace and
        almost always tile the words, so cumulative piece lengths tell which word each piece
        belongs to. Where the regex skips a character (U+0345 matches none of its alternatives),
        piece positions are used instead.
        """
        joined = " ".join(new)
        pat = self._ascii_pat if self._ascii_pat is not None and joined.isascii() else self.tokenizer.pat
        pieces = pat.findall(joined)
        pc = self._pieces
        for p in set(pieces).difference(pc):
            pc[p] = self._piece_ids(p)
        ids = list(map(pc.__getitem__, pieces))
        wlen = np.fromiter(map(len, new), dtype=np.int64, count=len(new))
        wend = np.cumsum(wlen)
        pend = np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)))
        if not len(pieces) or pend[-1] == wend[-1]:
            owner = np.searchsorted(wend, pend, side="left")
        else:
            wstart = wend - wlen + np.arange(len(new))  # offsets in `joined`
            pos = np.fromiter((m.start() for m in pat.finditer(joined)), dtype=np.int64,
                              count=len(pieces))
            owner = np.searchsorted(wstart, pos, side="right") - 1
        ntok = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        toks = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(ntok.sum()))
        wtok = np.bincount(owner, weights=ntok, minlength=len(new)).astype(np.int64)
        self._starts.extend(self._toks.n + np.cumsum(wtok) - wtok)
        self._lens.extend(wtok)
        self._toks.extend(toks)
        index = self._index
        index.update(zip(new, range(len(index), len(index) + len(new))))

    def _word_rows(self, words: List[str]) -> np.ndarray:
        index = self._index
        rows = np.fromiter(map(index.get, words, itertools.repeat(-1)), dtype=np.int64, count=len(words))
        miss = np.flatnonzero(rows < 0)
        if len(miss):
            missing = [words[i] for i in miss.tolist()]
            self._add_words(list(dict.fromkeys(missing)))
            rows[miss] = np.fromiter(map(index.__getitem__, missing), dtype=np.int64, count=len(missing))
        return rows

    def _plain_rows(self, texts: List[str]) -> np.ndarray:
        """Word rows of cleaned texts whose only whitespace is ' ', a row 0 (no tokens) between texts.

        Printable text has no whitespace but ' ' (str.isprintable is False for every other
        character str.split() splits on), so the words of " ".join(t.split()).lower() are the runs
        of bytes other than b' ' in the UTF-8 of the lower-cased, joined texts. Words of up to 16
        bytes are looked up in the packed index; longer and new words go through the dict (and new
        short ones are then added to the packed index).
        """
        text = (" " + _SEP + " ").join(texts).lower()
        ascii_only = text.isascii()
        raw = text.encode("ascii" if ascii_only else "utf-8")
        edge = np.diff((np.frombuffer(raw, dtype=np.uint8) != 32).view(np.int8), prepend=np.int8(0),
                       append=np.int8(0))
        starts = np.flatnonzero(edge == 1)
        lens = np.flatnonzero(edge == -1) - starts
        short = np.flatnonzero(lens <= 16)
        # unaligned uint64 windows: window i holds bytes i..i+7 (little-endian)
        windows = np.ndarray((len(raw) + 9,), dtype="<u8", buffer=raw + bytes(16), strides=(1,))
        at, n = starts[short], lens[short]
        k1 = windows[at] & _BYTE_MASKS[np.minimum(n, 8)]
        k2 = windows[at + 8] & _BYTE_MASKS[np.clip(n - 8, 0, 8)]
        rows = np.full(len(starts), -1, dtype=np.int64)
        rows[short] = self._packed.lookup(k1, k2)
        miss = np.flatnonzero(rows < 0)
        if len(miss):
            begin = starts[miss].tolist()
            spans = zip(begin, lens[miss].tolist())
            words = [text[a : a + k] for a, k in spans] if ascii_only else [raw[a : a + k].decode() for a, k in spans]
            rows[miss] = self._word_rows(words)
            learn = np.flatnonzero(np.isin(short, miss, assume_unique=True))
            if len(learn):
                first = np.unique(rows[short[learn]], return_index=True)[1]
                pick = learn[first]
                self._packed.insert(k1[pick], k2[pick], rows[short[pick]])
        return rows

    def _generic_ids(self, caption: str):
        hf = self.tokenizer.tokenizer
        return hf(self._clean(caption), add_special_tokens=False, truncation=False)["input_ids"]

    def add_many(self, captions: Iterable[str]) -> int:
        """Count captions (strings); returns how many were added."""
        n = 0
        it = iter(captions)
        while True:
            batch = list(itertools.islice(it, COUNT_BATCH))
            if not batch:
                return n
            if self._mode == "words":
                self._add_batch(batch)
            else:
                ids = [set(self._generic_ids(c)) for c in batch]
                flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
                self.doc_freq += np.bincount(flat, minlength=self.vocab_size)[: self.vocab_size]
            self.num_captions += len(batch)
            n += len(batch)

    def _add_batch(self, batch: List[str]) -> None:
        if len(self._index) > self._max_cache:  # bound memory on huge vocabularies of words
            self._reset_words()
            self._pieces.clear()
        fast: List[str] = []
        slow_words: List[str] = []
        slow_lens: List[int] = []
        clean = self._clean

        def slow(c: str) -> None:
            ws = clean(c).split(" ")
            slow_words.extend(ws)
            slow_lens.append(len(ws))

        if not self._ascii_fast:
            for c in batch:
                slow(c)
        else:
            k = len(batch)
            # printable ASCII without '&' needs no cleaning: three C-level passes find the rest
            plain = np.fromiter(map(str.isascii, batch), dtype=bool, count=k)
            plain &= np.fromiter(map(str.isprintable, batch), dtype=bool, count=k)
            plain &= ~np.fromiter(map(operator.contains, batch, itertools.repeat("&")), dtype=bool, count=k)
            if plain.all():
                fast = batch
            else:
                fast = list(itertools.compress(batch, plain.tolist()))
                for i in np.flatnonzero(~plain).tolist():
                    c = batch[i]
                    x = trivial_clean(c)
                    if x is None:
                        slow(c)
                    elif x.isprintable():
                        fast.append(x)  # cleaned already; only ' ' is whitespace in it
                    else:
                        ws = " ".join(x.split()).lower().split(" ")
                        slow_words.extend(ws)
                        slow_lens.append(len(ws))
        # word rows of the fast captions, separated by _SEP (row 0: no tokens), and their caption numbers
        rows_f = self._plain_rows(fast) if fast else np.zeros(0, dtype=np.int64)
        cap_f = np.cumsum(rows_f == 0)
        rows_s = self._word_rows(slow_words)
        cap_s = np.repeat(np.arange(len(fast), len(fast) + len(slow_lens), dtype=np.int64), slow_lens)
        rows = np.concatenate([rows_f, rows_s])
        caps = np.concatenate([cap_f, cap_s])
        lens = self._lens.view()[rows]
        total = int(lens.sum())
        if total == 0:
            return
        ends = np.cumsum(lens)
        pos = np.repeat(self._starts.view()[rows] - (ends - lens), lens) + np.arange(total, dtype=np.int64)
        tok = self._toks.view()[pos]
        key = np.repeat(caps, lens) * self.vocab_size + tok
        key.sort(kind="stable")  # + neighbour test; runs already sorted by caption: stable (timsort) wins
        keep = np.empty(total, dtype=bool)
        keep[0] = True
        np.not_equal(key[1:], key[:-1], out=keep[1:])
        self.doc_freq += np.bincount(key[keep] % self.vocab_size, minlength=self.vocab_size)

    def result(self) -> Tuple[np.ndarray, int]:
        return self.doc_freq, self.num_captions

    def reset(self) -> None:
        """Zero the counts; the word table is kept."""
        self.doc_freq[:] = 0
        self.num_captions = 0


def naive_doc_freq(captions: Iterable[str], tokenizer=None) -> Tuple[np.ndarray, int]:
    """Reference: tokenizer.encode per caption, set() of ids. Slow; for tests and the benchmark."""
    tok = tokenizer if tokenizer is not None else get_tokenizer("")
    df = np.zeros(tokenizer_vocab_size(tok), dtype=np.int64)
    n = 0
    for c in captions:
        n += 1
        for i in set(tok.encode(c)):
            df[i] += 1
    return df, n


# ---------------------------------------------------------------------------------------------------
# Input reading: one reader for webdataset shards and CSV/TSV files (used by idf and cooccur)
# ---------------------------------------------------------------------------------------------------


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


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Brace-expand patterns ('::' also separates sources, as in open_clip); a local dir lists its shards."""
    import braceexpand

    urls: List[str] = []
    for spec in inputs:
        for part in spec.split("::"):
            if not part:
                continue
            for u in braceexpand.braceexpand(part):
                local = u[len("file://"):] if u.startswith("file://") else u  # file://DIR lists DIR too
                if "://" not in local and not local.startswith("pipe:") and os.path.isdir(local):
                    found = sorted(
                        os.path.join(u, f)
                        for f in os.listdir(local)
                        if f.endswith((".tar", ".tar.gz", ".tgz", ".csv", ".tsv", ".csv.gz", ".tsv.gz"))
                    )
                    if not found:
                        raise ValueError(f"{u}: directory holds no .tar/.csv/.tsv files")
                    urls.extend(found)
                else:
                    urls.append(u)
    return urls


def _kind_of(url: str, input_format: str) -> Tuple[str, str]:
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


def _is_local(url: str) -> bool:
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


_ZERO_BLOCK = bytes(512)
_META_RE = re.compile(r"__[^/]*__($|/)")


def _octal(field: bytes, what: str, offset: int) -> int:
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


_TAR_SIZE_SUM_TYPE = struct.Struct("124x12s12x8sB")  # size, chksum, typeflag
_TAR_NAMES = struct.Struct("100s157x6s82x155s")  # name, magic, prefix


_OCT6 = 8 ** np.arange(5, -1, -1, dtype=np.int64)
_OCT11 = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_USTAR = np.frombuffer(b"ustar\x00", dtype=np.uint8)
_PAX_KEYS_THAT_MOVE_DATA = (b"path=", b"size=")
_NAME_COLS = np.arange(100)


def split_member_name(name: str) -> Optional[Tuple[str, str]]:
    """webdataset's (sample key, lower-case extension) of a member name; None for names it skips."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1 or (name[:2] == "__" and _META_RE.match(name)):
        return None
    return name[:dot], name[dot + 1 :].lower()


@dataclasses.dataclass
class TarRun:
    """Consecutive regular members of a tar stream (those with a sample key), in order."""

    datas: List[bytes]  # data of the wanted members (of every member when nothing is asked for)
    wanted: List[bool]  # per member
    new_key: List[bool]  # per member: its key differs from the previous member's (entry 0: unknown here)
    first_key: str
    last_key: str
    names: Callable[[], List[str]]  # member names, computed on demand (errors, iter_tar_members)

    @classmethod
    def one(cls, name: str, key: str, data: Optional[bytes]) -> "TarRun":
        return cls([] if data is None else [data], [data is not None], [True], key, key, lambda: [name])


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


_MTIME_RECORD = np.frombuffer(b" mtime=", dtype=np.uint8)


def _only_mtime_records(heads9: np.ndarray, sizes: np.ndarray) -> bool:
    """Whether each pax data block (first 9 bytes, and its size) is a single 'NN mtime=...' record."""
    length = (heads9[:, 0].astype(np.int64) - 48) * 10 + (heads9[:, 1].astype(np.int64) - 48)
    digits = (heads9[:, :2] >= 48) & (heads9[:, :2] <= 57)
    return bool((digits.all(axis=1) & (heads9[:, 2:] == _MTIME_RECORD).all(axis=1) & (length == sizes)).all())


def _tar_bulk(buf: bytes, pos: int, want: Optional[str], end: int) -> Optional[Tuple[TarRun, int]]:
    """Parse a run of plain members (types '0' and 'x') lying wholly in buf[pos:], in numpy.

    Why: a Python loop over headers costs microseconds a member, and text-only webdataset shards
    hold a pax-headed member every 1 KB. Every block that could be a header gets its size parsed
    at once, so walking the chain is one list lookup a header; checksums, field formats, pax
    records and names are then handled for the whole run. The run stops before anything else
    (other types, unusual field formats, a bad checksum, pax records that could set path or size,
    a member not wholly in buf[pos:end]), which the careful loop in _iter_tar_runs then handles, errors
    included. Returns (run, new pos) or None.
    """
    nb = (end - pos) // 512
    if nb < 32:
        return None
    blocks = np.frombuffer(buf, dtype=np.uint8, count=nb * 512, offset=pos).reshape(nb, 512)
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
        hp = linked  # the usual case: the candidates are exactly the chain of headers from block 0
    else:  # data that looks like a header: walk the chain (one list lookup a header)
        nxt_list = nxt.tolist()
        chain: List[int] = []
        i = 0
        while 0 <= (j := nxt_list[i]) <= nb:  # nxt_list[nb] is -1: the walk ends at the buffer's end
            chain.append(i)
            i = j
        hp = np.asarray(chain, dtype=np.int64)
    if len(hp) < 16:
        return None
    heads = np.take(blocks, hp, axis=0)
    sizes = size_at[hp]
    chk = heads[:, 148:156].astype(np.int64)
    chk_digits = chk[:, :6] - 48
    fmt_ok = (chk[:, 6] == 0) & (chk[:, 7] == 32) & ((chk_digits >= 0) & (chk_digits <= 7)).all(axis=1)
    total = heads.sum(axis=1, dtype=np.uint32).astype(np.int64) - chk.sum(axis=1) + 256
    good = fmt_ok & (total == chk_digits @ _OCT6)
    n = len(hp) if good.all() else int(np.argmin(good))
    typs = heads[:n, 156]
    pax = np.flatnonzero(typs == 0x78)
    if len(pax):  # a pax record that could name a path or size: the careful loop takes it from there
        widest = int(sizes[pax].max())
        data_at = np.minimum(hp[pax] + 1, nb - 1)  # a pax of size 0 has no data block: it matches nothing
        if widest < min(map(len, _PAX_KEYS_THAT_MOVE_DATA)):
            suspect = []
        elif widest > 512:
            at = (pos + (hp[pax] + 1) * 512).tolist()
            suspect = [r for r, a, k in zip(pax.tolist(), at, sizes[pax].tolist())
                       if any(needle in buf[a : a + k] for needle in _PAX_KEYS_THAT_MOVE_DATA)]
        elif _only_mtime_records(np.take(blocks[:, :9], data_at, axis=0), sizes[pax]):
            suspect = []  # what tarfile writes for webdataset: one "NN mtime=..." record each
        else:
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
            suspect = pax[hit].tolist()
        if suspect:
            n = min(n, suspect[0])
    while n and typs[n - 1] == 0x78:  # a pax header belongs with its member: leave both
        n -= 1
    if n < 1:
        return None
    rows = np.flatnonzero(typs[:n] == 0x30)
    if not len(rows):
        return None
    member = heads[rows]
    name_field = member[:, :100]
    zero = name_field == 0
    nul_inside = (zero[:, :-1] & ~zero[:, 1:]).any(axis=1)
    prefixed = (member[:, 257:263] == _USTAR).all(axis=1) & (member[:, 345] != 0)
    starts = pos + (hp[rows] + 1) * 512
    lens = sizes[rows]

    def all_names() -> List[str]:
        raw = np.ascontiguousarray(name_field).view("S100").ravel().tolist()  # trailing NULs dropped
        for r in np.flatnonzero(nul_inside).tolist():
            raw[r] = raw[r].split(b"\0", 1)[0]
        for r in np.flatnonzero(prefixed).tolist():
            raw[r] = bytes(member[r, 345:500]).split(b"\0", 1)[0] + b"/" + raw[r]
        return [x.decode("utf-8", "surrogateescape") for x in raw]

    used = np.flatnonzero(~zero.all(axis=0))
    width = min(100, int(used[-1]) + 2) if len(used) else 1  # columns that hold names, and one NUL
    fast = None if nul_inside.any() or prefixed.any() else _ascii_names_in_bulk(name_field[:, :width], want)
    if fast is not None:
        wanted, new_key, first_dot = fast
        first_key, last_key = (bytes(name_field[r, : first_dot[r]]).decode("ascii") for r in (0, -1))
        wanted_l, new_l, names = wanted.tolist(), new_key.tolist(), all_names
    else:
        named = all_names()
        parts = [split_member_name(nm) for nm in named]
        keep = [p is not None for p in parts]
        if not any(keep):
            return None
        named = list(itertools.compress(named, keep))
        parts = list(itertools.compress(parts, keep))
        starts, lens = starts[keep], lens[keep]
        keys = [p[0] for p in parts]
        wanted_l = [want is None or p[1] == want for p in parts]
        new_l = list(map(operator.ne, keys, [None, *keys[:-1]]))
        first_key, last_key = keys[0], keys[-1]
        names = named.copy
    sel = np.asarray(wanted_l, dtype=bool)
    datas = [buf[a : a + k] for a, k in zip(starts[sel].tolist(), lens[sel].tolist())]
    return TarRun(datas, wanted_l, new_l, first_key, last_key, names), pos + int(nxt[hp[n - 1]]) * 512


def iter_tar_members(
    f, want: Optional[str] = None, seekable: bool = False
) -> Iterator[Tuple[str, str, str, Optional[bytes]]]:
    """Yield (name, sample key, extension, data) for the regular members of a tar stream (see _iter_tar_runs)."""
    for run in _iter_tar_runs(f, want, seekable):
        datas = iter(run.datas)
        for name, wanted in zip(run.names(), run.wanted):
            yield (name, *split_member_name(name), bytes(next(datas)) if wanted else None)


def _iter_tar_runs(f, want: Optional[str] = None, seekable: bool = False) -> Iterator[TarRun]:
    """Yield the regular members of a tar stream as runs: parallel lists of names, keys, extensions, data.

    Keys and extensions follow webdataset (key = name up to the first dot of the base name,
    extension lower-cased; names without one and __meta__ names are skipped). Data is read only
    for extension `want` (all members when None), else None. A small strict reader instead of
    tarfile (which costs ~100 us a member here): it checks every header checksum, refuses
    truncation and a missing end-of-archive block, and handles ustar, pax and GNU long names.
    Long runs of plain members go through _tar_bulk; everything else through the loop below, a
    member at a time. Local files are memory-mapped (no copy; unwanted data is never touched); other streams are read
    in 4 MB chunks, unwanted data read and dropped. The
    checksum is first tested modulo 65521 with zlib.adler32 (C speed; corrupting fewer than 257
    bytes always changes it), then exactly, before an error is raised.
    """
    mapped = None
    if seekable and hasattr(f, "fileno"):
        try:
            if hasattr(mmap, "MAP_POPULATE"):  # Linux: map the pages up front, not a fault each
                mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
            else:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # an empty file, or one that cannot be mapped: read it
            mapped = None
    try:
        yield from _scan_tar(f, want, seekable, mapped)
    finally:
        if mapped is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view: the GC unmaps it
                mapped.close()


def _scan_tar(f, want: Optional[str], seekable: bool, mapped) -> Iterator[TarRun]:
    """The reader behind _iter_tar_runs; `mapped` is the whole file when it is memory-mapped."""
    chunk = 4 << 20
    buf = b"" if mapped is None else mapped
    pos = 0
    base = 0  # stream offset of buf[0]
    long_name: Optional[str] = None
    pax: Dict[str, str] = {}
    adler32 = zlib.adler32
    unpack = _TAR_SIZE_SUM_TYPE.unpack_from
    unpack_names = _TAR_NAMES.unpack_from

    readinto = getattr(f, "readinto", None)

    def need(n: int) -> bool:
        """Make n bytes available at pos, reading a chunk (straight into the new buffer where possible)."""
        nonlocal buf, pos, base
        if len(buf) - pos >= n or mapped is not None:
            return len(buf) - pos >= n
        base += pos
        if readinto is None:
            parts = [buf[pos:]]
            have = len(parts[0])
            while have < n:
                more = f.read(max(chunk, n - have))
                if not more:
                    break
                parts.append(more)
                have += len(more)
            buf, pos = b"".join(parts), 0
            return have >= n
        new = bytearray(max(chunk, n))
        have = len(buf) - pos
        new[:have] = memoryview(buf)[pos:]
        with memoryview(new) as view:
            while have < n:
                got = readinto(view[have:])
                if not got:
                    break
                have += got
        del new[have:]
        buf, pos = new, 0
        return have >= n

    bulk_pause = 0
    while True:
        if long_name is None and not pax and len(buf) - pos >= 65536:
            if bulk_pause:
                bulk_pause -= 1
            else:
                bulk = _tar_bulk(buf, pos, want, min(len(buf), pos + chunk))
                if bulk is not None:
                    run, pos = bulk
                    yield run
                    continue
                bulk_pause = 64  # nothing bulk-able here: the careful loop takes a stretch
        if len(buf) - pos < 512 and not need(512):
            if len(buf) - pos == 0:
                raise ValueError(
                    "truncated tar: no end-of-archive block" if base + pos else "empty file, not a tar archive"
                )
            raise ValueError(f"truncated tar: partial header at byte {base + pos}")
        sz, chk, typ = unpack(buf, pos)
        try:
            stored = int(chk.rstrip(b"\0 "), 8)
        except ValueError:
            if buf[pos : pos + 512] == _ZERO_BLOCK:
                return
            stored = _octal(chk, "checksum", base + pos)
        hdr = buf[pos : pos + 512]
        if ((adler32(hdr) & 0xFFFF) + 255 - sum(chk) - stored) % 65521 and not _checksum_ok(hdr, stored):
            raise ValueError(
                f"invalid tar header at byte {base + pos} (checksum mismatch): corrupt or not a tar file"
            )
        if sz[0] & 0x80:
            size = _octal(sz, "size", base + pos)
        else:
            try:
                size = int(sz.rstrip(b"\0 ") or b"0", 8)
            except ValueError:
                size = _octal(sz, "size", base + pos)
        off = base + pos
        pos += 512
        padded = (size + 511) & ~511
        if typ == 0x78 or typ == 0x67 or typ == 0x4C or typ == 0x4B:  # x g L K: extended headers
            if len(buf) - pos < padded and not need(padded):
                raise ValueError(f"truncated tar: extended header at byte {off} cut short")
            data = buf[pos : pos + size]
            pos += padded
            if typ == 0x78:
                if b"path=" in data or b"size=" in data:
                    pax = _pax_records(data, off)
            elif typ == 0x4C:
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if long_name is not None:
            name = long_name
            long_name = None
        elif "path" in pax:
            name = pax["path"]
        else:
            raw_name, magic, raw_prefix = unpack_names(buf, off - base)
            i = raw_name.find(0)
            name = (raw_name if i < 0 else raw_name[:i]).decode("utf-8", "surrogateescape")
            if raw_prefix[0] and magic == b"ustar\x00":
                name = raw_prefix.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        if pax:
            if "size" in pax:
                size = int(pax["size"])
                padded = (size + 511) & ~511
            pax = {}
        if typ == 0x30 or typ == 0 or typ == 0x37:
            key, ext = split_member_name(name) or (None, None)
        elif 0x31 <= typ <= 0x36:
            key = None
        else:
            raise ValueError(f"unsupported tar member type {chr(typ)!r} for {name!r} at byte {off}")
        if key is not None and (want is None or ext == want):
            if len(buf) - pos < padded and not need(padded):
                raise ValueError(f"truncated tar: member {name!r} cut short")
            data = buf[pos : pos + size]
            pos += padded
            yield TarRun.one(name, key, data)
            continue
        inbuf = len(buf) - pos
        if padded <= inbuf:
            pos += padded
        elif mapped is not None:
            raise ValueError(f"truncated tar: member {name!r} cut short")
        else:  # skip data beyond the buffer
            todo = padded - inbuf
            base += len(buf)
            buf, pos = b"", 0
            if seekable:
                here = f.tell()
                end = f.seek(0, 2)
                if here + todo > end:
                    raise ValueError(f"truncated tar: member {name!r} cut short")
                f.seek(here + todo)
            else:
                left = todo
                while left:
                    got = f.read(min(left, 1 << 22))
                    if not got:
                        raise ValueError(f"truncated tar: member {name!r} cut short")
                    left -= len(got)
            base += todo
        if key is not None:
            yield TarRun.one(name, key, None)


def _json_field(obj, field: str):
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
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError(f"{where}: caption field is {type(value).__name__}, expected a string or list of strings")


def _decode_captions(run: TarRun, ext: str) -> List[str]:
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


def _iter_wds(unit: Unit, key: CaptionKey, stats: ReadStats) -> Iterator[List[str]]:
    f = open_url(unit.url)
    try:
        head = f.read(2)
        if head == b"\x1f\x8b":
            stream = gzip.GzipFile(fileobj=_Prefixed(head, f), mode="rb")
            seekable = False
        elif _is_local(unit.url):
            f.seek(0)
            stream, seekable = f, True
        else:
            stream, seekable = _Prefixed(head, f), False
        tally = _SampleTally(stats)
        for run in _iter_tar_runs(stream, key.ext, seekable):
            if key.field is None:
                caps, has = _decode_captions(run, key.ext), run.wanted
            else:
                caps, has = _json_captions(run, key.field)
            tally.add(run, has)
            if caps:
                yield caps
        tally.close()
    finally:
        f.close()  # for pipe: this also checks the command's exit status


def _iter_csv(unit: Unit, column: str, stats: ReadStats) -> Iterator[List[str]]:
    f = open_url(unit.url)
    try:
        raw = f
        head = f.read(2)
        raw = _Prefixed(head, f)
        if head == b"\x1f\x8b":
            raw = gzip.GzipFile(fileobj=raw, mode="rb")
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
            if len(batch) >= 4096:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        f.close()


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


def iter_caption_batches(
    unit: Unit, key: CaptionKey, csv_key: str = "title", stats: Optional[ReadStats] = None
) -> Iterator[List[str]]:
    """The single caption reader shared by `superclip idf` and `superclip cooccur`, a list at a time."""
    stats = stats if stats is not None else ReadStats()
    if unit.kind == "csv":
        return _iter_csv(unit, csv_key, stats)
    return _iter_wds(unit, key, stats)


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


# ---------------------------------------------------------------------------------------------------
# Running units in worker processes, with progress and error reporting
# ---------------------------------------------------------------------------------------------------

_PROGRESS_QUEUE = None


def _worker_init(queue) -> None:
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
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def _progress_bar(desc: str, enabled: bool):
    from tqdm import tqdm

    class _Bar(tqdm):
        monitor_interval = 0  # no monitor thread: worker processes are forked while the bar lives

    return _Bar(desc=desc, unit="cap", unit_scale=True, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5)


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
    total = len(units)
    bar = _progress_bar(desc, progress)
    done = 0

    def shards_done():
        bar.set_postfix_str(f"shards {done}/{total}{position_info}", refresh=False)

    shards_done()
    errors: List[Tuple[str, str]] = []
    try:
        if limit is not None:
            remaining = int(limit)
            for i, u in enumerate(units):
                if remaining <= 0:
                    break
                try:
                    result = task(u, bar.update, limit=remaining)
                except Exception as e:  # noqa: BLE001
                    errors.append((u.label, f"{type(e).__name__}: {e}"))
                    break
                on_result(i, result)
                remaining -= count_of(result)
                done += 1
                shards_done()
        elif jobs <= 1 or total <= 1:
            for i, u in enumerate(units):
                try:
                    result = task(u, bar.update)
                except Exception as e:  # noqa: BLE001
                    errors.append((u.label, f"{type(e).__name__}: {e}"))
                    break
                on_result(i, result)
                done += 1
                shards_done()
        else:
            ctx = _mp_context()
            queue = ctx.Queue()
            with cf.ProcessPoolExecutor(
                max_workers=min(jobs, total), mp_context=ctx, initializer=_worker_init, initargs=(queue,)
            ) as pool:
                futs = {pool.submit(_guarded, task, u): i for i, u in enumerate(units)}
                pending = set(futs)
                try:
                    while pending and not errors:
                        finished, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                        _drain(queue, bar)
                        for fut in finished:
                            i = futs[fut]
                            try:
                                status, value = fut.result()
                            except Exception as e:  # noqa: BLE001 - e.g. a worker killed by the OOM killer
                                status, value = "error", f"worker process died ({type(e).__name__}: {e})"
                            if status == "ok":
                                on_result(i, value)
                                done += 1
                            else:
                                errors.append((units[i].label, value))
                        shards_done()
                finally:
                    for fut in pending:
                        fut.cancel()
                    _drain(queue, bar)
            _drain(queue, bar)
            queue.close()
    finally:
        bar.close()
    if errors:
        raise UnitFailure(errors)


def _drain(queue, bar) -> None:
    try:
        while True:
            bar.update(queue.get_nowait())
    except Exception:  # noqa: BLE001 - queue.Empty
        pass


_COUNTERS: Dict[Tuple[str, int], DocFreqCounter] = {}


def _process_counter(model: str, max_cache: int) -> DocFreqCounter:
    """One counter per process and tokenizer, so the word cache stays warm from shard to shard."""
    k = (model, max_cache)
    if k not in _COUNTERS:
        _COUNTERS[k] = DocFreqCounter(get_tokenizer(model), max_cache=max_cache)
    return _COUNTERS[k]


def _count_unit(
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


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def _dist_env() -> Tuple[int, int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    except ImportError:
        pass
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


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


def _all_reduce_counts(vec: np.ndarray, errors: List[str], backend: str, timeout: float, local_rank: int):
    """Sum an int64 vector over ranks and gather every rank's error messages."""
    import torch
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    t = torch.from_numpy(vec).to(device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    gathered: List[Optional[List[str]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, errors)
    return t.cpu().numpy(), gathered, own


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.output = local_output_path(args.output, "-o")
    except ValueError as e:
        print(f"superclip idf: error: {e}", file=sys.stderr)
        return 2
    if args.merge:
        if _dist_env()[0] != 0:
            return 0  # under a launcher, rank 0 alone merges
        try:
            n, v = merge_idf_counts(args.inputs, args.output)
        except ValueError as e:
            print(f"superclip idf --merge: error: {e}", file=sys.stderr)
            return 1
        print(f"merged {len(args.inputs)} files: {n} captions, vocab {v} -> {args.output}")
        return 0
    if not args.inputs:
        print("superclip idf: error: no inputs given", file=sys.stderr)
        return 2
    try:
        key = CaptionKey.parse(args.key)
        urls = expand_inputs(args.inputs)
    except ValueError as e:
        print(f"superclip idf: error: {e}", file=sys.stderr)
        return 2
    rank, world, local_rank = _dist_env()
    jobs = max(1, args.jobs)
    if args.limit is not None:
        jobs = 1
    units = make_units(urls, args.input_format, csv_parts=world * jobs if args.limit is None else 1,
                       csv_sep=args.csv_separator)
    if args.limit is not None:
        mine = units if rank == 0 else []
    else:
        mine = units[rank::world]
    tok = get_tokenizer(args.model)  # built before forking so workers inherit it
    ftfy_gate()
    ident = tokenizer_identity(tok)
    vocab = tokenizer_vocab_size(tok)
    t0 = time.time()
    vec = np.zeros(vocab + 4, dtype=np.int64)  # doc_freq, captions, samples, missing, failed flag

    def add(_i, result) -> None:
        df, n, samples, missing = result
        vec[:vocab] += df
        vec[vocab] += n
        vec[vocab + 1] += samples
        vec[vocab + 2] += missing

    errors: List[str] = []
    progress = not args.no_progress and rank == 0
    try:
        task = _partial(_count_unit, model=args.model, key=key, csv_key=args.csv_key,
                        max_cache=args.max_word_cache)
        info = f" rank 0 of {world}" if world > 1 else ""
        run_units(mine, task, add, jobs, desc="idf", progress=progress, position_info=info,
                  limit=args.limit, count_of=lambda r: r[1])
    except UnitFailure as e:
        errors = [f"{u}: {msg}" for u, msg in e.errors]
    except Exception as e:  # noqa: BLE001 - anything else must still reach the all_reduce
        errors = [f"{type(e).__name__}: {e}"]
    if errors:
        vec[vocab + 3] = 1
        for msg in errors:
            print(f"superclip idf: rank {rank}: failed: {msg}" if world > 1 else f"superclip idf: failed: {msg}",
                  file=sys.stderr, flush=True)
    all_errors = [errors]
    own_pg = False
    if world > 1:
        vec, all_errors, own_pg = _all_reduce_counts(vec, errors, args.dist_backend, args.dist_timeout, local_rank)
    failed = int(vec[vocab + 3])
    status = 0
    try:
        if failed:
            if rank == 0:
                for r, errs in enumerate(all_errors):
                    for msg in errs or []:
                        where = f" (rank {r})" if world > 1 else ""
                        print(f"superclip idf: error{where}: {msg}", file=sys.stderr)
                print(f"superclip idf: {failed} rank(s)/run(s) failed; {args.output} was NOT written", file=sys.stderr)
            status = 1
        elif rank == 0:
            n = int(vec[vocab])
            meta = {
                "tool": "open_clip_superclip.idf_build",
                "inputs": list(args.inputs),
                "num_units": len(units),
                "key": args.key,
                "csv_key": args.csv_key,
                "model": args.model,
                "limit": args.limit,
                "samples": int(vec[vocab + 1]),
                "samples_missing_caption": int(vec[vocab + 2]),
                "world_size": world,
                "jobs": jobs,
                "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            try:
                save_idf_counts(args.output, vec[:vocab], n, ident, meta)
            except (OSError, ValueError) as e:
                print(f"superclip idf: error writing {args.output}: {e}", file=sys.stderr)
                status = 1
            else:
                dt = max(time.time() - t0, 1e-9)
                miss = int(vec[vocab + 2])
                print(
                    f"superclip idf: {n} captions from {len(units)} unit(s) in {dt:.1f}s ({n / dt:,.0f} captions/s); "
                    f"{int(np.count_nonzero(vec[:vocab]))} distinct tokens; "
                    f"{miss} sample(s) without caption; wrote {args.output}"
                )
        if world > 1:
            import torch
            import torch.distributed as dist

            st = torch.tensor([status], dtype=torch.int64)
            if dist.get_backend() == "nccl":
                st = st.cuda()
            dist.broadcast(st, src=0)
            status = max(status, int(st.item()))
    finally:
        if own_pg:
            import torch.distributed as dist

            dist.destroy_process_group()
    return status


def _partial(fn, **kw):
    import functools

    return functools.partial(fn, **kw)


if __name__ == "__main__":
    sys.exit(main())
