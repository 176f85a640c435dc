"""Tests of `superclip cooccur`: keyword-group counts over shards and CSV files."""

import csv
import os
import sys
from pathlib import Path

import pytest

try:
    import open_clip_superclip.tools.cooccur  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import webdataset as wds  # noqa: E402

from open_clip_superclip.tools import cooccur as C  # noqa: E402

CAPS = [
    "A man reading a newspaper on a bench",            # base
    "A MAN, newspaper in hand, next to a statue.",     # base + cond
    "Statue of a man holding a newspaper",             # base + cond
    "men reading newspapers",                          # base only with --plurals
    "woman with a newspaper",                          # no: 'woman' is not 'man'
    "manhattan newspaper stand",                       # no: whole words only
    "a real man &amp; his newspaper",                  # base + cond (entity decoded)
    "hot dog on a plate",                              # phrase
    "a hot, dog",                                      # not the phrase: punctuation between
    "dogs and a hot dog stand",                        # phrase + plural
    "",
    "caf\u00e9 newspaper man",                         # base
]


@pytest.fixture
def inputs(tmp_path):
    shard = tmp_path / "s.tar"
    with wds.TarWriter(str(shard)) as w:
        for i, c in enumerate(CAPS[:7]):
            w.write({"__key__": f"{i:03d}", "txt": c, "json": {"caption": c}})
    p = tmp_path / "rest.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["title"])
        for c in CAPS[7:]:
            wr.writerow([c])
    return [str(shard), str(p)]


def counts(inputs, specs, plurals=False, **kw):
    groups = [C.Group.parse(s, plurals) for s in specs]
    res = C.count_cooccurrence(inputs, groups, **kw)
    return res, [tuple(r) for r in res.counts.tolist()]


def test_counts_and_plurals(inputs):
    res, got = counts(inputs, ["man+newspaper:real|statue", "hot dog", "dog"])
    assert res.num_captions == len(CAPS)
    assert got[0] == (5, 3)
    assert got[1][0] == 2 and got[2][0] == 3
    res, got = counts(inputs, ["man+newspaper:real|statue", "hot dog", "dog"], plurals=True)
    assert got[0] == (6, 3)
    assert got[2][0] == 3


def test_parallel_limit_and_json_key(inputs):
    _, a = counts(inputs, ["man+newspaper:real|statue"], jobs=2)
    assert a == [(5, 3)]
    res, b = counts(inputs, ["man+newspaper:real|statue"], limit=3)
    assert res.num_captions == 3 and b == [(3, 2)]
    res, c = counts(inputs[:1], ["man+newspaper:statue"], key="json:caption")
    assert res.num_captions == 7 and c == [(4, 2)]


def test_cli_outputs(inputs, tmp_path, capsys):
    md, cs = tmp_path / "t.md", tmp_path / "t.csv"
    rc = C.main([*inputs, "-g", "man+newspaper:real|statue", "-g", "hot dog", "--md", str(md), "--csv", str(cs),
                 "--examples", "2", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| man+newspaper | real|statue | 5 |" in out and "60.00%" in out
    assert md.read_text() == out
    rows = list(csv.DictReader(open(cs)))
    assert rows[0]["captions_with_keywords"] == "5" and rows[0]["captions_with_condition"] == "3"
    assert rows[1]["keywords"] == "hot dog" and rows[1]["captions_with_condition"] == ""
    assert "Statue of a man" in out  # an example caption


def test_cli_errors(inputs, tmp_path, capsys):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(os.urandom(3000))
    assert C.main([inputs[0], str(bad), "-g", "man", "--no-progress", "--csv", str(tmp_path / "x.csv")]) == 1
    assert "bad.tar" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()
    assert C.main([inputs[0], "-g", "+:", "--no-progress"]) == 2


def test_plural_forms():
    assert "men" in C.plural_forms("man") and "women" in C.plural_forms("woman")
    assert "boxes" in C.plural_forms("box") and "puppies" in C.plural_forms("puppy")
    assert "humans" in C.plural_forms("human") and "humen" not in C.plural_forms("human")
    k = C.Keyword.parse("x-ray", plurals=True)
    assert ("x", "-", "rays") in k.forms
    m = C.Matcher([C.Group.parse("x-ray:chest")])
    assert m.match("Chest X-Ray, frontal") == [(True, True)] and m.match("x ray chest") == [(False, False)]
