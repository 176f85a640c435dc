"""DocFreqCounter: per token id, the number of captions containing it, equal to SimpleTokenizer.encode's ids.

Why a module of its own: this is the hot loop of `superclip idf` (docs/idf.md, Speed); the cleaning it
skips lives in cleaning.py, the inputs in sources.py and tar_reader.py.
"""

from __future__ import annotations

import itertools
import operator
import sys
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from ...idf_counts import tokenizer_vocab_size
from .cleaning import trivial_clean
from .tokenizer import ascii_twin_pattern, get_tokenizer, simple_tokenizer_base


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


class DocFreqCounter:
    """Counts, per token id, the captions containing it; ids equal tokenizer.encode(caption) exactly.

    Why it is fast: SimpleTokenizer.encode cleans every caption with ftfy + html.unescape and runs
    its regex over it. Where the cleaning's result can be had without running ftfy (printable
    ASCII without entities: nothing to do; most other text: the ftfy gate of cleaning.py) ftfy is
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
        base = simple_tokenizer_base(tokenizer)
        if base is not None:
            self._mode = "words"
            self._clean = tokenizer.clean_fn
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
        fast, slow_words, slow_lens = self._sort_batch(batch)
        # word rows of the fast captions, separated by _SEP (row 0: no tokens), and their caption numbers
        rows_f = self._plain_rows(fast) if fast else np.zeros(0, dtype=np.int64)
        cap_f = np.cumsum(rows_f == 0)
        rows_s = self._word_rows(slow_words)
        cap_s = np.repeat(np.arange(len(fast), len(fast) + len(slow_lens), dtype=np.int64), slow_lens)
        self._count_rows(np.concatenate([rows_f, rows_s]), np.concatenate([cap_f, cap_s]))

    def _sort_batch(self, batch: List[str]) -> Tuple[List[str], List[str], List[int]]:
        """(captions whose cleaned text is printable, the words of the others, their word counts).

        The first are cleaned already or need no cleaning (their words are found in bulk); the others
        take the tokenizer's own cleaning, or the gate's where its result holds other whitespace.
        """
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
            return fast, slow_words, slow_lens
        k = len(batch)
        # printable ASCII without '&' needs no cleaning: three C-level passes find the rest
        plain = np.fromiter(map(str.isascii, batch), dtype=bool, count=k)
        plain &= np.fromiter(map(str.isprintable, batch), dtype=bool, count=k)
        plain &= ~np.fromiter(map(operator.contains, batch, itertools.repeat("&")), dtype=bool, count=k)
        if plain.all():
            return batch, slow_words, slow_lens
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
        return fast, slow_words, slow_lens

    def _count_rows(self, rows: np.ndarray, caps: np.ndarray) -> None:
        """Add one to doc_freq per distinct (caption, token) of the word rows and their caption numbers."""
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

