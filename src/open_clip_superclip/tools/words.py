"""Word-image similarity ranking (SuperCLIP paper, appendix A.4, Table 6) as `superclip words`.

Why: the paper shows which words a model ties to a set of images (SuperCLIP ranks fine-grained words such
as attributes higher than CLIP does). Every word is put in a prompt ("a photo of {}"), embedded with the text
tower, and scored by its mean cosine similarity to the images; two models are compared rank against rank.

The mean cosine similarity of a word to N images equals its normalised embedding dotted with the mean of the
normalised image embeddings, so images are reduced to one running float64 sum and never kept.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np
from open_clip_superclip.atomic import local_output_path, write_atomically

from ._plots import figure, png_bytes

if TYPE_CHECKING:
    import torch


DEFAULT_TEMPLATE = "a photo of {}"
# "Whole-word" vocabulary entries: CLIP BPE tokens that end a word ('</w>') and are ASCII lowercase letters only.
WHOLE_WORD_RE = re.compile(r"[a-z]+")
WORD_END = "</w>"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LABELLED_PER_DIRECTION = 10  # most-moved words labelled in the plot, per direction


class InputError(ValueError):
    """Unusable input: reported as `error: ...` with exit code 2."""


# ------------------------------------------------------------------------------------------------- words
def vocabulary_words(tokenizer) -> List[str]:
    """The whole-word entries of a CLIP BPE tokenizer's vocabulary, in token-id order."""
    encoder = getattr(tokenizer, "encoder", None)
    if not isinstance(encoder, dict):
        raise InputError(f"the tokenizer ({type(tokenizer).__name__}) has no CLIP BPE vocabulary to take words "
                         "from: pass a word list with --words FILE")
    tokens = sorted(encoder, key=encoder.get)
    return [t[:-len(WORD_END)] for t in tokens if t.endswith(WORD_END) and WHOLE_WORD_RE.fullmatch(t[:-len(WORD_END)])]


def read_word_list(path: str) -> List[str]:
    """One word (or phrase) per line; blank lines and lines starting with '#' are skipped, repeats dropped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as error:
        raise InputError(f"cannot read --words {path}: {error.strerror or error}") from error
    words = list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    if not words:
        raise InputError(f"--words {path} holds no words (one per line; '#' starts a comment)")
    return words


def check_template(template: str) -> None:
    if template.count("{}") != 1:
        raise InputError(f"--template must contain '{{}}' exactly once (where the word goes), got {template!r}")
    try:
        template.format("word")
    except (IndexError, KeyError, ValueError) as error:
        raise InputError(f"--template {template!r} is not a valid format string: write other braces as "
                         f"'{{{{' and '}}}}' ({error})") from error


# ------------------------------------------------------------------------------------------------ images
@dataclass
class ImageSet:
    files: List[str]   # image files from folders, sorted
    shards: List[str]  # webdataset shard urls


def resolve_images(specs: Sequence[str]) -> ImageSet:
    """Folders of images (searched recursively) and webdataset shard patterns (braceexpand, '::' separated)."""
    import braceexpand

    def local(url):  # file:// URLs are local paths: checked (and folders searched) like them
        return url[len("file://"):] if url.startswith("file://") else url

    files, shards = [], []
    for spec in specs:
        if os.path.isdir(local(spec)):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(local(spec)) for name in names
                           if name.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise InputError(f"--images {spec}: folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
            continue
        for part in spec.split("::"):
            for url in braceexpand.braceexpand(part) if part else ():
                if "://" not in local(url) and not url.startswith("pipe:") and not os.path.isfile(local(url)):
                    raise InputError(f"--images {spec}: {url} is neither an image folder nor a shard file")
                shards.append(url)
    if not files and not shards:
        raise InputError("--images names no images")
    return ImageSet(files, shards)


class _ImageFiles:
    """A map-style dataset (what torch's DataLoader needs) over image files."""

    def __init__(self, files, preprocess):
        self.files, self.preprocess = files, preprocess

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return _decode(self.files[index], self.files[index], self.preprocess)


def _decode(source, where: str, preprocess):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(source) as image:
            return preprocess(image)
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"{where}: not a readable image ({error})") from error


def _sample_image(sample, preprocess):
    for key in sorted(sample):
        if "." + key.lower() in IMAGE_EXTENSIONS:
            where = f"webdataset sample {sample.get('__key__')!r}.{key} in {sample.get('__url__')}"
            return _decode(io.BytesIO(sample[key]), where, preprocess)
    raise InputError(f"webdataset sample {sample.get('__key__')!r} in {sample.get('__url__')} has no image member "
                     f"(members: {sorted(k for k in sample if not k.startswith('__'))})")


def image_loaders(images: ImageSet, preprocess, batch_size: int, workers: int):
    """DataLoaders over the folder images, then the shards (webdataset splits shards among workers)."""
    import torch
    import webdataset as wds

    loaders = []
    if images.files:
        loaders.append(torch.utils.data.DataLoader(_ImageFiles(images.files, preprocess), batch_size=batch_size,
                                                   num_workers=workers))
    if images.shards:
        dataset = (wds.WebDataset(images.shards, shardshuffle=False)
                   .map(partial(_sample_image, preprocess=preprocess))
                   .batched(batch_size, collation_fn=torch.stack))
        loaders.append(torch.utils.data.DataLoader(dataset, batch_size=None,
                                                   num_workers=min(workers, len(images.shards))))
    return loaders


def mean_image_embedding(model, preprocess, images: ImageSet, batch_size: int, max_images: Optional[int],
                         workers: int, device, progress: bool = True) -> Tuple[torch.Tensor, int]:
    """The mean of the images' normalised embeddings (float64) and how many images went into it."""
    import torch
    with torch.inference_mode():
        return _mean_image_embedding(model, preprocess, images, batch_size, max_images, workers, device, progress)


def _mean_image_embedding(model, preprocess, images, batch_size, max_images, workers, device, progress):
    from tqdm import tqdm

    total, count = None, 0
    known = len(images.files) if not images.shards else None
    bar = tqdm(total=min(filter(None, (known, max_images)), default=None), unit="img", desc="images",
               disable=not progress)
    for loader in image_loaders(images, preprocess, batch_size, workers):
        for batch in loader:
            if max_images is not None:
                batch = batch[:max_images - count]
            features = model.encode_image(batch.to(device), normalize=True).double().sum(dim=0)
            total = features if total is None else total + features
            count += len(batch)
            bar.update(len(batch))
            if count == max_images:
                break
        if count == max_images:
            break
    bar.close()
    if count == 0:
        raise InputError("the image set is empty: no images were read from --images")
    return total / count, count


# ------------------------------------------------------------------------------------------------ scores
def word_scores(model, tokenizer, words: Sequence[str], template: str, mean_image: torch.Tensor,
                batch_size: int, device, progress: bool = True) -> np.ndarray:
    """Mean cosine similarity of each word's prompt embedding to the images (float64, in `words` order)."""
    import torch
    from tqdm import tqdm

    scores = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(words), batch_size), desc="words", unit="batch", disable=not progress):
            prompts = [template.format(word) for word in words[start:start + batch_size]]
            features = model.encode_text(tokenizer(prompts).to(device), normalize=True).double()
            scores.append((features @ mean_image).cpu().numpy())
    return np.concatenate(scores)


def ranks_of(scores: np.ndarray, words: Sequence[str]) -> np.ndarray:
    """1 = most similar; equal scores are ordered by the word, so the ranking is a deterministic permutation."""
    order = sorted(range(len(words)), key=lambda i: (-scores[i], words[i]))
    ranks = np.empty(len(words), dtype=np.int64)
    ranks[order] = np.arange(1, len(words) + 1)
    return ranks


@dataclass
class Ranking:
    label: str
    scores: np.ndarray
    ranks: np.ndarray
    num_images: int


# ----------------------------------------------------------------------------------------------- reports
def _sections(num_words: int, top: int):
    middle = max(0, num_words // 2 - top // 2)
    return [(f"top {top}", 0), (f"middle {top}", middle), (f"bottom {top}", max(0, num_words - top))]


def _moved(words, first: Ranking, second: Ranking, top: int):
    """(rose most, fell most) under the second model: indices sorted by rank change, then word."""
    change = first.ranks - second.ranks
    rose = sorted((i for i in range(len(words)) if change[i] > 0), key=lambda i: (-change[i], words[i]))[:top]
    fell = sorted((i for i in range(len(words)) if change[i] < 0), key=lambda i: (change[i], words[i]))[:top]
    return rose, fell


def format_report(words: Sequence[str], rankings: Sequence[Ranking], template: str, top: int) -> str:
    """The top / middle / bottom `top` words per model, side by side, then the words that moved most."""
    width = max(len(w) for w in words)
    by_rank = [np.argsort(r.ranks, kind="stable") for r in rankings]
    lines = [f"model {k + 1}: {r.label}" for k, r in enumerate(rankings)]
    lines += [f"{len(words)} words in {template!r}, scored by mean cosine similarity to "
              f"{rankings[0].num_images} images", ""]
    for title, start in _sections(len(words), top):
        lines.append(f"{title}:")
        lines.append(f"{'rank':>8}" + "".join(f"  {'model ' + str(k + 1):<{width + 8}}" for k in range(len(rankings))))
        for position in range(start, min(start + top, len(words))):
            cells = [f"  {words[order[position]]:<{width}}{r.scores[order[position]]:>8.4f}"
                     for order, r in zip(by_rank, rankings)]
            lines.append(f"{position + 1:>8}" + "".join(cells))
        lines.append("")
    if len(rankings) == 2:
        rose, fell = _moved(words, *rankings, top)
        for title, indices in (("rose most under model 2", rose), ("fell most under model 2", fell)):
            lines.append(f"{title} (rank under model 1 -> model 2):")
            lines += [f"  {words[i]:<{width}}  {rankings[0].ranks[i]:>7} -> {rankings[1].ranks[i]:<7} "
                      f"({rankings[0].ranks[i] - rankings[1].ranks[i]:+d})" for i in indices]
            lines.append("")
    return "\n".join(line.rstrip() for line in lines)


def ranking_csv(words: Sequence[str], rankings: Sequence[Ranking]) -> str:
    """Every word, ordered by its rank under model 1: rank_k, score_k per model (+ rank_change = r1 - r2)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["word"] + [f"{field}_{k + 1}" for k in range(len(rankings)) for field in ("rank", "score")]
    writer.writerow(header + (["rank_change"] if len(rankings) == 2 else []))
    for i in np.argsort(rankings[0].ranks, kind="stable"):
        row = [words[i]] + [value for r in rankings for value in (int(r.ranks[i]), f"{r.scores[i]:.6f}")]
        if len(rankings) == 2:
            row.append(int(rankings[0].ranks[i] - rankings[1].ranks[i]))
        writer.writerow(row)
    return out.getvalue()


def ranking_png(words: Sequence[str], rankings: Sequence[Ranking]) -> bytes:
    """Two models: rank vs rank with the most-moved words labelled; one model: score vs rank, ends labelled."""
    fig = figure(*((8, 8) if len(rankings) == 2 else (9, 5)), dpi=120, layout=None)
    axes = fig.subplots()
    n = len(words)
    if len(rankings) == 2:
        first, second = rankings
        axes.scatter(first.ranks, second.ranks, s=2, alpha=0.3, linewidths=0)
        axes.plot([1, n], [1, n], color="grey", linewidth=0.8)
        rose, fell = _moved(words, first, second, LABELLED_PER_DIRECTION)
        labelled = [(i, "tab:green") for i in rose] + [(i, "tab:red") for i in fell]
        for i, colour in labelled:
            axes.scatter([first.ranks[i]], [second.ranks[i]], s=10, color=colour)
            axes.annotate(words[i], (first.ranks[i], second.ranks[i]), fontsize=7, color=colour,
                          xytext=(3, 3), textcoords="offset points")
        axes.set_xlabel(f"rank under model 1 (1 = most similar): {first.label}", fontsize=8)
        axes.set_ylabel(f"rank under model 2: {second.label}", fontsize=8)
        axes.set_title("word-image similarity rank (green: rose most under model 2, red: fell most)", fontsize=9)
    else:
        (only,) = rankings
        order = np.argsort(only.ranks, kind="stable")
        axes.plot(np.arange(1, n + 1), only.scores[order], linewidth=1)
        ends = list(order[:LABELLED_PER_DIRECTION]) + list(order[-LABELLED_PER_DIRECTION:])
        for i in dict.fromkeys(ends):
            axes.annotate(words[i], (only.ranks[i], only.scores[i]), fontsize=7, xytext=(3, 0),
                          textcoords="offset points")
        axes.set_xlabel("rank (1 = most similar)")
        axes.set_ylabel("mean cosine similarity to the images")
        axes.set_title(f"word-image similarity: {only.label}", fontsize=9)
    return png_bytes(fig)


# ---------------------------------------------------------------------------------------------------- CLI
class _ModelAction(argparse.Action):
    """Collects [name, pretrained] pairs in order, so each --pretrained belongs to the --model before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        models = list(getattr(namespace, self.dest) or [])
        if option_string == "--model":
            models.append([value, None])
        elif not models:
            parser.error("--pretrained must come after the --model it belongs to")
        elif models[-1][1] is not None:
            parser.error(f"--pretrained given twice for --model {models[-1][0]}")
        else:
            models[-1][1] = value
        setattr(namespace, self.dest, models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="superclip words",
        description="Rank words by their mean cosine similarity to a set of images (SuperCLIP paper, appendix "
                    "A.4 / Table 6); with two models, side by side with the words whose rank moved most.")
    parser.add_argument("--model", action=_ModelAction, dest="models", default=None,
                        help="open_clip model name; give --model [--pretrained] twice to compare two models")
    parser.add_argument("--pretrained", action=_ModelAction, dest="models",
                        help="the weights of the --model before it: a checkpoint file (trainer epoch_N.pt or a "
                             "state dict) or a pretrained tag; local-dir:/hf-hub: models bring their own")
    parser.add_argument("--images", nargs="+", required=True,
                        help="folder(s) of images and/or webdataset shard pattern(s), e.g. 'data/{000..009}.tar'")
    parser.add_argument("--max-images", type=int, default=None, help="use at most this many images (in input order)")
    parser.add_argument("--words", default=None,
                        help="word list file, one per line (default: the whole-word tokens of the CLIP BPE "
                             "vocabulary)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"prompt template (default {DEFAULT_TEMPLATE!r})")
    parser.add_argument("--top", type=int, default=20, help="words per printed section (default 20)")
    parser.add_argument("--csv", default="word_ranking.csv", help="full ranking (default word_ranking.csv)")
    parser.add_argument("--png", default="word_ranking.png", help="rank plot (default word_ranking.png)")
    parser.add_argument("--batch-size", type=int, default=128, help="images / prompts per forward pass (default 128)")
    parser.add_argument("--workers", type=int, default=2, help="image loading processes (default 2; 0 = in-process)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _validate(parser, args) -> None:
    import open_clip

    if not args.models:
        parser.error("--model is required")
    if len(args.models) > 2:
        parser.error(f"--model given {len(args.models)} times: compare at most two models")
    for name, value in (("--max-images", args.max_images), ("--top", args.top), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    known = set(open_clip.list_models())
    for name, pretrained in args.models:
        if name.startswith(("hf-hub:", "local-dir:")):
            if pretrained is not None:
                parser.error(f"{name} brings its own weights: drop --pretrained {pretrained}")
            continue
        if name not in known:
            parser.error(f"unknown model {name!r}; `python -c \"import open_clip; print(open_clip.list_models())\"` "
                         "lists the known ones")
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained is None:
            parser.error(f"--model {name} needs --pretrained (a checkpoint file or one of: {', '.join(tags) or '-'})")
        if not os.path.isfile(pretrained) and pretrained not in tags:
            parser.error(f"--pretrained {pretrained!r} for {name} is neither a file nor a known tag "
                         f"({', '.join(tags) or 'this model has none'})")


def load_model(name: str, pretrained: Optional[str], device):
    """Model, validation preprocessing and tokenizer, through open_clip's own factory."""
    import pickle

    import open_clip
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except (RuntimeError, ValueError, OSError, KeyError, pickle.UnpicklingError) as error:
        raise InputError(f"cannot load {name}" + (f" with --pretrained {pretrained}" if pretrained else "")
                         + f": {error}") from error
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import open_clip_superclip  # noqa: F401  (registers the SuperCLIP configs even with auto-loading off)
    _validate(parser, args)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        for flag in ("csv", "png"):  # before the model runs: a bad output path fails in a second, not after it
            try:
                path = local_output_path(getattr(args, flag), f"--{flag}")
            except ValueError as error:
                raise InputError(str(error)) from None
            if os.path.isdir(path):
                raise InputError(f"--{flag} {getattr(args, flag)} is a folder: give a file name")
            setattr(args, flag, path)
        check_template(args.template)
        images = resolve_images(args.images)
        words = read_word_list(args.words) if args.words else None
        rankings = []
        for name, pretrained in args.models:
            model, preprocess, tokenizer = load_model(name, pretrained, args.device)
            if words is None:
                words = vocabulary_words(tokenizer)
            mean_image, count = mean_image_embedding(model, preprocess, images, args.batch_size, args.max_images,
                                                     args.workers, args.device, not args.no_progress)
            scores = word_scores(model, tokenizer, words, args.template, mean_image, args.batch_size, args.device,
                                 not args.no_progress)
            label = name if pretrained is None else f"{name} ({pretrained})"
            rankings.append(Ranking(label, scores, ranks_of(scores, words), count))
            del model
    except InputError as error:
        print(f"superclip words: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. a shard URL that cannot be opened (webdataset adds the URL to the error)
        print(f"superclip words: error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(format_report(words, rankings, args.template, args.top))
    text = ranking_csv(words, rankings)
    image = ranking_png(words, rankings)
    try:
        write_atomically(args.csv, lambda f: f.write(text.encode("utf-8")))
        write_atomically(args.png, lambda f: f.write(image))
    except OSError as error:
        print(f"superclip words: error writing the ranking: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.csv} and {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
