"""Keyword co-occurrence counts over a caption corpus (SuperCLIP paper, appendix A.2, Tables 1-4).

Why: the paper argues that fine-grained attributes are rare next to their objects (e.g. captions with
"man" and "newspaper": 333 of 10M; of those, with "real" or "statue": 6). `superclip cooccur` counts
such groups over the same inputs `superclip idf` reads, with the same reader and text cleaning.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import regex

from ..atomic import local_output_path, write_atomically
from .idf.captions import iter_captions
from .idf.cleaning import clean_lower
from .idf.parallel import UnitFailure, run_units
from .idf.sources import CaptionKey, ReadStats, expand_inputs, make_units

# words, and runs of punctuation kept as tokens so that a phrase never matches across punctuation
_WORD_RE = regex.compile(r"[\p{L}\p{N}]+|[^\s\p{L}\p{N}]+")

_IRREGULAR = {
    "person": ["people", "persons"],
    "child": ["children"],
    "foot": ["feet"],
    "tooth": ["teeth"],
    "mouse": ["mice"],
    "goose": ["geese"],
    "ox": ["oxen"],
    "die": ["dice"],
    "leaf": ["leaves"],
    "knife": ["knives"],
    "wife": ["wives"],
    "life": ["lives"],
    "wolf": ["wolves"],
    "shelf": ["shelves"],
    "calf": ["calves"],
    "half": ["halves"],
    "loaf": ["loaves"],
    "cactus": ["cacti", "cactuses"],
    "fish": ["fish", "fishes"],
    "sheep": ["sheep"],
    "deer": ["deer"],
}


def plural_forms(word: str) -> List[str]:
    """English plural candidates of a lower-case word (regular rules plus a few irregular nouns)."""
    forms = [word + "s"]
    if word.endswith(("s", "x", "z", "ch", "sh", "o")):
        forms.append(word + "es")
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        forms.append(word[:-1] + "ies")
    if word.endswith("man") and word not in ("human", "german", "shaman", "talisman", "caiman"):
        forms.append(word[:-3] + "men")
    forms.extend(_IRREGULAR.get(word, []))
    return forms


@dataclasses.dataclass(frozen=True)
class Keyword:
    """A keyword (one word or a phrase) with all the word sequences that count as a match."""

    text: str
    forms: Tuple[Tuple[str, ...], ...]

    @classmethod
    def parse(cls, text: str, plurals: bool) -> "Keyword":
        words = tuple(_WORD_RE.findall(clean_lower(text)))
        if not any(regex.match(r"[\p{L}\p{N}]", w) for w in words):
            raise ValueError(f"keyword {text!r} holds no letters or digits")
        forms = [words]
        if plurals:
            forms.extend(words[:-1] + (p,) for p in plural_forms(words[-1]))
        seen = []
        for f in forms:
            if f not in seen:
                seen.append(f)
        return cls(" ".join(words), tuple(seen))


@dataclasses.dataclass(frozen=True)
class Group:
    """BASE keywords that must all occur, and CONDITION keywords of which any one must also occur."""

    base: Tuple[Keyword, ...]
    cond: Tuple[Keyword, ...]

    @property
    def base_text(self) -> str:
        return "+".join(k.text for k in self.base)

    @property
    def cond_text(self) -> str:
        return "|".join(k.text for k in self.cond)

    @classmethod
    def parse(cls, spec: str, plurals: bool = False) -> "Group":
        """Parse 'man+newspaper:real|statue' (the ':CONDITION' part is optional)."""
        base_s, _, cond_s = spec.partition(":")
        base = tuple(Keyword.parse(w, plurals) for w in base_s.split("+") if w.strip())
        if not base:
            raise ValueError(f"group {spec!r}: no base keywords (expected e.g. man+newspaper:real|statue)")
        cond = tuple(Keyword.parse(w, plurals) for w in cond_s.split("|") if w.strip())
        if cond_s.strip() and not cond:
            raise ValueError(f"group {spec!r}: empty condition")
        return cls(base, cond)


class Matcher:
    """Tests captions against keywords: whole words after open_clip's text cleaning, case-insensitive."""

    def __init__(self, groups: Sequence[Group]):
        self.groups = list(groups)
        keys: Dict[str, Keyword] = {}
        for g in self.groups:
            for k in g.base + g.cond:
                keys[k.text] = k
        self.keywords = list(keys.values())
        self._single = {k.text: {f[0] for f in k.forms if len(f) == 1} for k in self.keywords}
        self._phrases = {k.text: [" " + " ".join(f) + " " for f in k.forms if len(f) > 1] for k in self.keywords}
        self._any_phrase = any(self._phrases.values())

    def present(self, caption: str) -> set:
        """Texts of the keywords present in the caption."""
        words = _WORD_RE.findall(clean_lower(caption))
        ws = set(words)
        joined = " " + " ".join(words) + " " if self._any_phrase else ""
        out = set()
        for k in self.keywords:
            t = k.text
            if not ws.isdisjoint(self._single[t]) or any(p in joined for p in self._phrases[t]):
                out.add(t)
        return out

    def match(self, caption: str) -> List[Tuple[bool, bool]]:
        """Per group: (all base keywords present, and also some condition keyword present)."""
        got = self.present(caption)
        res = []
        for g in self.groups:
            base = all(k.text in got for k in g.base)
            cond = base and (not g.cond or any(k.text in got for k in g.cond))
            res.append((base, cond if g.cond else False))
        return res


def _count_unit(unit, report, groups: Sequence[Group], key: CaptionKey, csv_key: str,
                examples: int = 0, limit: Optional[int] = None):
    """(counts int64 [G, 2] of base / base+condition, captions, examples per group)."""
    import itertools

    m = Matcher(groups)
    counts = np.zeros((len(groups), 2), dtype=np.int64)
    ex: List[List[str]] = [[] for _ in groups]
    n = 0
    gen = iter_captions(unit, key, csv_key, ReadStats())
    it = gen if limit is None else itertools.islice(gen, limit)
    try:
        since = 0
        for cap in it:
            n += 1
            since += 1
            for gi, (b, c) in enumerate(m.match(cap)):
                if b:
                    counts[gi, 0] += 1
                    if c:
                        counts[gi, 1] += 1
                        if len(ex[gi]) < examples:
                            ex[gi].append(cap)
            if since >= 4096:
                report(since)
                since = 0
        report(since)
    finally:
        gen.close()
    return counts, n, ex


@dataclasses.dataclass
class CooccurResult:
    groups: List[Group]
    counts: np.ndarray  # int64 [G, 2]
    num_captions: int
    examples: List[List[str]]

    def rows(self) -> List[Dict[str, object]]:
        out = []
        n = self.num_captions
        for g, (b, c) in zip(self.groups, self.counts.tolist()):
            out.append({
                "keywords": g.base_text,
                "condition": g.cond_text,
                "total_captions": n,
                "captions_with_keywords": b,
                "pct_of_all": 100.0 * b / n if n else 0.0,
                "captions_with_condition": c if g.cond else "",
                "pct_of_keyword_captions": (100.0 * c / b if b else 0.0) if g.cond else "",
            })
        return out


def count_cooccurrence(
    inputs: Sequence[str],
    groups: Sequence[Group],
    key: str = "txt",
    csv_key: str = "title",
    csv_separator: Optional[str] = None,
    input_format: str = "auto",
    jobs: int = 1,
    limit: Optional[int] = None,
    examples: int = 0,
    progress: bool = False,
) -> CooccurResult:
    """Count keyword groups over shards / CSV files; raises UnitFailure naming a failing shard."""
    ck = CaptionKey.parse(key)
    units = make_units(expand_inputs(inputs), input_format, csv_parts=max(1, jobs) if limit is None else 1,
                       csv_sep=csv_separator)
    counts = np.zeros((len(groups), 2), dtype=np.int64)
    total = [0]
    per_unit_ex: Dict[int, List[List[str]]] = {}

    def add(i, r):
        c, n, ex = r
        counts[...] += c
        total[0] += n
        if examples:
            per_unit_ex[i] = ex

    task = functools.partial(_count_unit, groups=list(groups), key=ck, csv_key=csv_key, examples=examples)
    run_units(units, task, add, jobs, desc="cooccur", progress=progress, limit=limit, count_of=lambda r: r[1])
    merged: List[List[str]] = [[] for _ in groups]
    for i in sorted(per_unit_ex):
        for gi, ex in enumerate(per_unit_ex[i]):
            merged[gi].extend(ex[: max(0, examples - len(merged[gi]))])
    return CooccurResult(list(groups), counts, total[0], merged)


def _fmt_pct(v) -> str:
    return "" if v == "" else f"{v:.4f}%" if v and v < 0.01 else f"{v:.2f}%"


def to_markdown(res: CooccurResult) -> str:
    lines = [
        f"Captions: {res.num_captions:,}",
        "",
        "| keywords | condition | captions with keywords | % of all captions | + condition | % of keyword captions |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in res.rows():
        cond = r["condition"] or "-"
        cc = "" if r["captions_with_condition"] == "" else f"{r['captions_with_condition']:,}"
        lines.append(
            f"| {r['keywords']} | {cond} | {r['captions_with_keywords']:,} | {_fmt_pct(r['pct_of_all'])} | "
            f"{cc} | {_fmt_pct(r['pct_of_keyword_captions'])} |"
        )
    if any(res.examples):
        lines += ["", "Examples (keywords + condition):"]
        for g, ex in zip(res.groups, res.examples):
            for e in ex:
                lines.append(f"- {g.base_text} : {g.cond_text} -> {e!r}")
    return "\n".join(lines) + "\n"


def to_csv(res: CooccurResult) -> str:
    buf = io.StringIO()
    cols = ["keywords", "condition", "total_captions", "captions_with_keywords", "pct_of_all",
            "captions_with_condition", "pct_of_keyword_captions"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in res.rows():
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="superclip cooccur",
        description="Count captions containing keyword groups and, among those, a condition word "
        "(SuperCLIP appendix A.2). Example: -g 'man+newspaper:real|statue'.",
    )
    p.add_argument("inputs", nargs="+", help="webdataset shards / CSV / TSV, as for `superclip idf`")
    p.add_argument("-g", "--group", action="append", required=True, metavar="KW+KW[:COND|COND]",
                   help="keywords that must all occur, then ':' and words of which one must also occur; "
                   "repeatable; a keyword may be a phrase ('hot dog')")
    p.add_argument("--plurals", action="store_true", help="also match plural forms (dog/dogs, man/men, ...)")
    p.add_argument("--key", default="txt", help="caption member: txt (default), another extension, or json:FIELD")
    p.add_argument("--csv-key", default="title", help="caption column of CSV/TSV inputs (default: title)")
    p.add_argument("--csv-separator", default=None)
    p.add_argument("--input-format", choices=("auto", "wds", "csv", "tsv"), default="auto")
    p.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--limit", type=int, default=None, help="stop after N captions")
    p.add_argument("--examples", type=int, default=0, help="list up to K matching captions per group")
    p.add_argument("--md", default=None, help="also write the markdown table to this file")
    p.add_argument("--csv", default=None, help="write the table as CSV to this file")
    p.add_argument("--quiet", action="store_true", help="do not print the table to stdout")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        groups = [Group.parse(g, args.plurals) for g in args.group]
        CaptionKey.parse(args.key)
        args.md = args.md and local_output_path(args.md, "--md")
        args.csv = args.csv and local_output_path(args.csv, "--csv")
    except ValueError as e:
        print(f"superclip cooccur: error: {e}", file=sys.stderr)
        return 2
    try:
        res = count_cooccurrence(
            args.inputs, groups, key=args.key, csv_key=args.csv_key, csv_separator=args.csv_separator,
            input_format=args.input_format, jobs=max(1, args.jobs), limit=args.limit,
            examples=max(0, args.examples), progress=not args.no_progress,
        )
    except UnitFailure as e:
        for u, msg in e.errors:
            print(f"superclip cooccur: failed: {u}: {msg}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"superclip cooccur: error: {e}", file=sys.stderr)
        return 1
    md = to_markdown(res)
    if not args.quiet:
        sys.stdout.write(md)
    try:
        if args.md:
            write_atomically(args.md, lambda f: f.write(md.encode("utf-8")))
        if args.csv:
            text = to_csv(res)
            write_atomically(args.csv, lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        print(f"superclip cooccur: error writing output: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
