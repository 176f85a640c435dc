"""Write clip_benchmark's local webdataset layout (`--dataset wds/NAME --dataset_root DIR`) from images + a CSV.

This module is the package's one writer of that layout: `superclip make-wds` uses it for user folders and
`superclip demo-data` for its emoji evaluation sets. The tar shards, `nshards.txt`, `classnames.txt`,
`zeroshot_classification_templates.txt` and `dataset_type.txt` are written by clip_benchmark's own
`webdataset_builder`, so the result is what clip_benchmark's loader reads.

Layout (classification):  DIR/{classnames.txt, zeroshot_classification_templates.txt, SPLIT/{nshards.txt, 0.tar ...}}
  each sample: image (`jpg`/`png`/`webp`) + `cls` (int index into classnames.txt)
Layout (retrieval):       DIR/{dataset_type.txt = "retrieval", SPLIT/{nshards.txt, 0.tar ...}}
  each sample: image + `txt` (every caption of the image, one per line)
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shlex
import sys
import warnings
from pathlib import Path
from open_clip_superclip.atomic import is_nonempty_dir, local_output_path, staging_dir

# Extensions clip_benchmark's wds loader decodes; anything else is re-encoded.
NATIVE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
PIL_SAVE_OPTIONS = {"png": {"format": "PNG"}, "webp": {"format": "WEBP", "lossless": True},
                    "jpg": {"format": "JPEG", "quality": 95}}
DEFAULT_TEMPLATES = ("a photo of a {c}.", "a photo of the {c}.", "an image of a {c}.", "a {c}.")
DEFAULT_MAX_COUNT = 10_000


# ----------------------------------------------------------------------------------------------- writing
class _Samples:
    """Map-style dataset for clip_benchmark's converter (it wraps it in a DataLoader for parallel encoding).

    Yields (image_bytes_or_path, target); `classes`/`templates` attributes are what the converter writes out.
    """

    def __init__(self, items, image_format, pass_paths, classes=None, templates=None):
        self.items = items
        self.image_format = image_format
        self.pass_paths = pass_paths
        self.classes = list(classes) if classes else None
        self.templates = list(templates) if templates else None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image, target = self.items[index]
        if self.pass_paths:
            return str(image), target
        return encode_image(image, self.image_format), target


def encode_image(image, image_format: str) -> bytes:
    """Bytes of `image` (bytes already in `image_format`, a PIL image, or a file path) in `image_format`."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    from PIL import Image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if NATIVE_EXTENSIONS.get(path.suffix.lower()) == image_format:
            return path.read_bytes()
        with Image.open(path) as opened:
            image = opened.copy()
    if image_format == "jpg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, **PIL_SAVE_OPTIONS[image_format])
    return buffer.getvalue()


def _plan_images(items, image_format):
    """Chooses between copying files as they are (all paths with decodable extensions) and encoding."""
    all_native_paths = bool(items) and all(
        isinstance(image, (str, os.PathLike)) and Path(image).suffix.lower() in NATIVE_EXTENSIONS
        for image, _ in items)
    if image_format == "auto":
        return (True, "png") if all_native_paths else (False, "png")
    if image_format not in PIL_SAVE_OPTIONS:
        raise ValueError(f"image_format must be auto, {', '.join(PIL_SAVE_OPTIONS)}; got {image_format!r}")
    return False, image_format


@contextlib.contextmanager
def _builder_output(verbose: bool):
    """clip_benchmark's converter prints bookkeeping lines on stdout: keep them out of ours unless asked."""
    with warnings.catch_warnings():
        # its DataLoader always asks for 8 workers; torch warns when the machine has fewer cores
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        if verbose:
            yield
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                yield


def _check_line(text: str, what: str):
    if not text or "\n" in text or "\r" in text:
        raise ValueError(f"{what} must be a non-empty single line, got {text!r}")


def write_classification(out_dir, items, classnames, templates=DEFAULT_TEMPLATES, *, split="test",
                         image_format="auto", max_count=DEFAULT_MAX_COUNT, verbose=False) -> int:
    """Writes [(image, class_index)] as a zero-shot classification set under out_dir; returns the count.

    image: a file path, a PIL image, or bytes already encoded in `image_format`. Class indices index classnames.
    """
    from clip_benchmark import webdataset_builder as cbw
    items = list(items)
    classnames = list(classnames)
    templates = list(templates)
    for name in classnames:
        _check_line(name, "class name")
    for template in templates:
        _check_line(template, "template")
        if "{c}" not in template:
            raise ValueError(f"template {template!r} has no {{c}} placeholder")
    for _, label in items:
        if not (isinstance(label, int) and 0 <= label < len(classnames)):
            raise ValueError(f"label {label!r} is not an index into {len(classnames)} class names")
    pass_paths, fmt = _plan_images(items, image_format)
    dataset = _Samples(items, fmt, pass_paths, classes=classnames, templates=templates)
    with _builder_output(verbose):
        cbw.convert_dataset(dataset, split, str(out_dir), transform=cbw.path_to_bytes if pass_paths else None,
                            image_format=fmt, max_count=max_count, verbose=verbose)
    return len(items)


def write_retrieval(out_dir, items, *, split="test", image_format="auto", max_count=DEFAULT_MAX_COUNT,
                    verbose=False) -> int:
    """Writes [(image, [caption, ...])] as a zero-shot retrieval set under out_dir; returns the image count."""
    from clip_benchmark import webdataset_builder as cbw
    items = [(image, list(captions)) for image, captions in items]
    for _, captions in items:
        if not captions:
            raise ValueError("every image needs at least one caption")
        for caption in captions:
            _check_line(caption, "caption")
    pass_paths, fmt = _plan_images(items, image_format)
    dataset = _Samples(items, fmt, pass_paths)
    with _builder_output(verbose):
        cbw.convert_retrieval_dataset(dataset, split, str(out_dir),
                                      transform=cbw.path_to_bytes if pass_paths else None,
                                      image_format=fmt, max_count=max_count, verbose=verbose)
    return len(items)


# ----------------------------------------------------------------------------------- atomic output folders
# --------------------------------------------------------------------------------------------------- CLI
def _read_lines(path) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_table(csv_path, task="auto"):
    """Reads filepath,label or filepath,caption rows; returns (task, rows) with rows as (filepath, value)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        if "filepath" not in columns:
            raise ValueError(f"{csv_path}: needs a 'filepath' column, has {columns}")
        if task == "auto":
            present = [c for c in ("label", "caption") if c in columns]
            if len(present) != 1:
                raise ValueError(f"{csv_path}: needs exactly one of the columns 'label' (classification) or "
                                 f"'caption' (retrieval), or pass --task; has {columns}")
            task = "classification" if present[0] == "label" else "retrieval"
        column = "label" if task == "classification" else "caption"
        if column not in columns:
            raise ValueError(f"{csv_path}: task {task} needs a '{column}' column, has {columns}")
        rows = [((row["filepath"] or "").strip(), (row[column] or "").strip()) for row in reader]
    rows = [(path, value) for path, value in rows if path]
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    return task, rows


def _resolve(images_dir: Path, filepath: str) -> Path:
    path = Path(filepath)
    return path if path.is_absolute() else images_dir / path


def classification_items(images_dir, rows, classnames=None):
    """(items, classnames): labels are class names, or integer indices when a classnames list is given."""
    labels = {}
    for filepath, label in rows:
        if not label:
            raise ValueError(f"{filepath}: empty label")
        if labels.setdefault(filepath, label) != label:
            raise ValueError(f"{filepath}: two labels ({labels[filepath]!r}, {label!r}); multilabel is unsupported")
    if classnames is None:
        classnames = sorted(set(labels.values()))
    index = {name: i for i, name in enumerate(classnames)}
    items = []
    for filepath, label in labels.items():
        if label in index:
            target = index[label]
        elif label.isdigit() and int(label) < len(classnames):
            target = int(label)
        else:
            raise ValueError(f"{filepath}: label {label!r} is not in the class names")
        items.append((_resolve(images_dir, filepath), target))
    return items, list(classnames)


def retrieval_items(images_dir, rows):
    """Groups captions by image (several rows, or several lines in one cell), keeping first-seen order."""
    captions = {}
    for filepath, caption in rows:
        lines = [line.strip() for line in caption.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{filepath}: empty caption")
        captions.setdefault(filepath, []).extend(lines)
    return [(_resolve(images_dir, filepath), texts) for filepath, texts in captions.items()]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="superclip make-wds",
        description="Turn a folder of images and a CSV (filepath,label or filepath,caption) into "
                    "clip_benchmark's local webdataset layout, for `clip_benchmark eval --dataset wds/NAME "
                    "--dataset_root OUT`.")
    parser.add_argument("images", help="folder the CSV's relative file paths start from")
    parser.add_argument("csv", help="CSV with a header: filepath,label (classification) or filepath,caption "
                                    "(retrieval; repeat a filepath for more captions)")
    parser.add_argument("out", help="output folder (the --dataset_root to give clip_benchmark)")
    parser.add_argument("--task", choices=["auto", "classification", "retrieval"], default="auto",
                        help="default: from the CSV's columns")
    parser.add_argument("--classnames", help="file, one class name per line: fixes the class order; labels may "
                                             "then also be 0-based indices (default: sorted distinct labels)")
    parser.add_argument("--templates", help="file, one zero-shot template per line, each with {c} "
                                            f"(default: {' | '.join(DEFAULT_TEMPLATES)})")
    parser.add_argument("--split", default="test", help="split folder name (default: test)")
    parser.add_argument("--image-format", choices=["auto", "png", "webp", "jpg"], default="auto",
                        help="auto: copy jpg/png/webp files unchanged, re-encode other formats to png")
    parser.add_argument("--max-count", type=int, default=DEFAULT_MAX_COUNT, help="images per tar shard")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--verbose", action="store_true", help="show clip_benchmark's converter output")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    images_dir = Path(args.images)
    if not images_dir.is_dir():
        print(f"error: {args.images} is not a folder", file=sys.stderr)
        return 2
    try:
        out = Path(local_output_path(args.out, "OUT"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if out.is_symlink():  # replace what the link points to, not the link
        out = Path(os.path.realpath(out))
    if out.exists() and not out.is_dir():
        print(f"error: {args.out} exists and is not a folder: remove it or choose another output folder",
              file=sys.stderr)
        return 2
    if is_nonempty_dir(out) and not args.force:
        print(f"error: {args.out} exists and is not empty (use --force to replace it)", file=sys.stderr)
        return 2
    try:
        task, rows = read_table(args.csv, args.task)
        if task == "classification":
            classnames = _read_lines(args.classnames) if args.classnames else None
            items, classnames = classification_items(images_dir, rows, classnames)
        else:
            items = retrieval_items(images_dir, rows)
        missing = [str(path) for path, _ in items if not Path(path).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} image(s) not found, e.g. {', '.join(missing[:3])}")
        templates = _read_lines(args.templates) if args.templates else DEFAULT_TEMPLATES
        with staging_dir(out) as staging:
            if task == "classification":
                count = write_classification(staging, items, classnames, templates, split=args.split,
                                             image_format=args.image_format, max_count=args.max_count,
                                             verbose=args.verbose)
            else:
                count = write_retrieval(staging, items, split=args.split, image_format=args.image_format,
                                        max_count=args.max_count, verbose=args.verbose)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unreadable CSV / --classnames / --templates, or an unwritable OUT
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    if task == "classification":
        print(f"wrote {count} images, {len(classnames)} classes to {out} (split {args.split})")
        hint = "--task zeroshot_classification"
    else:
        n_captions = sum(len(captions) for _, captions in items)
        print(f"wrote {count} images, {n_captions} captions to {out} (split {args.split})")
        hint = "--task zeroshot_retrieval"
    print(f"evaluate: clip_benchmark eval --dataset {shlex.quote('wds/' + out.name)} --dataset_root "
          f"{shlex.quote(str(out))} --split {shlex.quote(args.split)} {hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
