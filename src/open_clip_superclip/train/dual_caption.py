"""DualCaption and caption mixing on the stock open_clip_train data paths (webdataset and CSV).

A second, long caption per sample (e.g. an LLM re-caption) reaches the loss through the unchanged trainer:
each sample's text tensor is ``contrastive tokens [context_length]`` followed, for a SuperCLIP run, by
``class tokens [class_context_length]`` (SuperCLIP.forward splits them). The contrastive tokens come from the
short caption, or from the long one with probability ``--caption-mix-long-ratio``; the class tokens from the
caption(s) chosen by ``--superclip-class-caption`` and are not cut at 77 tokens.

How it plugs in (patches in open_clip_superclip.train.plugin): get_wds_dataset / get_csv_dataset build the
stock pipeline with a `DualCaptionTokenizer` in place of the run's tokenizer. For webdataset a `LongCaptionStage`
runs right after the tar reader and replaces each sample's ``txt`` with a small JSON payload (the chosen captions);
for CSV the patched CsvDataset reads the long column and hands out the same payloads. The stock ``tokenizer(text)``
call then turns a payload into the sample's text row.

The per-sample choices depend only on ``--seed`` and the sample's identity (shard file name + key, or CSV row),
never on worker RNG state: they are the same for any number of workers, ranks, and across resume. Counts (long
caption missing, contrastive caption long, class caption cut) live in shared memory written by every dataloader
worker, are summed over ranks at the end of each epoch and logged by rank 0.
"""
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from open_clip_train.data import CsvDataset, filter_no_caption_or_no_image

_logger = logging.getLogger(__name__)

MISSING_POLICIES = ("short", "skip", "error")
CLASS_CAPTIONS = ("short", "long", "both")
DEFAULT_CLASS_CONTEXT_LENGTH = 256
_DEPENDENT_FLAGS = ("superclip_class_caption", "superclip_class_context_length", "caption_mix_long_ratio",
                    "superclip_missing_long")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dual_caption_args(parser) -> None:
    group = parser.add_argument_group(
        "DualCaption and caption mixing (open_clip_superclip)",
        "A second (long) caption per training sample: the contrastive loss sees the short caption (or the long "
        "one with --caption-mix-long-ratio), the SuperCLIP class loss sees --superclip-class-caption. Applies to "
        "--train-data; --val-data keeps the stock short-caption path. See docs/dual_caption.md.")
    group.add_argument("--superclip-long-caption-key", default=None, metavar="KEY",
                       help="webdataset: the member holding the long caption (e.g. long.txt), or FIELD of a JSON "
                            "member as json:FIELD (e.g. json:recaption).")
    group.add_argument("--csv-long-caption-key", default=None, metavar="COLUMN",
                       help="CSV: the column holding the long caption.")
    group.add_argument("--superclip-class-caption", choices=CLASS_CAPTIONS, default=None,
                       help="Caption(s) whose tokens are the class targets (default long; both = the token ids of "
                            "the short caption followed by those of the long one).")
    group.add_argument("--superclip-class-context-length", type=int, default=None, metavar="N",
                       help=f"Class-target tokens kept per caption, SOT and EOT included (default "
                            f"{DEFAULT_CLASS_CONTEXT_LENGTH}); longer captions are cut and counted in the log.")
    group.add_argument("--caption-mix-long-ratio", type=float, default=None, metavar="R",
                       help="Probability that a sample's contrastive caption is its long caption (the paper's "
                            "0.8/0.2 short/long baseline is 0.2); fixed per sample by --seed. Works without the "
                            "SuperCLIP head.")
    group.add_argument("--superclip-missing-long", choices=MISSING_POLICIES, default=None,
                       help="A sample whose long caption is absent or empty: use its short caption (default), "
                            "skip it, or stop with an error naming it.")


def train_data_kind(args) -> Optional[str]:
    """'webdataset', 'csv', 'synthetic' or None, resolving --dataset-type auto the way open_clip_train does."""
    kind = args.dataset_type
    if kind == "auto" and args.train_data:
        kind = {"csv": "csv", "tsv": "csv", "tar": "webdataset"}.get(args.train_data.split(".")[-1])
    return kind if kind in ("webdataset", "csv", "synthetic") else None


def parse_wds_key(key: str) -> Tuple[str, Optional[str]]:
    """``long.txt`` -> (member 'long.txt', None); ``json:recaption`` -> ('json', 'recaption').

    Member names are lower-cased: open_clip's tar reader lower-cases them too."""
    member, colon, field = key.partition(":")
    member = member.strip().lower()
    if not member or member.startswith("__"):
        raise ValueError(f"--superclip-long-caption-key {key!r}: give a member name such as long.txt, or "
                         f"json:FIELD for a field of the json member")
    if colon:
        if not field:
            raise ValueError(f"--superclip-long-caption-key {key!r}: the field name after ':' is empty")
        if not (member == "json" or member.endswith(".json")):
            raise ValueError(f"--superclip-long-caption-key {key!r}: MEMBER:FIELD reads a JSON member, and "
                             f"{member!r} is not one (use json:FIELD)")
        return member, field
    if member == "txt":
        raise ValueError("--superclip-long-caption-key txt is the short caption itself; name the member that "
                         "holds the long caption")
    return member, None


def finalize_dual_caption_args(parser, args) -> None:
    """Validates the DualCaption flags against the run (needs ``args.superclip``) and fills their defaults."""
    wds_key, csv_key = args.superclip_long_caption_key, args.csv_long_caption_key
    dependent = [_flag(name) for name in _DEPENDENT_FLAGS if getattr(args, name) is not None]
    if wds_key is None and csv_key is None:
        if dependent:
            parser.error(f"{', '.join(dependent)} needs a long caption: give --superclip-long-caption-key "
                         f"(webdataset) or --csv-long-caption-key (CSV)")
        return
    if wds_key is not None and csv_key is not None:
        parser.error("give either --superclip-long-caption-key (webdataset) or --csv-long-caption-key (CSV), "
                     "not both")
    kind = train_data_kind(args)
    key_flag, wanted = ("--superclip-long-caption-key", "webdataset") if wds_key is not None else \
        ("--csv-long-caption-key", "csv")
    if not args.train_data:
        parser.error(f"{key_flag} applies to --train-data, which is not given")
    if kind != wanted:
        other = "--csv-long-caption-key" if wanted == "webdataset" else "--superclip-long-caption-key"
        parser.error(f"{key_flag} reads {wanted} training data, but --train-data {args.train_data} is "
                     f"{kind or 'of unknown type'} (--dataset-type {args.dataset_type})"
                     + (f"; for it use {other}" if kind in ("webdataset", "csv") else ""))
    if wds_key is not None:
        try:
            parse_wds_key(wds_key)
        except ValueError as error:
            parser.error(str(error))
    elif not csv_key.strip():
        parser.error("--csv-long-caption-key is empty")
    elif csv_key == args.csv_caption_key:
        parser.error(f"--csv-long-caption-key {csv_key} is the short caption column (--csv-caption-key)")

    ratio = args.caption_mix_long_ratio
    if ratio is not None and not (math.isfinite(ratio) and 0 <= ratio <= 1):
        parser.error(f"--caption-mix-long-ratio must be a probability in [0, 1], got {ratio}")
    if args.superclip:
        if args.superclip_class_caption is None:
            args.superclip_class_caption = "long"
        if args.superclip_class_context_length is None:
            args.superclip_class_context_length = DEFAULT_CLASS_CONTEXT_LENGTH
        if args.superclip_class_context_length < 3:
            parser.error(f"--superclip-class-context-length must be >= 3 (SOT, one token, EOT), got "
                         f"{args.superclip_class_context_length}")
        if args.force_context_length is not None:
            parser.error("--force-context-length cannot be combined with DualCaption class targets: SuperCLIP "
                         "reads the class tokens after the model's own context length")
    else:
        no_head = [_flag(n) for n in ("superclip_class_caption", "superclip_class_context_length")
                   if getattr(args, n) is not None]
        if no_head:
            parser.error(f"{', '.join(no_head)} has no effect: this run trains no SuperCLIP class head "
                         f"(--model {args.model}, --superclip-lambda {args.superclip_lambda})")
    long_for_class = args.superclip and args.superclip_class_caption in ("long", "both")
    if not long_for_class and not ratio:
        parser.error(f"{key_flag} has no effect: the long caption feeds neither the class targets "
                     f"(--superclip-class-caption {args.superclip_class_caption or 'needs a SuperCLIP run'}) nor "
                     f"the contrastive loss (--caption-mix-long-ratio {ratio or 0})")
    if args.caption_mix_long_ratio is None:
        args.caption_mix_long_ratio = 0.0
    if args.superclip_missing_long is None:
        args.superclip_missing_long = "short"


@dataclass(frozen=True)
class DualCaptionConfig:
    """What a training run asks of its captions (from the parsed args; see the flags' help)."""
    long_key: str
    mix_long_ratio: float
    class_caption: Optional[str]  # None: no class tokens appended (a run without the SuperCLIP head)
    class_context_length: Optional[int]
    missing_long: str
    seed: int

    @classmethod
    def from_args(cls, args, kind: str) -> Optional["DualCaptionConfig"]:
        """The run's config for training data of ``kind``, or None when it uses no long captions."""
        keys = {"webdataset": getattr(args, "superclip_long_caption_key", None),
                "csv": getattr(args, "csv_long_caption_key", None)}
        if not any(keys.values()):
            return None
        if not keys[kind]:
            raise ValueError(f"{kind} training data needs "
                             f"{'--superclip-long-caption-key' if kind == 'webdataset' else '--csv-long-caption-key'}"
                             f" for its long captions")
        return cls(long_key=keys[kind], mix_long_ratio=args.caption_mix_long_ratio,
                   class_caption=args.superclip_class_caption if getattr(args, "superclip", False) else None,
                   class_context_length=args.superclip_class_context_length, missing_long=args.superclip_missing_long,
                   seed=args.seed)

    def describe(self, source: str) -> str:
        mix = f" (long with probability {self.mix_long_ratio:g} per sample, seed {self.seed})" \
            if self.mix_long_ratio else ""
        text = f"long caption from {source}; contrastive loss <- short caption{mix}"
        if self.class_caption:
            captions = {"short": "short caption", "long": "long caption", "both": "short + long captions"}
            text += f"; class targets <- {captions[self.class_caption]}, up to {self.class_context_length} tokens"
        return text + f"; missing long caption -> {self.missing_long}"


def mix_picks_long(seed: int, identity: str, ratio: float) -> bool:
    """Whether the sample ``identity`` feeds its long caption to the contrastive loss: a hash of (seed, identity)
    read as a uniform number in [0, 1), so the choice is fixed per sample and independent of any RNG state."""
    if ratio <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}\x00{identity}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < ratio * 2 ** 64


class CaptionCounters:
    """Per-epoch counts in shared memory: every dataloader worker (forked or spawned) adds to the same array."""
    FIELDS = ("samples", "long_absent", "long_empty", "long_unreadable", "contrastive_long", "class_cut", "skipped")

    def __init__(self):
        self._values = multiprocessing.Array("q", len(self.FIELDS))

    def add(self, **counts: int) -> None:
        with self._values.get_lock():
            for name, count in counts.items():
                self._values[self.FIELDS.index(name)] += count

    def snapshot(self) -> dict:
        with self._values.get_lock():
            return dict(zip(self.FIELDS, self._values[:]))

    def reset(self) -> None:
        with self._values.get_lock():
            self._values[:] = [0] * len(self.FIELDS)


class CaptionChooser:
    """Picks the contrastive and class captions of one sample and encodes them as the payload that
    `DualCaptionTokenizer` reads (the stock pipelines carry it in place of the caption string)."""

    def __init__(self, config: DualCaptionConfig, counters: CaptionCounters):
        self.config = config
        self.counters = counters

    def payload(self, short: str, long: Optional[str], missing: Optional[str], identity: str,
                where: str) -> Optional[str]:
        """``missing`` is None or why ``long`` is unusable ('absent', 'empty', 'unreadable'); None means skip."""
        config = self.config
        if missing is not None:
            if config.missing_long == "error":
                raise ValueError(f"{where}: long caption {missing} ({config.long_key}) and "
                                 f"--superclip-missing-long is error")
            if config.missing_long == "skip":
                self.counters.add(skipped=1)
                return None
            long = None
        contrastive_long = long is not None and mix_picks_long(config.seed, identity, config.mix_long_ratio)
        class_texts = None
        if config.class_caption:
            class_texts = {"short": [short], "long": [long], "both": [short, long]}[config.class_caption]
            class_texts = [text for text in class_texts if text is not None] or [short]
        return json.dumps({"contrastive": long if contrastive_long else short, "class": class_texts,
                           "contrastive_long": contrastive_long, "missing": missing})


class DualCaptionTokenizer:
    """Stands in for the run's tokenizer in the stock data pipelines: a payload -> one text row, the run
    tokenizer's contrastive tokens followed (SuperCLIP runs) by CLIP BPE class tokens of fixed width."""

    def __init__(self, tokenizer, chooser: CaptionChooser):
        self.tokenizer = tokenizer
        self.chooser = chooser
        config = chooser.config
        if config.class_caption and not all(hasattr(tokenizer, a) for a in ("encode", "sot_token_id",
                                                                                "eot_token_id")):
            raise ValueError(f"DualCaption class targets are CLIP BPE tokens, but the run's tokenizer is "
                             f"{type(tokenizer).__name__}")

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        return torch.stack([self._row(text) for text in texts])

    def _row(self, text: str) -> torch.Tensor:
        try:
            payload = json.loads(text)
            contrastive, class_texts = payload["contrastive"], payload["class"]
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"DualCaptionTokenizer got {text[:80]!r}, not a caption payload of the DualCaption "
                             f"data path") from None
        tokens = self.tokenizer([contrastive])[0]
        counts = {"samples": 1, "contrastive_long": int(payload["contrastive_long"])}
        if payload["missing"]:
            counts[f"long_{payload['missing']}"] = 1
        if class_texts is not None:
            class_row, cut = self._class_row(class_texts)
            tokens = torch.cat([tokens, class_row])
            counts["class_cut"] = int(cut)
        self.chooser.counters.add(**counts)
        return tokens

    def _class_row(self, texts: List[str]) -> Tuple[torch.Tensor, bool]:
        """[SOT] ids... [EOT] 0..., ids of all ``texts`` in order, cut to the class context length."""
        length = self.chooser.config.class_context_length
        ids = [i for text in texts for i in self.tokenizer.encode(text)]
        kept = ids[:length - 2]
        row = torch.zeros(length, dtype=torch.long)
        row[:len(kept) + 2] = torch.tensor([self.tokenizer.sot_token_id, *kept, self.tokenizer.eot_token_id])
        return row, len(kept) < len(ids)


def _decode_text(value) -> Tuple[Optional[str], Optional[str]]:
    """(caption, None) or (None, why it is unusable)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "unreadable"
    if not isinstance(value, str):
        return None, "unreadable"
    value = value.strip()
    return (value, None) if value else (None, "empty")


class LongCaptionStage:
    """A webdataset stage over raw samples (right after the tar reader): sets ``txt`` to the payload of the
    sample's captions; skips a sample under the skip policy. Non-training samples (no caption or image) pass
    through untouched for the stock filter to drop."""

    def __init__(self, chooser: CaptionChooser):
        self.chooser = chooser
        self.member, self.field = parse_wds_key(chooser.config.long_key)

    def __call__(self, samples):
        for sample in samples:
            if not filter_no_caption_or_no_image(sample):
                yield sample
                continue
            try:
                short = sample["txt"].decode("utf-8")
            except UnicodeDecodeError:
                yield sample  # the stock decoder reports and drops it
                continue
            key, url = sample.get("__key__", ""), str(sample.get("__url__", ""))
            long, missing = self._long_caption(sample)
            payload = self.chooser.payload(short, long, missing, identity=f"{os.path.basename(url)}/{key}",
                                           where=f"sample {key!r} of {url}")
            if payload is not None:
                yield {**sample, "txt": payload.encode("utf-8")}

    def _long_caption(self, sample) -> Tuple[Optional[str], Optional[str]]:
        if self.member not in sample:
            return None, "absent"
        if self.field is None:
            return _decode_text(sample[self.member])
        try:
            record = json.loads(sample[self.member])
        except ValueError:
            return None, "unreadable"
        if not isinstance(record, dict) or self.field not in record:
            return None, "absent"
        return _decode_text(record[self.field])


class CsvCaptionPayloads:
    """The ``captions`` of a DualCaption CsvDataset: item i is the payload of row i (the stock __getitem__
    tokenizes ``str(captions[i])``)."""

    def __init__(self, shorts, longs, rows, chooser: CaptionChooser, source: str):
        self.shorts, self.longs, self.rows = shorts, longs, rows
        self.chooser = chooser
        self.source = source

    def __len__(self):
        return len(self.shorts)

    def __getitem__(self, idx) -> str:
        long, missing = _decode_text(self.longs[idx])
        row = self.rows[idx]
        return self.chooser.payload(str(self.shorts[idx]), long, missing, identity=f"row {row}",
                                    where=f"{self.source} row {row}")


class DualCaptionCsvDataset(CsvDataset):
    """open_clip_train's CsvDataset (installed in its place); with a `DualCaptionTokenizer` it also reads the
    long caption column. Missing long captions are found here, at start-up: the error policy stops before
    training, the skip policy drops those rows."""

    def __init__(self, input_filename, transforms, img_key, caption_key, sep="\t", tokenizer=None):
        super().__init__(input_filename, transforms, img_key, caption_key, sep=sep, tokenizer=tokenizer)
        if isinstance(tokenizer, DualCaptionTokenizer):
            self._attach_long_captions(input_filename, sep, tokenizer.chooser)

    def _attach_long_captions(self, input_filename, sep, chooser: CaptionChooser):
        import pandas as pd
        config = chooser.config
        try:
            longs = pd.read_csv(input_filename, sep=sep, usecols=[config.long_key], dtype=str, keep_default_na=False,
                                na_filter=False)[config.long_key].tolist()
        except ValueError as error:
            raise ValueError(f"{input_filename}: no long caption column {config.long_key!r} "
                             f"(--csv-long-caption-key): {error}") from None
        bad = [row for row, text in enumerate(longs) if _decode_text(text)[1] is not None]
        if bad and config.missing_long == "error":
            raise ValueError(f"{input_filename}: row {bad[0]} (line {bad[0] + 2}, image {self.images[bad[0]]}) has "
                             f"an empty long caption ({config.long_key}) and --superclip-missing-long is error "
                             f"({len(bad)} such rows)")
        total, rows = len(longs), list(range(len(longs)))
        if bad and config.missing_long == "skip":
            drop = set(bad)
            rows = [row for row in rows if row not in drop]
            self.images = [self.images[row] for row in rows]
            self.captions = [self.captions[row] for row in rows]
            longs = [longs[row] for row in rows]
        _logger.info(f"DualCaption: {input_filename}: {len(bad)} of {total} rows have no long caption"
                     + (" (removed)" if config.missing_long == "skip" and bad else ""))
        self.captions = CsvCaptionPayloads(self.captions, longs, rows, chooser, input_filename)


class _LoaderWithCaptionReport:
    """The training dataloader, logging the epoch's caption counts (summed over workers and ranks) when an epoch
    has been iterated to the end. Everything else is the wrapped loader's."""

    def __init__(self, loader, counters: CaptionCounters, config: DualCaptionConfig, args, epoch: int):
        self._loader = loader
        self._counters = counters
        self._config = config
        self._args = args
        self._epoch = epoch

    def __getattr__(self, name):
        if name == "_loader":  # not yet set (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._loader, name)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        self._counters.reset()
        yield from self._loader
        counts = self._counters.snapshot()
        if getattr(self._args, "distributed", False) and not getattr(self._args, "horovod", False):
            totals = torch.tensor([counts[f] for f in CaptionCounters.FIELDS], dtype=torch.float64,
                                  device=self._args.device)
            torch.distributed.all_reduce(totals)
            counts = dict(zip(CaptionCounters.FIELDS, (int(v) for v in totals.tolist())))
        if getattr(self._args, "rank", 0) == 0:
            _logger.info(f"DualCaption epoch {self._epoch}: {format_counts(counts, self._config)}")
        self._epoch += 1


def format_counts(counts: dict, config: DualCaptionConfig) -> str:
    samples = counts["samples"]
    missing = counts["long_absent"] + counts["long_empty"] + counts["long_unreadable"]
    text = (f"{samples} samples; contrastive caption long for {counts['contrastive_long']} "
            f"({counts['contrastive_long'] / max(samples, 1):.1%}, ratio {config.mix_long_ratio:g}); "
            f"long caption missing for {missing} (absent {counts['long_absent']}, empty {counts['long_empty']}, "
            f"unreadable {counts['long_unreadable']}) -> short caption used")
    if counts["skipped"]:
        text += f"; {counts['skipped']} samples without a long caption skipped"
    if config.class_caption:
        text += f"; class captions cut at {config.class_context_length} tokens: {counts['class_cut']}"
    return text


def train_dataset_fn(stock_fn, kind: str, insert_sample_stage=None):
    """open_clip_train's dataset function for ``kind`` ('webdataset' / 'csv'), building the DualCaption pipeline
    for training data when the run asks for it and calling the stock function unchanged otherwise.

    insert_sample_stage(data_info, stage): for webdataset, how a stage joins the stock pipeline right after its
    tar reader (it relies on upstream internals, so it lives with the patches: train.plugin)."""

    @functools.wraps(stock_fn)
    def dataset_fn(args, preprocess_fn, is_train, epoch=0, tokenizer=None):
        config = DualCaptionConfig.from_args(args, kind) if is_train else None
        if config is None:
            return stock_fn(args, preprocess_fn, is_train, epoch=epoch, tokenizer=tokenizer)
        return _build_dual_caption_data(stock_fn, kind, config, args, preprocess_fn, epoch, tokenizer,
                                        insert_sample_stage)

    return dataset_fn


def _build_dual_caption_data(stock_fn, kind, config, args, preprocess_fn, epoch, tokenizer, insert_sample_stage):
    counters = CaptionCounters()
    chooser = CaptionChooser(config, counters)
    dual_tokenizer = DualCaptionTokenizer(tokenizer, chooser)
    info = stock_fn(args, preprocess_fn, True, epoch=epoch, tokenizer=dual_tokenizer)
    if kind == "webdataset":
        insert_sample_stage(info, LongCaptionStage(chooser))
    source = f"webdataset member {config.long_key}" if kind == "webdataset" else f"CSV column {config.long_key}"
    _logger.info(f"DualCaption: {config.describe(source)}")
    info.dataloader = _LoaderWithCaptionReport(info.dataloader, counters, config, args, epoch)
    return info
