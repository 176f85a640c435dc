"""The IDF counts file (`superclip idf` writes it, the trainer reads it) and the tokenizer identity it records.

Core: imports numpy, torch (lazily) and core modules only. The builder lives in `open_clip_superclip.tools.idf`;
docs/idf.md describes the format.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import sys
import zipfile
import zlib
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np

from .atomic import write_atomically

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "superclip-idf-counts"
FORMAT_VERSION = 1
_REQUIRED_FIELDS = ("format", "format_version", "doc_freq", "num_captions", "vocab_size", "tokenizer")

# The tools load open_clip/tokenizer.py under this name without importing open_clip (see
# open_clip_superclip.tools.idf.tokenizer); its SimpleTokenizer is open_clip's too, for the identity.
OPEN_CLIP_TOKENIZER_COPY = "open_clip_superclip._open_clip_tokenizer"


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


def _read_fields(path: str, bad) -> dict:
    """Every array of the file (reading each member checks its zip CRC); format and fields present."""
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
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if str(e).startswith("IDF counts file"):
            raise
        raise bad(f"unreadable, truncated or corrupt ({type(e).__name__}: {e})") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, TypeError) as e:
        raise bad(f"unreadable, truncated or corrupt ({type(e).__name__}: {e})") from e


def _read_counts_file(path: str) -> Tuple[np.ndarray, int, int, str, dict]:
    """Read and check a counts file; every problem becomes a ValueError that names the file."""
    path = os.fspath(path)

    def bad(msg: str) -> ValueError:
        return ValueError(f"IDF counts file {path!r}: {msg}")

    fields = _read_fields(path, bad)

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
        "tool": "open_clip_superclip.tools.idf --merge",
        "merged_from": [os.path.abspath(p) for p in paths],
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    save_idf_counts(out, total, n_total, first[2], meta)
    return n_total, first[1]


# ---------------------------------------------------------------------------------------------------
# Tokenizer identity: recorded in every file so that counts of another tokenizer are recognised
# ---------------------------------------------------------------------------------------------------


def simple_tokenizer_classes() -> list:
    """open_clip's SimpleTokenizer class, from open_clip and from the lightweight copy, where loaded."""
    out = []
    for name in ("open_clip.tokenizer", OPEN_CLIP_TOKENIZER_COPY):
        mod = sys.modules.get(name)
        if mod is not None:
            out.append(mod.SimpleTokenizer)
    return out


def _identity_hash(items) -> str:
    """First 16 hex digits of the sha256 of the (token, id) table in id order."""
    h = hashlib.sha256()
    for t, i in sorted(items, key=lambda kv: kv[1]):
        h.update(f"{i}\t{t}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def tokenizer_identity(tok) -> str:
    """A string that changes when the tokenizer class, cleaning, vocabulary or ids change."""
    cached = getattr(tok, "_superclip_identity", None)
    if cached:
        return cached
    if any(isinstance(tok, c) for c in simple_tokenizer_classes()):
        digest = _identity_hash(tok.encoder.items())
        clean = getattr(tok.clean_fn, "__name__", "custom").replace("_clean_", "")
        bpe_name = "bpe_simple_vocab_16e6" if len(tok.encoder) == 49408 else "bpe"
        name = type(tok).__name__
        ident = f"open_clip.{name}/{bpe_name}/{tok.vocab_size}/clean={clean}/vocab-sha256={digest}"
    else:
        hf = getattr(tok, "tokenizer", None)
        if hf is None or not hasattr(hf, "get_vocab"):
            raise ValueError(f"unsupported tokenizer type {type(tok).__name__}")
        digest = _identity_hash(hf.get_vocab().items())
        src = getattr(hf, "name_or_path", "") or "unknown"
        ident = f"open_clip.{type(tok).__name__}/{src}/{len(hf)}/vocab-sha256={digest}"
    try:
        tok._superclip_identity = ident
    except AttributeError:
        pass
    return ident


def tokenizer_vocab_size(tok) -> int:
    """Number of token ids: SimpleTokenizer's vocab_size, or the length of a wrapped HF tokenizer."""
    if hasattr(tok, "vocab_size") and not hasattr(tok, "tokenizer"):
        return int(tok.vocab_size)
    return len(tok.tokenizer)
