"""Benchmark of `superclip idf` against the naive loop (SimpleTokenizer.encode per caption, set of ids).

Prints captions/s of the naive loop, of the in-memory counter, and of the whole builder (reading
webdataset shards from disk) with 1 and 2 processes, the speed-up ratios per core (CPU time), and
checks that every method gives identical counts. Two naive baselines: the encode loop over captions
already in memory (it reads nothing), and the loop a user would write over the same shards
(webdataset + encode). The in-memory comparison is repeated on multilingual captions (real words of
Faker's 100+ locales), where many more words are new. `run(n_captions)` returns the rows for the
`make bench` script.

    python bench/bench_idf.py [--captions 200000] [--shards 8]
"""

import argparse
import contextlib
import gzip
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

try:
    import open_clip_superclip.tools.idf  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402

from open_clip_superclip.idf_counts import load_idf_counts  # noqa: E402
from open_clip_superclip.tools.idf import cleaning, command  # noqa: E402
from open_clip_superclip.tools.idf.cleaning import ftfy_gate, trivial_clean  # noqa: E402
from open_clip_superclip.tools.idf.counter import DocFreqCounter, naive_doc_freq  # noqa: E402
from open_clip_superclip.tools.idf.tokenizer import get_tokenizer, tokenizer_module  # noqa: E402

_NON_ASCII = ["caf\u00e9", "na\u00efve", "M\u00fcnchen", "S\u00e3o", "\u00e9t\u00e9", "\u6771\u4eac", "\u5317\u4eac",
              "\U0001F600", "\U0001F389", "\u2764\ufe0f", "\u201cnew\u201d", "\u2014", "\u00bd", "\u00b0C"]
_ENTITIES = ["&amp;", "&#39;s", "&quot;", "&nbsp;"]
_PUNCT = [",", ".", "!", ":", ";", "...", "?", " -", " |", " /"]
_DECORATIONS = ["({}) ", "\"{}\" ", "#{} ", "{}'s "]  # each on ~1% of words


def _vocabulary(size: int):
    """Real English-like words: whole-word entries of the CLIP BPE merges, most frequent first."""
    with gzip.open(tokenizer_module().default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    words = []
    for m in merges:
        w = m.replace(" ", "")
        if w.endswith("</w>") and w[:-4].isalpha() and w[:-4].isascii() and len(w) > 5:
            words.append(w[:-4])
        if len(words) >= size:
            break
    return words


def make_captions(n: int, seed: int = 0, vocab_size: int = 5000, special_share: float = 0.08):
    """Varied captions: Zipf-distributed words, capitals, punctuation, numbers, URLs, ~3% long captions
    (80-250 words), and `special_share` of captions with non-ASCII text or HTML entities (these take
    open_clip's full ftfy cleaning, as in the naive loop)."""
    rng = random.Random(seed)
    vocab = _vocabulary(vocab_size)
    weights = [1.0 / (r + 10) for r in range(len(vocab))]
    pick = iter(rng.choices(vocab, weights, k=n * 40))
    out = []
    for _ in range(n):
        long = rng.random() < 0.03
        k = rng.randint(80, 250) if long else rng.randint(3, 22)
        parts = []
        for _ in range(k):
            try:
                w = next(pick)
            except StopIteration:
                w = rng.choice(vocab)
            r = rng.random()
            if r < 0.12:
                w = w.capitalize()
            elif r < 0.14:
                w = w.upper()
            elif r < 0.19:
                w = str(rng.choice([rng.randint(0, 100), rng.randint(1900, 2024), rng.randint(100, 99999)]))
            elif r < 0.192:
                w = f"https://www.{rng.choice(vocab)}.com/{rng.choice(vocab)}/{rng.randint(1, 9999)}.jpg"
            parts.append(rng.choice(_DECORATIONS).format(w) if rng.random() < 0.04 else w + " ")
            if rng.random() < 0.08:
                parts[-1] = parts[-1].rstrip() + rng.choice(_PUNCT) + " "
        if rng.random() < special_share:
            for _ in range(rng.randint(1, 2)):
                parts.insert(rng.randrange(len(parts) + 1), rng.choice(_NON_ASCII + _ENTITIES) + " ")
        out.append("".join(parts).strip())
    return out


def make_multilingual_captions(n: int, seed: int = 0):
    """Captions of real words in Faker's 100+ locales (Latin, Cyrillic, Greek, Arabic, Hebrew, Devanagari,
    Thai, CJK, ...), with emoji sequences from the emoji package, URLs, numbers, multi-line addresses, and
    some captions HTML-escaped, decomposed (NFD/NFKD), mis-decoded as Latin-1 or cp1252, or with curly
    quotes and ideographic spaces."""
    import html
    import unicodedata
    import warnings

    import emoji
    from faker import Faker
    from faker.config import AVAILABLE_LOCALES

    rng = random.Random(seed)
    emojis = sorted(emoji.EMOJI_DATA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated locales
        fakers = [Faker(loc) for loc in AVAILABLE_LOCALES]
    for i, f in enumerate(fakers):
        f.seed_instance(seed * 1000 + i)
    makers = [lambda f: f.sentence(nb_words=rng.randint(3, 14)), lambda f: f.name(), lambda f: f.address(),
              lambda f: f.company() + " " + f.catch_phrase(), lambda f: f.url() + f.uri_path(),
              lambda f: f.text(max_nb_chars=rng.choice([60, 200, 600])), lambda f: f.city() + ", " + f.country(),
              lambda f: f"{f.date()} {f.time()} {f.pyfloat()}", lambda f: f.job()]
    weird = [html.escape, lambda c: unicodedata.normalize("NFD", c),
             lambda c: c.encode("utf-8").decode("latin-1"),
             lambda c: c.encode("utf-8").decode("cp1252", errors="replace"),
             lambda c: c.replace('"', "\u201c", 1).replace("'", "\u2019"),
             lambda c: unicodedata.normalize("NFKD", c).upper(), lambda c: c.replace(" ", "\u3000")]
    out = []
    for _ in range(n):
        f = rng.choice(fakers)
        parts = []
        for _ in range(rng.randint(1, 3)):
            try:
                parts.append(rng.choice(makers)(f))
            except (AttributeError, NotImplementedError):  # a provider this locale lacks
                parts.append(f.word())
        if rng.random() < 0.3:
            parts.insert(rng.randrange(len(parts) + 1), "".join(rng.choice(emojis) for _ in range(rng.randint(1, 4))))
        caption = " ".join(parts)
        out.append(rng.choice(weird)(caption) if rng.random() < 0.25 else caption)
    return out


def _write_shards(caps, directory: str, nshards: int):
    import webdataset as wds

    paths = []
    per = (len(caps) + nshards - 1) // nshards
    for s in range(nshards):
        p = os.path.join(directory, f"bench-{s:04d}.tar")
        with wds.TarWriter(p) as w:
            for i, c in enumerate(caps[s * per:(s + 1) * per]):
                w.write({"__key__": f"{s:04d}{i:07d}", "txt": c, "json": {"caption": c, "width": 640}})
        paths.append(p)
    return paths


def _cold():
    """Forget every cache so each run starts as a fresh process would (after its one-time set-up: imports,
    the tokenizer and the ftfy gate, which are built here, outside the timed part)."""
    command._COUNTERS.clear()
    tok = get_tokenizer("")
    tok.cache = {t: t for t in ("<start_of_text>", "<end_of_text>")}
    cleaning._FTFY_GATE = None  # its cache of badness answers starts empty
    ftfy_gate()


def run(n_captions: int = 200_000, nshards: int = 8, seed: int = 0):
    """Rows (name, value) of the benchmark; asserts identical counts across methods.

    The naive loop and the in-memory counter run interleaved, chunk by chunk, so that both see the
    same load on a shared machine; their ratio is also given in CPU time (the per-core ratio).
    The builder runs read the corpus back from webdataset shards (txt + json members) on disk.
    """
    rows = [("captions", n_captions), ("cpu cores", os.cpu_count()),
            ("load average (1 min) at start", round(os.getloadavg()[0], 2))]
    caps = make_captions(n_captions, seed)
    rows.append(("captions needing open_clip's own cleaning %",
                 round(100.0 * sum(trivial_clean(c) is None for c in caps) / len(caps), 2)))
    rows.append(("captions with non-ASCII or entities %",
                 round(100.0 * sum(not c.isascii() or "&" in c for c in caps) / len(caps), 2)))
    words = [w for c in caps for w in c.lower().split()]
    rows.append(("words per caption", round(len(words) / len(caps), 1)))
    rows.append(("distinct words / words %", round(100.0 * len(set(words)) / len(words), 2)))
    del words

    naive_tok = tokenizer_module().SimpleTokenizer()
    _cold()
    counter = DocFreqCounter(get_tokenizer(""))
    ref, wall, cpu = _side_by_side(caps, naive_tok, counter)
    df, m = counter.result()
    assert m == n_captions and np.array_equal(df, ref), "counter differs from the naive loop"
    # steady state of a long run: the same captions again, word table warm (naive on a tenth, interleaved)
    counter.reset()
    _, _, warm_cpu = _side_by_side(caps, naive_tok, counter, naive_share=0.1)
    assert np.array_equal(counter.result()[0], ref)
    n = n_captions
    naive = n / wall["naive"]
    rows.append(("naive encode loop (captions in memory) captions/s", round(naive)))
    rows.append(("counter (in memory, 1 process) captions/s", round(n / wall["counter"])))
    rows.append(("counter / naive encode loop (wall)", round(wall["naive"] / wall["counter"], 1)))
    rows.append(("counter / naive encode loop, per core (CPU time)", round(cpu["naive"] / cpu["counter"], 1)))
    rows.append(("counter / naive encode loop, warm word table, per core",
                 round(warm_cpu["naive"] / warm_cpu["counter"], 1)))

    rows.extend(_multilingual_rows(make_multilingual_captions(max(2000, n_captions // 10), seed), naive_tok))

    identical = True
    with tempfile.TemporaryDirectory() as d:
        shards = _write_shards(caps, d, nshards)
        # the naive loop a user would write over the same shards: webdataset + encode, on the first shard
        wds_cpu, wds_n = _naive_over_shards(shards[:1], naive_tok)
        rows.append(("naive loop over the shards (webdataset + encode) captions/s, CPU", round(wds_n / wds_cpu)))
        for jobs in (1, 2):
            _cold()
            out = os.path.join(d, f"out{jobs}.npz")
            sample = caps[jobs * 5000:jobs * 5000 + 5000]
            naive_cpu = _cpu(lambda: naive_doc_freq(sample, naive_tok))  # just before: same machine state
            w, c = time.perf_counter(), _cpu_with_children()
            with contextlib.redirect_stdout(io.StringIO()):
                rc = command.main([*shards, "-o", out, "-j", str(jobs), "--no-progress"])
            wall_s, cpu_s = time.perf_counter() - w, _cpu_with_children() - c
            naive_cpu += _cpu(lambda: naive_doc_freq(sample, naive_tok))  # and just after
            per_caption_naive = naive_cpu / (2 * len(sample))
            got = load_idf_counts(out)
            identical &= rc == 0 and got.num_captions == n and np.array_equal(got.doc_freq.numpy(), ref)
            rows.append((f"builder -j {jobs} (shards on disk) captions/s, wall", round(n / wall_s)))
            rows.append((f"builder -j {jobs} captions/s per core (CPU time of all its processes)", round(n / cpu_s)))
            rows.append((f"builder -j {jobs} / naive encode loop, per core", round(per_caption_naive * n / cpu_s, 1)))
            rows.append((f"builder -j {jobs} / naive loop over the shards, per core",
                         round(wds_cpu / wds_n * n / cpu_s, 1)))
    rows.append(("counts identical to naive", identical))
    assert identical, "builder counts differ from the naive loop"
    return rows


def _side_by_side(caps, naive_tok, counter, chunks: int = 20, naive_share: float = 1.0):
    """(naive counts, wall seconds, CPU seconds) of the naive loop and counter.add_many over caps, run
    chunk by chunk alternately so both see the same load on a shared machine. With naive_share < 1 the
    naive loop runs on that share of each chunk and its times are scaled up (its counts are then partial)."""
    ref = np.zeros(counter.vocab_size, dtype=np.int64)
    wall = {"naive": 0.0, "counter": 0.0}
    cpu = {"naive": 0.0, "counter": 0.0}
    step = max(1, len(caps) // chunks)
    for i in range(0, len(caps), step):
        chunk = caps[i:i + step]
        part = chunk[: max(1, round(len(chunk) * naive_share))]
        w, c = time.perf_counter(), time.process_time()
        ref += naive_doc_freq(part, naive_tok)[0]
        wall["naive"] += (time.perf_counter() - w) * len(chunk) / len(part)
        cpu["naive"] += (time.process_time() - c) * len(chunk) / len(part)
        w, c = time.perf_counter(), time.process_time()
        counter.add_many(chunk)
        wall["counter"] += time.perf_counter() - w
        cpu["counter"] += time.process_time() - c
    return ref, wall, cpu


def _multilingual_rows(caps, naive_tok):
    """The same comparison on real words of 100+ locales, where far more words and BPE pieces are new."""
    _cold()
    counter = DocFreqCounter(get_tokenizer(""))
    ref, _, cold = _side_by_side(caps, naive_tok, counter, chunks=10)
    assert np.array_equal(counter.result()[0], ref), "counter differs from the naive loop (multilingual)"
    counter.reset()
    _, _, warm = _side_by_side(caps, naive_tok, counter, chunks=10, naive_share=0.1)
    share = round(100.0 * sum(not c.isascii() for c in caps) / len(caps), 1)
    return [("multilingual captions (Faker's locales; emoji, entities, NFD, mojibake)", len(caps)),
            ("multilingual: captions with non-ASCII %", share),
            ("multilingual: naive encode loop captions/s, CPU", round(len(caps) / cold["naive"])),
            ("multilingual: counter / naive encode loop, per core", round(cold["naive"] / cold["counter"], 1)),
            ("multilingual: counter / naive encode loop, warm word table, per core",
             round(warm["naive"] / warm["counter"], 1))]


def _cpu(fn) -> float:
    c = time.process_time()
    fn()
    return time.process_time() - c


def _cpu_with_children() -> float:
    """CPU seconds of this process and of its finished children (the -j worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _naive_over_shards(shards, tok):
    """CPU seconds and captions of webdataset reading + SimpleTokenizer.encode per caption."""
    import webdataset as wds

    df = np.zeros(49408, dtype=np.int64)
    n = 0
    c = time.process_time()
    for sample in wds.WebDataset(shards, shardshuffle=False):
        for i in set(tok.encode(sample["txt"].decode("utf-8"))):
            df[i] += 1
        n += 1
    return time.process_time() - c, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=8)
    a = ap.parse_args(argv)
    for name, value in run(a.captions, a.shards):
        print(f"{name:56s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
