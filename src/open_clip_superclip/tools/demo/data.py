"""The data sets the demo and the experiment train on, in the layout their cells read.

Both train from open_clip's CSV layout: its loader draws the sample order from ``--seed``, so two cells of the same
seed see the same batches and a rerun repeats a cell exactly. (open_clip's webdataset loader shuffles samples with
webdataset's ``shuffle``, seeded from the process id and the clock: two runs of the same command differ.)
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from open_clip_superclip.atomic import staging_dir, write_atomically


@dataclass(frozen=True)
class DatasetSpec:
    title: str
    table_rows: tuple  # (eval set, metric) rows of the report tables
    curve_rows: tuple  # the metrics plotted against steps
    set_titles: dict


DATASETS = {
    # acc5 is left out of the probes: with 5 skin tones it is always 1, with 3 genders clip_benchmark reports NaN
    "emoji": DatasetSpec(
        "OpenMoji",
        (("emoji_heldout", "acc1"), ("emoji_heldout", "acc5"), ("emoji_heldout", "mean_per_class_recall"),
         ("emoji_skintone", "acc1"), ("emoji_skintone", "mean_per_class_recall"),
         ("emoji_gender", "acc1"), ("emoji_gender", "mean_per_class_recall"),
         ("emoji_retrieval", "image_retrieval_recall@1"), ("emoji_retrieval", "image_retrieval_recall@5"),
         ("emoji_retrieval", "image_retrieval_recall@10"), ("emoji_retrieval", "text_retrieval_recall@1"),
         ("emoji_retrieval", "text_retrieval_recall@5"), ("emoji_retrieval", "text_retrieval_recall@10")),
        (("emoji_heldout", "acc5"), ("emoji_skintone", "acc1"), ("emoji_gender", "acc1"),
         ("emoji_retrieval", "image_retrieval_recall@5")),
        {"emoji_heldout": "held-out zero-shot", "emoji_skintone": "skin-tone probe", "emoji_gender": "gender probe",
         "emoji_retrieval": "held-out retrieval"}),
    "clipart": DatasetSpec(
        "Open Clip Art",
        (("clipart_category", "acc1"), ("clipart_category", "acc5"), ("clipart_category", "mean_per_class_recall"),
         ("clipart_retrieval", "image_retrieval_recall@1"), ("clipart_retrieval", "image_retrieval_recall@5"),
         ("clipart_retrieval", "image_retrieval_recall@10"), ("clipart_retrieval", "text_retrieval_recall@1"),
         ("clipart_retrieval", "text_retrieval_recall@5"), ("clipart_retrieval", "text_retrieval_recall@10")),
        (("clipart_category", "acc1"), ("clipart_category", "mean_per_class_recall"),
         ("clipart_retrieval", "image_retrieval_recall@5"), ("clipart_retrieval", "text_retrieval_recall@5")),
        {"clipart_category": "held-out category zero-shot", "clipart_retrieval": "held-out retrieval"}),
}
SET_TITLES = {name: title for spec in DATASETS.values() for name, title in spec.set_titles.items()}


@dataclass
class Data:
    key: str  # a DATASETS key
    root: Path
    manifest: dict
    csv: dict = field(default_factory=dict)  # samples per epoch (None: all) -> training CSV

    @property
    def spec(self) -> DatasetSpec:
        return DATASETS[self.key]

    @property
    def num_train(self) -> int:
        return self.manifest["train"]["num_samples"]

    @property
    def word_images(self) -> str:
        """What `superclip words --images` reads: the held-out images."""
        return self.manifest["val"].get("images") or self.manifest["val"]["val_data"]

    def eval_sets(self, task: str) -> list:
        """clip_benchmark dataset names (wds/...) of one task that this build has."""
        return [name for name, info in self.manifest["eval"].items() if info["task"] == task]

    def table_rows(self) -> list:
        present = {name.split("/", 1)[1] for name in self.manifest["eval"]}
        return [(dataset, metric) for dataset, metric in self.spec.table_rows if dataset in present]

    def fingerprint(self) -> dict:
        return {"root": str(self.root), "settings": self.manifest["settings"], "versions": self.manifest["versions"]}


def ensure_data(key: str, folder, settings: dict, subsets=(None,), build: bool = True) -> Optional[Data]:
    """A data set (built, or found up to date) and its training CSVs: all samples, and the first N for each N in
    subsets. build=False only reads a data set built earlier (None if there is none): the report of a partial
    run still covers every finished cell."""
    folder = Path(folder).absolute()
    if build:
        if key == "emoji":
            from .emoji_data import build as build_data
        else:
            from .clipart_data import build as build_data
        manifest = build_data(folder, **settings)
    else:
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    data = Data(key, folder, manifest)
    table = emoji_training_csv(data) if key == "emoji" else Path(data.manifest["train"]["csv"])
    data.csv = {rows: table if rows is None else first_rows(table, rows, folder) for rows in subsets}
    return data


def emoji_training_csv(data: Data) -> Path:
    """The OpenMoji training shards in open_clip's CSV layout (one PNG per sample, a tab-separated filepath/title
    table), in DATA-csv/ beside the data; rebuilt when the data's manifest changes."""
    folder = data.root.parent / f"{data.root.name}-csv"
    manifest = json.dumps(data.manifest, sort_keys=True).encode()
    source = json.dumps({"manifest_sha256": hashlib.sha256(manifest).hexdigest()})
    if (folder / "source.json").is_file() and (folder / "source.json").read_text(encoding="utf-8") == source:
        return folder / "train.csv"
    with staging_dir(folder) as staging:
        (staging / "images").mkdir()
        table = io.StringIO()
        writer = csv.writer(table, delimiter="\t", lineterminator="\n")
        writer.writerow(["filepath", "title"])
        shards = json.loads((data.root / "train" / "sizes.json").read_text(encoding="utf-8"))
        for shard in sorted(shards):
            samples = {}
            with tarfile.open(data.root / "train" / shard) as tar:
                for member in tar.getmembers():
                    key, _, extension = member.name.partition(".")
                    if extension in ("png", "txt"):
                        samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
            for key in sorted(samples):  # the shards hold the samples in random order already
                image = folder / "images" / f"{key}.png"
                (staging / "images" / image.name).write_bytes(samples[key]["png"])
                writer.writerow([str(image), samples[key]["txt"].decode("utf-8")])
        (staging / "train.csv").write_text(table.getvalue(), encoding="utf-8")
        (staging / "source.json").write_text(source, encoding="utf-8")
    return folder / "train.csv"


def first_rows(table: Path, rows: int, data_root: Path) -> Path:
    """The first `rows` samples of a training CSV (the tables are in random order already), beside the data."""
    subset = data_root.parent / f"{data_root.name}-csv" / f"train-{rows}.csv"
    lines = table.read_text(encoding="utf-8").splitlines(keepends=True)[:rows + 1]
    text = "".join(lines).encode("utf-8")
    if not subset.is_file() or subset.read_bytes() != text:
        write_atomically(subset, lambda f: f.write(text))
    return subset


def chance_level(data: Data, dataset: str, metric: str) -> float:
    """The expected score of random embeddings: k/C for top-k of C classes, 1/C for mean per-class recall; for
    retrieval k/N (one right image of N per caption) and 1 - C(T-m, k)/C(T, k) (m right of T captions)."""
    info = data.manifest["eval"][f"wds/{dataset}"]
    match = re.fullmatch(r"acc(\d+)", metric)
    if info["task"] == "zeroshot_classification":
        classes = len(_lines(Path(info["root"]) / "classnames.txt"))
        if match:
            return min(int(match.group(1)), classes) / classes
        if metric == "mean_per_class_recall":
            return 1 / classes
    else:
        images = info["num_images"]
        k = int(metric.rsplit("@", 1)[1])
        if metric.startswith("image_retrieval_recall@"):
            return min(k, images) / images
        if metric.startswith("text_retrieval_recall@"):
            per_image = len(data.manifest["caption_templates"])
            texts = images * per_image
            return 1.0 if k >= texts else 1 - math.comb(texts - per_image, k) / math.comb(texts, k)
    raise ValueError(f"no chance level for {dataset} {metric}")


def _lines(path: Path) -> list:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def word_list(data: Data) -> list:
    """The distinct words (2+ letters) of every emoji name in this build: the words the models were trained on,
    plus those of the held-out names."""
    words = set()
    for line in (data.root / "emoji.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("split") in ("train", "heldout"):
            words.update(word for word in re.findall(r"[^\W\d_]+", record["name"]) if len(word) > 1)
    return sorted(words)
