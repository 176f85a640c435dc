"""open_clip's tokenizer for the IDF tools, loaded without importing open_clip where possible.

Why: `import open_clip` also loads torch, torchvision, timm and the model code (~10 s on a busy CPU), while
`superclip idf` needs only open_clip/tokenizer.py, which has no package-relative imports.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Dict, Optional

from ...idf_counts import OPEN_CLIP_TOKENIZER_COPY, simple_tokenizer_classes

_TOKENIZERS: Dict[str, object] = {}
_UNICODE_CLASSES = (r"[\p{L}]", r"[\p{N}]", r"[^\s\p{L}\p{N}]")  # those of SimpleTokenizer's pattern


def tokenizer_module():
    """open_clip's tokenizer module: open_clip's own if imported, else a copy loaded from its file."""
    mod = sys.modules.get("open_clip.tokenizer") or sys.modules.get(OPEN_CLIP_TOKENIZER_COPY)
    if mod is not None:
        return mod
    try:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
        path = os.path.join(os.path.dirname(spec.origin), "tokenizer.py")
        tspec = importlib.util.spec_from_file_location(OPEN_CLIP_TOKENIZER_COPY, path)
        mod = importlib.util.module_from_spec(tspec)
        sys.modules[OPEN_CLIP_TOKENIZER_COPY] = mod
        tspec.loader.exec_module(mod)
        return mod
    except Exception:  # noqa: BLE001 - any surprise: the ordinary import
        sys.modules.pop(OPEN_CLIP_TOKENIZER_COPY, None)
        import open_clip.tokenizer

        return open_clip.tokenizer


def get_tokenizer(model: str = ""):
    """open_clip's tokenizer for `model` (plain CLIP BPE SimpleTokenizer when empty); cached per process."""
    if model not in _TOKENIZERS:
        if model:
            import open_clip

            _TOKENIZERS[model] = open_clip.get_tokenizer(model)
        else:
            _TOKENIZERS[model] = tokenizer_module().SimpleTokenizer()
    return _TOKENIZERS[model]


def simple_tokenizer_base(tok):
    """The SimpleTokenizer class tok is an exact instance of (encode not overridden), else None.

    Why: only then are its ids the union of its words' ids, so the per-word fast path applies.
    """
    for c in simple_tokenizer_classes():
        if isinstance(tok, c) and type(tok).encode is c.encode:
            return c
    return None


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
