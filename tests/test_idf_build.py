"""Tests of `superclip idf`: exact counts, parallel / distributed runs, reader, file format."""

import csv
import functools
import gzip
import http.server
import io
import os
import random
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
try:
    import open_clip_superclip.tools.idf  # noqa: F401
except ImportError:
    sys.path.insert(0, str(SRC))

import webdataset as wds  # noqa: E402

from open_clip_superclip import idf_counts  # noqa: E402
from open_clip_superclip.tools.idf import captions as idf_captions  # noqa: E402
from open_clip_superclip.tools.idf import cleaning as idf_cleaning  # noqa: E402
from open_clip_superclip.tools.idf import command as idf_command  # noqa: E402
from open_clip_superclip.tools.idf import counter as idf_counter  # noqa: E402
from open_clip_superclip.tools.idf import sources as idf_sources  # noqa: E402
from open_clip_superclip.tools.idf import tar_reader as idf_tar_reader  # noqa: E402
from open_clip_superclip.tools.idf import tokenizer as idf_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_idf import make_multilingual_captions  # noqa: E402  (one corpus generator for tests and benchmark)

HARD = [
    "A photo of a cat &amp; a dog",
    "Tom&#39;s &quot;best&quot; pizza &amp;amp; more &lt;b&gt;bold&lt;/b&gt;",
    "<b>html</b> &amp; tags <start_of_text> inside <end_of_text>",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m",
    "e\u0301 combining accent and \u0130stanbul DOTTED",
    "emoji \U0001F389\U0001F44D\U0001F3FD family \U0001F468\u200d\U0001F469\u200d\U0001F467 flags \U0001F1EF\U0001F1F5",
    "\u6771\u4eac\u30bf\u30ef\u30fc \u5317\u4eac \ud55c\uad6d\uc5b4 "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0420\u0443\u0441\u0441\u043a\u0438\u0439",
    "punctuation!!!??? ... --- *** ((nested)) [[x]] {{y}} ~~~ @@@ ### $$$ %%%",
    "https://example.com/path/to/img_01.jpg?size=large&fmt=webp#frag",
    "www.shop.co.uk/item/12345 -- $19.99 (50% off!) 1920x1080 4K UHD",
    "mojibake: caf\u00c3\u00a9 and \u00e2\u0080\u0099quoted\u00e2\u0080\u0099",
    "\u201ccurly quotes\u201d and \u2018single\u2019 \u2014 em dash \u2013 en dash \u2026",
    "fullwidth \uff21\uff22\uff23\uff11\uff12\uff13 ligature \ufb01le \ufb02ow",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic\u2028line\u0085nel",
    "zero\u200bwidth\u200cjoiner\ufeffbom",
    "control\x00\x01\x07\x1b[31mred\x1b[0m\x7f chars",
    "I'M HERE, YOU'RE THERE, WE'VE BEEN, SHE'LL GO, HE'D SAY, IT'S, DON'T",
    "   leading and trailing spaces   ",
    "",
    "   ",
    "\u00a0",
    "numbers 0123456789 3.14159 -42 1e10 \u0661\u0662\u0663 \u00bd \u2460",
    "Mixed \u00dfharp \u0130\u0131 \u03a3\u03c3\u03c2 \u01c5 titlecase",
    "surrogate-free \U0001d400\U0001d401 math bold",
    "&amp;&amp;&amp; &#x27;hex&#x27; &nbsp;space&nbsp; &unknown; &",
    "a" * 300,
    " ".join(["very long caption with many words"] * 120),
    "Hello\u0301World \u0300 standalone combining",
    "skipped by the regex: a\u0345b \u0345 x\u0345 \u0345\u0345y",
]


def _random_caption(rng: random.Random) -> str:
    words = ["dog", "Cat", "running", "beach", "sunset,", "photo", "of", "a", "the", "New", "York", "2019",
             "HD", "image:", "red", "car's", "(stock)", "#travel", "@user", "&amp;", "caf\u00e9", "\U0001F600",
             "\u6771\u4eac", "--", "!!!", "x-ray", "e-mail", "U.S.A.", "3.5mm", "\u201cquote\u201d", "don't"]
    n = rng.randint(0, 30)
    return " ".join(rng.choice(words) for _ in range(n))


def make_captions(n: int, seed: int = 0):
    rng = random.Random(seed)
    caps = [_random_caption(rng) for _ in range(n)]
    for i, h in enumerate(HARD):
        caps[(i * 7) % n] = h
    return caps


def naive(caps):
    return idf_counter.naive_doc_freq(caps)


def write_shards(dirpath: Path, caps, nshards: int, json_field: str = None, with_images: bool = True):
    paths = []
    per = (len(caps) + nshards - 1) // nshards
    for s in range(nshards):
        p = dirpath / f"shard-{s:03d}.tar"
        with wds.TarWriter(str(p)) as w:
            for i, c in enumerate(caps[s * per:(s + 1) * per]):
                sample = {"__key__": f"s{s}_{i:06d}", "txt": c}
                if json_field:
                    sample["json"] = {json_field: c, "other": 1}
                if with_images:
                    sample["jpg"] = bytes([i % 256]) * (100 + 700 * (i % 3))
                w.write(sample)
        paths.append(str(p))
    return paths


def write_csv(path: Path, caps, sep=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["filepath", "title"])
        for i, c in enumerate(caps):
            w.writerow([f"img{i}.jpg", c])
    return str(path)


def run(args):
    return idf_command.main([*map(str, args), "--no-progress"])


def loaded(path):
    c = idf_counts.load_idf_counts(path)
    return c.doc_freq.numpy().astype(np.int64), c.num_captions


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    caps = make_captions(900, seed=1)
    shards = write_shards(d, caps[:600], 3)
    csvp = write_csv(d / "part.csv", caps[600:750])
    tsvp = write_csv(d / "part.tsv", caps[750:], sep="\t")
    ref, n = naive(caps)
    return dict(dir=d, caps=caps, shards=shards, csv=csvp, tsv=tsvp, ref=ref, n=n)


def test_counter_identical_per_caption_on_hard_text():
    """Every caption, alone, gives exactly the id set of SimpleTokenizer.encode."""
    tok = idf_tokenizer.get_tokenizer("")
    counter = idf_counter.DocFreqCounter(tok)
    rng = random.Random(5)
    alphabet = (list("abcXYZ019 .,!?'&;#<>-_/\"") + ["&amp;", "&#39;", "&lt;", " ", "\t", "\n", "\u00e9", "\u00c9",
                "\U0001F600", "\u6771", "\u00a0", "\u200b", "\x1b", "\u2019", "'S", "'LL", "\u0130", "\ufb01"])
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(1500)]
    for cap in HARD + make_captions(200, seed=9) + fuzz:
        counter.reset()
        counter.add_many([cap])
        df, n = counter.result()
        assert n == 1
        assert set(np.nonzero(df)[0].tolist()) == set(tok.encode(cap)), repr(cap)


FUZZ_PIECES = (list("abcXYZ019 .,!?'&;#<>-_/\"()") + [
    "&amp;", "&amp;amp;", "&#39;", "&#x27;", "&lt;", "&gt;", "&quot;", "&nbsp;", "&eacute;", "&EACUTE;", "&#1;",
    "&#10;", "&#x85;", "&#8217;", "&copy", "&am", "&#", " & ", "\t", "\n", "\r", "\x0c", "\u00e9", "\u00c9",
    "\u00fc", "\u00f1", "\u00c3\u00a9", "\u00c3", "\u00a9", "\u00c2", "\u00a0", "\u00e2\u0080\u0099", "\u2019",
    "\u2018", "\u201c", "\u201d", "\u02bc", "\u2014", "\u2013", "\u2026", "\u00bd", "\u00b0", "\u00d7", "\u00b2",
    "\U0001F600", "\u2764\ufe0f", "\U0001F468\u200d\U0001F469", "\u6771\u4eac", "\u30bf", "\uff21", "\uff62",
    "\u3000", "\ufb01", "\u0301", "\u0130", "\u03a3", "\u03c2", "\u0410", "\u0627", "\u200b", "\ufeff",
    "\x1b[31m", "\x00", "\x7f", "\x85", "\x9d", "\u2028", "\ud800", "\U0001d400", "\u212b", "\uf900", "\u0152",
    "\u0153", "\u00d8", "\u00e0\u00b2", "\u2500", "\u00a3", "\u20ac", "\u00ae", "\u2122", "<start_of_text>", "\u0345"])


def _fuzz(n, seed):
    rng = random.Random(seed)
    out = ["".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(0, 12))) for _ in range(n)]
    out += ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randint(1, 8))) for _ in range(n // 4)]
    return out


def test_counter_identical_on_multilingual_real_words():
    """Real words of 100+ locales: every caption alone and the whole batch give SimpleTokenizer's ids, and
    the counter's BPE equals open_clip's on every piece."""
    tok = idf_tokenizer.get_tokenizer("")
    caps = make_multilingual_captions(1500, seed=41)
    assert sum(not c.isascii() for c in caps) > 500
    counter = idf_counter.DocFreqCounter(tok)
    counter.add_many(caps)
    ref, n = naive(caps)
    df, m = counter.result()
    assert m == n and np.array_equal(df, ref)
    reference = idf_tokenizer.tokenizer_module().SimpleTokenizer()
    pieces = set()
    for cap in caps:
        counter.reset()
        counter.add_many([cap])
        assert set(np.nonzero(counter.result()[0])[0].tolist()) == set(tok.encode(cap)), repr(cap)
        pieces.update(tok.pat.findall(idf_cleaning.clean_lower(cap)))
    for piece in pieces:
        token = "".join(tok.byte_encoder[b] for b in piece.encode("utf-8"))
        assert counter._bpe(token) == reference.bpe(token).split(" "), repr(piece)


def test_ftfy_gate_equals_open_clip_cleaning():
    """Where the shortcut answers, it gives open_clip's exact cleaning (ftfy + html.unescape x2)."""
    clean = idf_tokenizer.tokenizer_module().get_clean_fn("lower")
    gate = idf_cleaning.ftfy_gate()
    assert gate.ok
    answered = answered_lines = 0
    for text in HARD + _fuzz(12000, seed=11) + make_multilingual_captions(1500, seed=43):
        x = idf_cleaning.trivial_clean(text)
        if x is not None:
            answered += 1
            answered_lines += "\n" in text
            assert " ".join(x.split()).lower() == clean(text), repr(text)
    assert answered > 4000  # the shortcut does take most non-pathological text
    assert answered_lines > 200  # multi-line text too, a line at a time as ftfy does


def test_windowed_badness_equals_ftfy():
    import ftfy.badness as badness

    windowed = idf_cleaning._windowed_is_bad(badness.BADNESS_RE)
    assert windowed is not None
    rng = random.Random(3)
    alphabet = [chr(i) for i in range(32, 127)] + list(
        "\u00c3\u00c2\u00ce\u00d0\u20ac\u0153\u0160\u00a2\u00a3\u00a0\u00ae\u00a9\u00b0\u00b7\u00bb\u2013\u2014"
        "\u00d7\u00b2\u00d8\u00d9\u00e0\u00b5\u00bd\u221a\u00b1\u2122\u2248\u201a\u00c4\u00ec\u0432\u0402\u0413"
        "\u0412\u03b2\u0392\u0101\u00e9\u00c9\u00fc\u4e1c")
    ascii_part, other = alphabet[:95], alphabet[95:]
    positives = 0
    for i in range(30000):
        if i % 3:  # dense: runs of non-ASCII characters everywhere
            t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        else:  # sparse: islands far apart, close together and at both ends
            t = "".join(rng.choice(other) if rng.random() < 0.08 else rng.choice(ascii_part)
                        for _ in range(rng.randint(0, 90)))
        expected = badness.is_bad(t)
        positives += expected
        assert windowed(t) == expected, repr(t)
    assert positives > 4000


def test_counter_identical_per_caption_on_fuzz():
    tok = idf_tokenizer.get_tokenizer("")
    counter = idf_counter.DocFreqCounter(tok)
    for cap in _fuzz(1200, seed=12):
        counter.reset()
        counter.add_many([cap])
        df, n = counter.result()
        assert set(np.nonzero(df)[0].tolist()) == set(tok.encode(cap)), repr(cap)
    caps = _fuzz(3000, seed=13)
    counter.reset()
    counter.add_many(caps)
    ref, n = naive(caps)
    assert counter.num_captions == n and np.array_equal(counter.doc_freq, ref)


def test_fast_bpe_and_ascii_regex_twin_equal_open_clip():
    """The counter's BPE and its stdlib-re twin of the tokenizer's regex give open_clip's exact results."""
    tok = idf_tokenizer.get_tokenizer("")
    counter = idf_counter.DocFreqCounter(tok)
    rng = random.Random(21)
    pieces = set()
    for cap in HARD + _fuzz(800, seed=22) + make_captions(300, seed=23):
        pieces.update(tok.pat.findall(idf_cleaning.clean_lower(cap)))
    pieces.update("".join(rng.choice("aaabbbeeerstl") for _ in range(rng.randint(1, 24))) for _ in range(500))
    for piece in pieces:
        token = "".join(tok.byte_encoder[b] for b in piece.encode("utf-8"))
        assert counter._bpe(token) == tok.bpe(token).split(" "), repr(piece)
    twin = idf_tokenizer.ascii_twin_pattern(tok.pat)
    assert twin is not None
    alphabet = [chr(i) for i in range(128)] + ["'s", "'LL", "'re", "<start_of_text>", "<end_of_text>", "''s"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert twin.findall(text) == tok.pat.findall(text), repr(text)
    import regex
    assert idf_tokenizer.ascii_twin_pattern(regex.compile(r"[\p{L}]+|\p{Lu}")) is None  # a Unicode construct it cannot map


def test_packed_word_index_matches_a_dict():
    rng = random.Random(31)
    alphabet = [chr(i) for i in range(33, 127)]
    words = list(dict.fromkeys("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))
                                for _ in range(20000)))
    index = idf_counter._PackedWordIndex(bits=4)  # tiny: forces growth and long probe runs

    def keys(ws):
        raw = "".join(w.ljust(16, "\0") for w in ws).encode("ascii")
        pairs = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
        return pairs[:, 0].copy(), pairs[:, 1].copy()

    known = {}
    for chunk in range(0, 15000, 3000):
        new = words[chunk:chunk + 3000]
        k1, k2 = keys(new)
        index.insert(k1, k2, np.arange(chunk, chunk + len(new)))
        known.update(zip(new, range(chunk, chunk + len(new))))
        probe = rng.sample(words, 4000)
        got = index.lookup(*keys(probe))
        assert got.tolist() == [known.get(w, -1) for w in probe]
    assert index.size == 15000 and 2 * index.size <= len(index.row)


def test_tar_runs_names_keys_and_sample_counts(tmp_path):
    """Bulk-parsed names (dots in folders, upper-case extensions, folders) and sample counts match tarfile."""
    p = tmp_path / "names.tar"
    rng = random.Random(41)
    expected_caps, samples, missing = [], 0, 0
    with tarfile.open(p, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(400):
            folder = rng.choice(["", "a.b/", "dir/sub/", "x/"])
            key = f"{folder}s{i:05d}"
            exts = rng.choice([["jpg", "txt"], ["TXT", "json"], ["json"], ["Txt"], ["txt.gz"], ["tar.txt"]])
            samples += 1
            missing += not any(e.lower() == "txt" for e in exts)
            for e in exts:
                data = f"caption {i} {e}".encode() if e.lower() == "txt" else bytes(rng.randrange(1, 900))
                if e.lower() == "txt":
                    expected_caps.append(data.decode())
                ti = tarfile.TarInfo(f"{key}.{e}")
                ti.size, ti.mtime = len(data), 1700000000.5  # float mtime: a pax record per member
                tf.addfile(ti, io.BytesIO(data))
    with tarfile.open(p) as tf:
        ref = []
        for m in tf:
            base = m.name.rsplit("/", 1)[-1]
            key, ext = m.name[: len(m.name) - len(base) + base.index(".")], base[base.index(".") + 1 :].lower()
            ref.append((m.name, key, ext, tf.extractfile(m).read() if ext == "txt" else None))
    with open(p, "rb") as f:
        assert list(idf_tar_reader.iter_tar_members(f, "txt", seekable=True)) == ref
    for url in (str(p), "pipe:cat " + str(p)):  # memory-mapped, and read as a stream
        stats = idf_sources.ReadStats()
        unit = idf_sources.make_units([url], "auto")[0]
        caps = [c for batch in idf_captions.iter_caption_batches(unit, idf_sources.CaptionKey.parse("txt"), stats=stats) for c in batch]
        assert caps == expected_caps
        assert (stats.samples, stats.missing) == (samples, missing)


def test_counter_equals_naive_and_cache_eviction():
    caps = make_captions(400, seed=3)
    ref, n = naive(caps)
    counter = idf_counter.DocFreqCounter(idf_tokenizer.get_tokenizer(""), max_cache=10)  # forces repeated eviction
    counter.add_many(caps[:123])
    counter.add_many(caps[123:])
    df, m = counter.result()
    assert m == n and np.array_equal(df, ref)


def test_build_matches_naive_j1_j2_and_orders(corpus, tmp_path):
    inputs = corpus["shards"] + [corpus["csv"], corpus["tsv"]]
    outs = []
    for i, (args, ins) in enumerate([(["-j", "1"], inputs), (["-j", "2"], inputs),
                                     (["-j", "2"], list(reversed(inputs)))]):
        out = tmp_path / f"o{i}.npz"
        assert run([*ins, "-o", out, *args]) == 0
        outs.append(loaded(out))
    for df, n in outs:
        assert n == corpus["n"]
        assert np.array_equal(df, corpus["ref"])
    c = idf_counts.load_idf_counts(tmp_path / "o0.npz")
    assert c.vocab_size == 49408 and c.tokenizer.startswith("open_clip.SimpleTokenizer/bpe_simple_vocab_16e6/49408")
    assert c.tokenizer == idf_counts.tokenizer_identity(idf_tokenizer.get_tokenizer(""))
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_brace_pattern_file_url_pipe_and_gzip(corpus, tmp_path):
    d = corpus["dir"]
    pattern = str(d / "shard-{000..002}.tar")
    out = tmp_path / "a.npz"
    assert run([pattern, corpus["csv"], corpus["tsv"], "-o", out]) == 0
    assert np.array_equal(loaded(out)[0], corpus["ref"])
    # file:// URL, pipe: command, gzip-compressed shard: same counts as the plain shards
    gz = tmp_path / "s1.tar.gz"
    gz.write_bytes(gzip.compress(Path(corpus["shards"][1]).read_bytes()))
    ins = ["file://" + corpus["shards"][0], str(gz), "pipe:cat " + corpus["shards"][2]]
    out2 = tmp_path / "b.npz"
    assert run([*ins, "-o", out2]) == 0
    ref600, n600 = naive(corpus["caps"][:600])
    df, n = loaded(out2)
    assert n == n600 and np.array_equal(df, ref600)


class _QuietHTTPHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_and_fsspec_urls_with_progress_bar(corpus, tmp_path, capsys):
    """Shards served over HTTP (fsspec, or webdataset's curl handler where aiohttp is missing) and shards on
    an fsspec filesystem (memory://) count as the local files do; the bar shows captions/s and shards done."""
    import fsspec

    fsspec.filesystem("memory").pipe("/idf-test/shard-002.tar", Path(corpus["shards"][2]).read_bytes())
    handler = functools.partial(_QuietHTTPHandler, directory=str(corpus["dir"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        http_pattern = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000..001}}.tar"
        out = tmp_path / "remote.npz"
        assert idf_command.main([http_pattern, "memory://idf-test/shard-002.tar", "-o", str(out)]) == 0
    finally:
        server.shutdown()
        server.server_close()
        fsspec.filesystem("memory").rm("/idf-test", recursive=True)
    df, n = loaded(out)
    ref, n_ref = naive(corpus["caps"][:600])
    assert n == n_ref and np.array_equal(df, ref)
    err = capsys.readouterr().err
    assert "cap/s" in err and "shards 3/3" in err, err[-500:]


def test_python_dash_m_idf_is_the_cli_without_warnings(corpus, tmp_path):
    out = tmp_path / "m.npz"
    cmd = [sys.executable, "-W", "error::RuntimeWarning", "-m", "open_clip_superclip.tools.idf", corpus["shards"][0],
           "-o", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr[-2000:]
    ref, n = naive(corpus["caps"][:200])
    assert np.array_equal(loaded(out)[0], ref) and loaded(out)[1] == n


def test_json_field_key_and_missing(tmp_path):
    caps = make_captions(60, seed=4)
    p = tmp_path / "j.tar"
    with wds.TarWriter(str(p)) as w:
        for i, c in enumerate(caps):
            meta = {"meta": {"caption": c}} if i % 10 else {"other": 1}
            w.write({"__key__": f"{i:04d}", "json": meta, "txt": "unused"})
        # a pax long-name sample (name > 100 characters)
        w.write({"__key__": "long/" + "k" * 150, "json": {"meta": {"caption": "long name sample"}}})
    out = tmp_path / "j.npz"
    assert run([p, "--key", "json:meta.caption", "-o", out]) == 0
    kept = [c for i, c in enumerate(caps) if i % 10] + ["long name sample"]
    ref, n = naive(kept)
    df, m = loaded(out)
    assert m == n and np.array_equal(df, ref)
    meta = idf_counts.load_idf_counts(out).meta
    assert meta["samples"] == 61 and meta["samples_missing_caption"] == 6


def test_torchrun_two_ranks_equals_single_run(corpus, tmp_path):
    inputs = corpus["shards"] + [corpus["csv"], corpus["tsv"]]
    single = tmp_path / "single.npz"
    assert run([*inputs, "-o", single]) == 0
    dist = tmp_path / "dist.npz"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "open_clip_superclip.tools.idf",
           *inputs, "-o", str(dist), "--no-progress", "-j", "1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = loaded(single), loaded(dist)
    assert a[1] == b[1] == corpus["n"] and np.array_equal(a[0], b[0])
    assert idf_counts.load_idf_counts(dist).meta["world_size"] == 2
    # a corrupt shard on rank 1 (units are dealt round-robin): every rank exits non-zero, nothing written
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x00garbage" * 700)
    out2 = tmp_path / "dist2.npz"
    cmd2 = [*cmd[:6], corpus["shards"][0], str(bad), "-o", str(out2), "--no-progress"]
    r = subprocess.run(cmd2, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    assert "bad.tar" in r.stderr and "rank 1" in r.stderr and "NOT written" in r.stderr, r.stderr
    assert not out2.exists()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_corrupt_shard_names_it_and_writes_nothing(corpus, tmp_path, capsys, jobs):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(os.urandom(5000))
    trunc = tmp_path / "trunc.tar"
    data = Path(corpus["shards"][0]).read_bytes()
    trunc.write_bytes(data[: len(data) // 2 + 100])
    for broken in (bad, trunc):
        out = tmp_path / "never.npz"
        rc = run([corpus["shards"][1], broken, corpus["shards"][2], "-o", out, "-j", jobs])
        err = capsys.readouterr().err
        assert rc != 0
        assert str(broken) in err and ("checksum" in err or "truncated" in err)
        assert not out.exists()
        assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_missing_shard_and_bad_json(tmp_path, capsys):
    out = tmp_path / "x.npz"
    assert run([tmp_path / "nope.tar", "-o", out]) == 1
    assert "nope.tar" in capsys.readouterr().err and not out.exists()
    p = tmp_path / "badjson.tar"
    with wds.TarWriter(str(p)) as w:
        w.write({"__key__": "a", "json": b"{not json"})
    assert run([p, "--key", "json:caption", "-o", out]) == 1
    err = capsys.readouterr().err
    assert "badjson.tar" in err and "'a'" in err and not out.exists()


def test_limit(corpus, tmp_path):
    out = tmp_path / "l.npz"
    assert run([*corpus["shards"], "-o", out, "--limit", "250", "-j", "2"]) == 0
    ref, n = naive(corpus["caps"][:250])
    df, m = loaded(out)
    assert m == 250 and np.array_equal(df, ref)


def test_merge(corpus, tmp_path, capsys):
    a, b, whole, merged = (tmp_path / f"{x}.npz" for x in "abwm")
    assert run([*corpus["shards"][:2], "-o", a]) == 0
    assert run([corpus["shards"][2], corpus["csv"], corpus["tsv"], "-o", b]) == 0
    assert run([a, b, "--merge", "-o", merged]) == 0
    df, n = loaded(merged)
    assert n == corpus["n"] and np.array_equal(df, corpus["ref"])
    # a file from another tokenizer is refused
    other = tmp_path / "other.npz"
    idf_counts.save_idf_counts(other, np.zeros(49408, np.int64), 5, "open_clip.HFTokenizer/x/49408/vocab-sha256=0")
    assert run([a, other, "--merge", "-o", tmp_path / "no.npz"]) == 1
    assert "cannot merge" in capsys.readouterr().err and not (tmp_path / "no.npz").exists()
    small = tmp_path / "small.npz"
    idf_counts.save_idf_counts(small, np.zeros(10, np.int64), 5, idf_counts.load_idf_counts(a).tokenizer)
    assert run([a, small, "--merge", "-o", tmp_path / "no.npz"]) == 1


def test_weights_formula(tmp_path):
    p = tmp_path / "w.npz"
    idf_counts.save_idf_counts(p, np.array([0, 1, 4, 9]), 9, "t")
    c = idf_counts.load_idf_counts(p)
    w = c.weights()
    assert str(w.dtype) == "torch.float64"
    assert np.allclose(w.numpy(), np.log(10.0 / (np.array([0, 1, 4, 9]) + 1.0)), rtol=0, atol=1e-15)


def _npz(path, **fields):
    base = {
        "format": np.array(idf_counts.FORMAT_NAME),
        "format_version": np.array(idf_counts.FORMAT_VERSION, np.int64),
        "doc_freq": np.array([1, 2, 0], np.int64),
        "num_captions": np.array(3, np.int64),
        "vocab_size": np.array(3, np.int64),
        "tokenizer": np.array("tok"),
    }
    base.update(fields)
    base = {k: v for k, v in base.items() if v is not None}
    with open(path, "wb") as f:
        np.savez(f, **base)
    return path


@pytest.mark.parametrize(
    "case,fields,needle",
    [
        ("version", dict(format_version=np.array(2, np.int64)), "format version 2"),
        ("missing", dict(doc_freq=None), "missing field"),
        ("missing2", dict(tokenizer=None, num_captions=None), "missing field"),
        ("format", dict(format=np.array("something-else")), "not a superclip-idf-counts"),
        ("shape", dict(doc_freq=np.array([1, 2], np.int64)), "shape"),
        ("shape2d", dict(doc_freq=np.ones((3, 1), np.int64)), "shape"),
        ("dtype", dict(doc_freq=np.array([1.0, 2.0, 0.0])), "integer"),
        ("negative", dict(doc_freq=np.array([1, -2, 0], np.int64)), "negative"),
        ("df_gt_n", dict(doc_freq=np.array([1, 4, 0], np.int64)), "exceeds num_captions"),
        ("n_negative", dict(num_captions=np.array(-1, np.int64)), "negative"),
        ("tokenizer", dict(tokenizer=np.array(5)), "tokenizer"),
    ],
)
def test_loader_rejects_bad_fields(tmp_path, case, fields, needle):
    p = _npz(tmp_path / f"{case}.npz", **fields)
    with pytest.raises(ValueError) as e:
        idf_counts.load_idf_counts(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_loader_rejects_bad_files(tmp_path):
    good = tmp_path / "good.npz"
    idf_counts.save_idf_counts(good, np.array([1, 2, 0]), 3, "tok")
    assert idf_counts.load_idf_counts(good).num_captions == 3
    raw = good.read_bytes()
    cases = {
        "missing": None,
        "truncated": raw[: len(raw) // 2],
        "garbage": os.urandom(400),
        "empty": b"",
        "flipped": raw[:60] + bytes([raw[60] ^ 0xFF]) + raw[61:],
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.npz"
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(ValueError) as e:
            idf_counts.load_idf_counts(p)
        assert str(p) in str(e.value), name
    with pytest.raises(ValueError, match="vocab_size 3 does not match"):
        idf_counts.load_idf_counts(good, vocab_size=49408)
    with pytest.raises(ValueError, match="built with tokenizer"):
        idf_counts.load_idf_counts(good, tokenizer="other")
    with pytest.raises(ValueError, match="directory"):
        idf_counts.load_idf_counts(tmp_path)


def test_tar_reader_matches_tarfile(tmp_path):
    """The strict tar reader returns what tarfile returns (ustar, pax, GNU long names, dirs)."""
    p = tmp_path / "mixed.tar"
    with tarfile.open(p, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in [("a/b.txt", b"one"), ("d" * 120 + ".txt", b"two"), ("e.jpg", b"x" * 3000)]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("dir")
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
    with open(p, "rb") as f:
        got = list(idf_tar_reader.iter_tar_members(f, "txt", seekable=True))
    assert got == [("a/b.txt", "a/b", "txt", b"one"), ("d" * 120 + ".txt", "d" * 120, "txt", b"two"),
                   ("e.jpg", "e", "jpg", None)]
    with open(p, "rb") as f:
        got2 = list(idf_tar_reader.iter_tar_members(io.BufferedReader(io.BytesIO(f.read()))))
    assert [(n, d) for n, _, _, d in got2] == [("a/b.txt", b"one"), ("d" * 120 + ".txt", b"two"),
                                               ("e.jpg", b"x" * 3000)]


def test_tar_bulk_path_edge_cases(tmp_path):
    """Long runs take the numpy path; pax records, odd text and a corrupt header mid-run are still exact."""
    caps = [f"caption {i} size=large path=/x" if i % 97 == 0 else f"caption {i}" for i in range(3000)]
    p = tmp_path / "big.tar"
    with wds.TarWriter(str(p)) as w:
        for i, c in enumerate(caps):
            key = ("k" * 120 + str(i)) if i == 1500 else f"{i:06d}"  # one pax path record mid-run
            w.write({"__key__": key, "txt": c, "jpg": bytes(300 + i % 50)})
    with open(p, "rb") as f:
        got = [(k, d.decode()) for _, k, e, d in idf_tar_reader.iter_tar_members(f, "txt", seekable=True) if d is not None]
    with tarfile.open(p) as tf:
        ref = [(m.name.rsplit(".", 1)[0], tf.extractfile(m).read().decode()) for m in tf if m.name.endswith(".txt")]
    assert got == ref and len(got) == 3000
    data = bytearray(p.read_bytes())
    hdr = 512 * 2000  # a header block well inside a long run: corrupt one byte of a name
    while data[hdr + 257 : hdr + 262] != b"ustar":
        hdr += 512
    data[hdr + 3] ^= 0x20
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"at byte {hdr} .checksum"):
        with open(bad, "rb") as f:
            list(idf_tar_reader.iter_tar_members(f, "txt", seekable=True))


def test_truncated_or_empty_shards_fail_alike_mapped_or_streamed(tmp_path):
    """Cuts inside a header, inside a large member and before the end blocks: a clear error either way."""
    p = tmp_path / "full.tar"
    with wds.TarWriter(str(p)) as w:
        for i in range(300):
            w.write({"__key__": f"{i:05d}", "txt": f"caption {i}", "jpg": bytes(5000 if i == 200 else 100)})
    data = p.read_bytes()
    big = data.index(b"00200.jpg")  # the header of the 5000-byte member
    last_member_end = data.index(b"00299.jpg") + 512 + 512  # its 100 bytes fill one block
    cuts = {"header": big + 100, "member": big + 512 + 2000, "end blocks": last_member_end, "empty": 0}
    for where, cut in cuts.items():
        q = tmp_path / f"cut-{where.replace(' ', '_')}.tar"
        q.write_bytes(data[:cut])
        errors = []
        for url in (str(q), "pipe:cat " + str(q)):
            with pytest.raises(ValueError) as info:
                unit = idf_sources.make_units([url], "auto")[0]
                list(idf_captions.iter_captions(unit, idf_sources.CaptionKey.parse("txt")))
            errors.append(str(info.value))
        assert errors[0] == errors[1], where
        assert ("empty file" if where == "empty" else "truncated") in errors[0], (where, errors[0])


def test_csv_quoting_and_columns(tmp_path, capsys):
    caps = ['multi\nline "quoted", caption', "plain", "comma, inside"]
    p = write_csv(tmp_path / "q.csv", caps)
    out = tmp_path / "q.npz"
    assert run([p, "-o", out, "-j", "2"]) == 0
    ref, n = naive(caps)
    assert np.array_equal(loaded(out)[0], ref)
    assert run([p, "-o", out, "--csv-key", "caption"]) == 1
    assert "no column 'caption'" in capsys.readouterr().err


def test_cli_usage_errors(tmp_path):
    assert idf_command.main(["-o", str(tmp_path / "x.npz")]) == 2
    assert idf_command.main(["a.tar", "-o", str(tmp_path / "x.npz"), "--key", "txt:field"]) == 2


class _FakeHF:
    """Stands in for a HF tokenizer: ids are word lengths (enough to test the generic path)."""

    name_or_path = "fake"

    def __call__(self, text, add_special_tokens=True, truncation=True):
        assert add_special_tokens is False and truncation is False
        return {"input_ids": [len(w) % 10 for w in text.split()]}

    def __len__(self):
        return 10

    def get_vocab(self):
        return {str(i): i for i in range(10)}


class _FakeWrapper:
    def __init__(self):
        self.tokenizer = _FakeHF()
        self.clean_fn = str.lower


def test_generic_tokenizer_path():
    tok = _FakeWrapper()
    counter = idf_counter.DocFreqCounter(tok)
    counter.add_many(["a bb ccc", "dd dd", ""])
    df, n = counter.result()
    assert n == 3 and df.tolist() == [0, 1, 2, 1, 0, 0, 0, 0, 0, 0]
    assert idf_counts.tokenizer_identity(tok).startswith("open_clip._FakeWrapper/fake/10/vocab-sha256=")
