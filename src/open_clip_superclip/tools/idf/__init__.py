"""`superclip idf`: token document frequencies (IDF statistics) over a caption corpus, fast and exact.

One concern a module, in reading order:
- sources: input patterns, work units, caption keys, opening URLs, CSV/TSV files
- members, tar_reader, tar_bulk: the strict tar reader (careful loop, and its numpy fast path)
- captions: a unit -> lists of captions (shards: stream -> members -> captions -> sample tally)
- tokenizer, cleaning, counter: open_clip's tokenizer, its text cleaning skipped where a no-op, DocFreqCounter
- parallel, distributed: the process pool with progress and errors; torchrun's all-reduce
- command: argparse, the per-unit task, writing the file (the format itself is open_clip_superclip.idf_counts)

Nothing is imported here, so that `python -m open_clip_superclip.tools.idf --help` loads only what it needs.
"""
