"""open_clip's 'lower' text cleaning (ftfy, html.unescape twice, whitespace, lower case), skipped where provably a no-op.

Why: ftfy costs most of SimpleTokenizer.encode's time, yet leaves almost every caption unchanged. The gate
below computes ftfy.fix_text exactly at C speed where it can, and says when it cannot. docs/idf.md, Speed.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Dict, Optional, Tuple

from .tokenizer import tokenizer_module


def _clean_lower_exact(text: str) -> str:
    """open_clip's 'lower' cleaning, imported rather than copied so it cannot drift."""
    global _CLEAN_LOWER
    _CLEAN_LOWER = tokenizer_module().get_clean_fn("lower")
    return _CLEAN_LOWER(text)


_CLEAN_LOWER: Callable[[str], str] = _clean_lower_exact
_RISKY_AMP = re.compile(r"&(?! |\Z)")  # an '&' that html.unescape or ftfy could read as an entity
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_FIXERS = ("fix_c1_controls", "fix_latin_ligatures", "fix_character_width", "uncurl_quotes",
           "fix_line_breaks", "fix_surrogates", "remove_terminal_escapes", "remove_control_chars")


def _checked_ftfy_config(ftfy):
    """ftfy's default config; raise unless fix_and_explain runs exactly the fixers the gate knows, as usual."""
    names = set()
    stack = list(ftfy.fix_and_explain.__code__.co_consts)
    while stack:
        c = stack.pop()
        if isinstance(c, tuple):
            stack.extend(c)
        elif isinstance(c, str) and c in ftfy.FIXERS:
            names.add(c)
    if names != set(_FIXERS) | {"unescape_html"}:
        raise RuntimeError(f"ftfy runs other fixers: {sorted(names)}")
    cfg = ftfy.TextFixerConfig()
    if (cfg.normalization != "NFC" or not cfg.fix_encoding or cfg.unescape_html != "auto"
            or not all(getattr(cfg, n) for n in _FIXERS)):
        raise RuntimeError("ftfy defaults differ")
    return cfg


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

        cfg = _checked_ftfy_config(ftfy)
        every = "".join(chr(i) for i in range(0x110000) if not 0xD800 <= i < 0xE000 and i != 10)
        quotes = set(cd.SINGLE_QUOTE_RE.findall(every)) | set(cd.DOUBLE_QUOTE_RE.findall(every))
        touched = {chr(k) for k in (*cd.LIGATURES, *cd.WIDTH_MAP, *cd.CONTROL_CHARS)} | quotes
        touched.update(cd.C1_CONTROL_RE.findall(every))
        touched.update(chr(i) for i in range(0xD800, 0xE000))  # surrogates
        touched.update("\n\r\x85\u2028\u2029\x1b")
        safe = "".join(ch for ch in every if ch not in touched)
        if any(ftfy.FIXERS[n](safe) != safe for n in _FIXERS):
            raise RuntimeError("a fixer changes characters outside its tables")
        if any(ftfy.FIXERS[n]("a\nb\n") != "a\nb\n" for n in _FIXERS):
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


def _sre_modules():
    """(sre_parse, sre constants) of this Python, or None."""
    try:
        try:
            import re._parser as sre_parse
        except ImportError:  # Python < 3.11
            import sre_parse
        from re import _constants as c
    except ImportError:
        return None
    return sre_parse, c


def _needs_nonascii(seq, c) -> bool:
    """Whether every match of the parsed sequence holds a non-ASCII character (some item needs one)."""
    return any(_nonascii_item(op, av, c) for op, av in seq)


def _nonascii_item(op, av, c) -> bool:
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
        return _needs_nonascii(av[-1], c)
    if op is c.BRANCH:
        return all(_needs_nonascii(b, c) for b in av[1])
    return False


def _anchors_ok(seq, c) -> bool:
    """No anchor but '^', no lookaround or group reference, anywhere in the parsed sequence."""
    for op, av in seq:
        if op is c.AT and av is not c.AT_BEGINNING:
            return False
        if op in (c.ASSERT, c.ASSERT_NOT, c.GROUPREF, c.GROUPREF_EXISTS):
            return False
        if op is c.SUBPATTERN and not _anchors_ok(av[-1], c):
            return False
        if op is c.BRANCH and not all(_anchors_ok(b, c) for b in av[1]):
            return False
        if op in (c.MAX_REPEAT, c.MIN_REPEAT) and not _anchors_ok(av[2], c):
            return False
    return True


def _island_width(rx) -> Optional[int]:
    """The longest match W of rx if the windowed search is provably exact for it, else None."""
    sre = _sre_modules()
    if sre is None:
        return None
    sre_parse, c = sre
    try:
        tree = sre_parse.parse(rx.pattern, rx.flags)
        width = tree.getwidth()[1]
        if rx.flags & (re.IGNORECASE | re.MULTILINE) or width > 64:
            return None
        if not (_needs_nonascii(tree, c) and _anchors_ok(tree, c)):
            return None
    except Exception:  # noqa: BLE001
        return None
    return width


def _windowed_is_bad(rx) -> Optional[Callable[[str], bool]]:
    """ftfy's is_bad(t), searching only around the non-ASCII characters of t; None if not provable.

    Exact when every alternative of the badness regex needs a non-ASCII character and a match is at
    most W characters long: a match then lies within W - 1 characters of one, i.e. inside an island
    [non-ASCII run start - W + 1, run end + W) (overlapping islands merged). The regex is checked for
    both properties and for anchors other than '^' (which a search from pos > 0 never matches) or
    lookarounds, so whether an island holds a match depends only on its text and on whether it starts
    the caption: islands repeat across captions ("café", emoji), and their answers are cached.
    """
    width = _island_width(rx)
    if width is None:
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
