"""`superclip clipart-data OUT`: Open Clip Art drawings with a real short and long caption.

For the paper's DualCaption table: Debian's `openclipart-svg` (public-domain drawings; title, description and
keywords in each SVG's RDF metadata) and `openclipart-png` (the same drawings rasterised) give short = the
title, long = title + description + keywords. Read from /usr/share/openclipart or a cache filled by `apt-get
download` + `dpkg-deb -x` (no root); never committed. Fixed rules (docs/clipart_data.md has the numbers):
- Text (`fix_text`): entities, tags, cp1252 mojibake fixed; `hash(0x...)`/`0x...`, e-mails, URLs, `.svg`,
  "openclipart" removed; `_`/dashes -> spaces. "Clipart by AUTHOR - X" titles keep X. Descriptions inside the
  title, equal to an author, or shared by SHARED_DESCRIPTION_MIN+ titles go; keywords lose junk,
  GENERIC_KEYWORDS, author names, repeats and copies of the title.
- Boilerplate: a title on SHARED_TITLE_MIN+ distinct SVG files ("gramastar", "Lemon SVG theme") does not
  describe a drawing whose file name lacks one of its words; those drawings, and untitled ones, are dropped.
- Duplicates: byte-identical SVGs, then identical final images, keep the first path, which takes every copy's
  top-level folder. Split: held out when sha256("superclip-clipart-split:SEED:PATH")[:8] / 2**64 < frac.
- Classes: the top-level folder, "_" as spaces, minus EXCLUDED_CATEGORIES and drawings with several, kept
  when min_class_size+ drawings are held out.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import html
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from open_clip_superclip.atomic import is_nonempty_dir, staging_dir
from ..make_wds import write_classification, write_retrieval
from .cache import build_command, up_to_date_manifest

FORMAT_VERSION = 1
SYSTEM_SOURCE = Path("/usr/share/openclipart")
DEBIAN_PACKAGES = ("openclipart-svg", "openclipart-png")
CACHE_NAME = "open_clip_superclip/openclipart"  # below $XDG_CACHE_HOME or ~/.cache

CLASS_TEMPLATES = ("a clip art drawing of {c}.", "clip art of {c}.", "a drawing of {c}.",
                   "an illustration of {c}.", "{c} clip art.")
CAPTION_TEMPLATES = ("{c}",)  # retrieval captions are the bare short caption: one per image
EVAL_SETS = {"wds/clipart_category": "zeroshot_classification", "wds/clipart_retrieval": "zeroshot_retrieval"}

EXCLUDED_CATEGORIES = frozenset({"unsorted", "special"})  # not subjects: a bin; gradients, patterns, examples
# Say nothing about a drawing: a Perl stringification artefact, library/format names, collection tags.
GENERIC_KEYWORDS = frozenset({"hash", "unsorted", "openclipart", "clipart", "clip art", "svg", "mapsym",
                              "appicon", "mimetypes", "mime types"})
STOPWORDS = frozenset({"a", "an", "the", "of", "and", "with", "by", "in", "on", "for", "to", "b", "w"})  # "B and W"
# Strings pandas' read_csv (open_clip's CSV loader) would turn into NaN.
PANDAS_NA = frozenset({"na", "n/a", "nan", "null", "none", "#n/a", "#na", "<na>", "-nan", "1.#ind", "1.#qnan",
                       "-1.#ind", "-1.#qnan", "#n/a n/a", "-na"})
SHARED_TITLE_MIN = 3
SHARED_DESCRIPTION_MIN = 3
MAX_PIXELS = 40_000_000  # larger PNGs (a few 16000 px sheets, 3 over Pillow's bomb limit) are skipped
MARGIN = 0.04  # white border around the cropped drawing, per side, as a share of the image side

_HASH = re.compile(r"(?i)\bhash\s*\(\s*(?:0x)?[0-9a-f]*\s*\)|\b0x[0-9a-f]{3,}\b")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(r"(?i)\b(?:https?|ftp)://\S*|\bwww\.\S+")
_NOISE = re.compile(r"(?i)\.(?:svg|png)\b|\bopenclipart\b")  # file extensions, the library's own name
_TAG = re.compile(r"(?s)<!--.*?-->|<[^>]*>")
_DASH = re.compile(r"[_\-\u2010-\u2015]+")
_C1 = re.compile(r"[\x80-\x9f]")
_LETTER = re.compile(r"[^\W\d_]")
_AUTHOR_PREFIX = re.compile(r"(?i)^\s*clip\s*art\s+by\s+[^-\u2013]+?\s+[-\u2013]\s+")


# ------------------------------------------------------------------------------------------------ source
def _tree(folder: Path):
    """`folder` itself, or its dpkg-extracted usr/share/openclipart, when it holds svg/ and png/."""
    return next((root for root in (folder, folder / "usr" / "share" / "openclipart")
                 if (root / "svg").is_dir() and (root / "png").is_dir()), None)


def fetch_debian_packages(cache: Path, log=print) -> Path:
    """Fills `cache` with the two packages' files (apt-get download + dpkg-deb -x: no root needed)."""
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not found: the data comes from the Debian packages "
                           f"{' '.join(DEBIAN_PACKAGES)}; apt-get install them, or pass --source DIR with svg/, png/")
    if is_nonempty_dir(cache):
        raise RuntimeError(f"{cache} is not empty and holds no svg/ and png/; refusing to replace it")
    log(f"downloading {' '.join(DEBIAN_PACKAGES)} into {cache} (about 160 MB)")
    with staging_dir(cache) as staging:
        _run(["apt-get", "download", *DEBIAN_PACKAGES], staging)
        for deb in sorted(staging.glob("*.deb")):
            _run(["dpkg-deb", "-x", deb.name, "."], staging)
            deb.unlink()
    return _tree(cache)


def _run(argv, cwd):
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}; "
                           f"try apt-get update, or pass --source DIR")


def find_source(source=None, cache=None, log=print) -> Path:
    """The folder holding svg/ and png/: `source`, else /usr/share/openclipart, else the (filled) cache."""
    if source is not None:
        if (root := _tree(Path(source))) is None:
            raise RuntimeError(f"--source {source}: no svg/ and png/ folders there (nor under usr/share/openclipart)")
        return root.absolute()
    if (root := _tree(SYSTEM_SOURCE)) is not None:
        return root
    cache = Path(cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / CACHE_NAME)
    return (_tree(cache) or fetch_debian_packages(cache, log)).absolute()


def debian_version(root: Path):
    """The packaged version from the changelog beside the tree (None when the tree was copied without it)."""
    try:
        with gzip.open(root.parent / "doc" / "openclipart-svg" / "changelog.Debian.gz", "rt") as handle:
            return re.match(r"\S+ \(([^)]+)\)", handle.readline()).group(1)
    except (OSError, AttributeError):
        return None


def source_files(root: Path) -> tuple[list[str], str]:
    """The drawings (SVG paths relative to svg/, without .svg, sorted) and a fingerprint of both trees."""
    digest, drawings = hashlib.sha256(), []
    for kind in ("svg", "png"):
        top = (root / kind).resolve()
        for folder, _, names in sorted(os.walk(top)):
            for name in sorted(names):
                stat = os.stat(os.path.join(folder, name))
                relative = os.path.relpath(os.path.join(folder, name), top).replace(os.sep, "/")
                digest.update(f"{kind}/{relative}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
                if kind == "svg" and name.lower().endswith(".svg"):
                    drawings.append(relative[:-4])
    return sorted(drawings), digest.hexdigest()


# ---------------------------------------------------------------------------------------------- metadata
def _category(path: str) -> str:  # the top-level folder
    return path.split("/", 1)[0] if "/" in path else ""


@dataclass(frozen=True)
class Drawing:
    path: str  # relative to svg/, no extension: "animals/mammals/deer_01"
    svg_sha: str
    title: str  # raw metadata text
    description: str
    keywords: tuple
    authors: tuple = ()  # dc:creator / dc:rights / dc:publisher agent names


def _local(tag) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def read_metadata(data: bytes) -> tuple[str, str, tuple, tuple]:
    """(title, description, keywords, author names) of the first titled cc:Work in an SVG's metadata; raises
    ValueError if the XML does not parse."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.fromstring(data)
    except ET.ParseError as error:
        raise ValueError(str(error)) from None
    works = [element for element in root.iter() if _local(element.tag) == "Work"]
    works.sort(key=lambda work: not any(_local(child.tag) == "title" for child in work))
    fields = {}
    for child in works[0] if works else ():
        fields.setdefault(_local(child.tag), child)
    text = {name: "".join(fields[name].itertext()) if name in fields else "" for name in ("title", "description")}
    keywords = ()
    if "subject" in fields:
        items = [element for element in fields["subject"].iter() if _local(element.tag) == "li"]
        keywords = tuple(item.text or "" for item in items) or tuple((fields["subject"].text or "").split(","))
    authors = tuple("".join(element.itertext()) for role in ("creator", "rights", "publisher") if role in fields
                    for element in fields[role].iter() if _local(element.tag) == "title")
    return text["title"], text["description"], keywords, authors


def scan(root: Path, paths) -> tuple[list[Drawing], list[str]]:
    """The metadata of every drawing; and the paths whose SVG does not parse."""
    from tqdm import tqdm
    drawings, unreadable = [], []
    for path in tqdm(paths, desc="reading svg metadata"):
        data = (root / "svg" / f"{path}.svg").read_bytes()
        try:
            fields = read_metadata(data)
        except ValueError:
            unreadable.append(path)
            continue
        drawings.append(Drawing(path, hashlib.sha256(data).hexdigest(), *fields))
    return drawings, unreadable


# ---------------------------------------------------------------------------------------------- cleaning
def fix_text(text, counts: Counter = None) -> str:
    """One line of readable text: entities/tags/mojibake fixed, hash tokens, e-mails and URLs removed (counted
    in `counts`), `_` and dashes as spaces, whitespace collapsed, separators trimmed from the ends."""
    counts = Counter() if counts is None else counts
    text = _C1.sub(lambda m: bytes([ord(m.group())]).decode("cp1252", errors="ignore"), html.unescape(text or ""))
    text = _TAG.sub(" ", unicodedata.normalize("NFC", text))
    for name, pattern in (("hash_tokens", _HASH), ("emails", _EMAIL), ("urls", _URL), ("noise_words", _NOISE)):
        text, found = pattern.subn(" ", text)
        counts[f"removed_{name}"] += found
    text = " ".join(_DASH.sub(" ", text).split())
    return text.strip(" ,;:|/")


def _key(text: str) -> str:
    """Comparison form: case-folded letters and digits only."""
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def clean_title(raw, counts: Counter = None) -> str:
    """The short caption, or "" when nothing readable is left."""
    counts = Counter() if counts is None else counts
    stripped = _AUTHOR_PREFIX.sub("", raw or "")
    counts["title_author_prefix_removed"] += stripped != (raw or "")
    title = fix_text(stripped, counts)
    return title if _LETTER.search(title) and title.casefold() not in PANDAS_NA else ""


def title_words_in_file_name(title: str, path: str) -> bool:
    """Whether every word of `title` (2+ characters, not a stopword) occurs in the file name of `path`."""
    words = [word for word in re.findall(r"[^\W_]+", title.casefold()) if len(word) > 1 and word not in STOPWORDS]
    stem = _key(path.rsplit("/", 1)[-1])
    return bool(words) and all(word in stem for word in words)


def boilerplate_titles(titles: dict, drawings) -> set:
    """Paths whose title is shared by SHARED_TITLE_MIN+ distinct SVG files and is not in their file name."""
    files = {}
    for drawing in drawings:
        files.setdefault(titles[drawing.path].casefold(), set()).add(drawing.svg_sha)
    return {drawing.path for drawing in drawings if titles[drawing.path]
            and len(files[titles[drawing.path].casefold()]) >= SHARED_TITLE_MIN
            and not title_words_in_file_name(titles[drawing.path], drawing.path)}


def clean_keywords(raw, title: str, counts: Counter = None, authors=()) -> list:
    """Keywords in metadata order without junk, generic tags, author names, repeats or the title itself."""
    counts = Counter() if counts is None else counts
    kept, seen, names = [], {_key(title)}, {_key(author) for author in authors} - {""}
    for keyword in raw:
        text = fix_text(keyword, counts)
        if not _LETTER.search(text):
            counts["keywords_dropped_junk"] += 1
        elif text.casefold() in GENERIC_KEYWORDS:
            counts["keywords_dropped_generic"] += 1
        elif _key(text) in names:
            counts["keywords_dropped_author"] += 1
        elif _key(text) in seen:
            counts["keywords_dropped_repeat"] += 1
        else:
            seen.add(_key(text))
            kept.append(text)
    return kept


def clean_descriptions(drawings, titles: dict, counts: Counter) -> dict:
    """path -> description, "" where it is junk, repeats the title, or is shared by different titles."""
    cleaned = {d.path: fix_text(d.description, counts) for d in drawings}
    titles_of = {}
    for drawing in drawings:
        titles_of.setdefault(_key(cleaned[drawing.path]), set()).add(_key(titles[drawing.path]))
    for drawing in drawings:
        text, title = cleaned[drawing.path], _key(titles[drawing.path])
        if not text:
            continue
        if not _LETTER.search(text):
            reason = "descriptions_dropped_junk"
        elif _key(text) in title:
            reason = "descriptions_dropped_same_as_title"
        elif _key(text) in {_key(author) for author in drawing.authors}:
            reason = "descriptions_dropped_author"
        elif len(titles_of[_key(text)]) >= SHARED_DESCRIPTION_MIN:
            reason = "descriptions_dropped_shared"
        else:
            continue
        counts[reason] += 1
        cleaned[drawing.path] = ""
    return cleaned


def long_caption(title: str, description: str, keywords) -> str:
    """Title, description and keywords as one line: "Title. Description. kw, kw"."""
    parts = [part.rstrip(" .") for part in (title, description, ", ".join(keywords)) if part]
    return ". ".join(part for part in parts if part)


def caption_records(drawings, counts: Counter) -> dict:
    """path -> {short, long, reason}; reason is None for a usable drawing."""
    titles = {d.path: clean_title(d.title, counts) for d in drawings}
    boilerplate = boilerplate_titles(titles, drawings)
    descriptions = clean_descriptions(drawings, titles, counts)
    records = {}
    for drawing in drawings:
        title = titles[drawing.path]
        reason = "no title" if not title else "boilerplate title" if drawing.path in boilerplate else None
        keywords = clean_keywords(drawing.keywords, title, counts, drawing.authors)
        records[drawing.path] = {"short": title, "long": long_caption(title, descriptions[drawing.path], keywords),
                                 "reason": reason}
    return records


# ------------------------------------------------------------------------------------------------ images
def render(png_path: Path, size: int):
    """(image, None): the drawing composited on white, cropped to its ink plus MARGIN, fitted into a white
    size x size square with its aspect kept; or (None, reason) when it cannot be used."""
    from PIL import Image, ImageChops
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(png_path) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    return None, "png too large"
                rgba = opened.convert("RGBA")
    except FileNotFoundError:
        return None, "no png"
    except Image.DecompressionBombError:
        return None, "png too large"
    except (OSError, ValueError, SyntaxError):
        return None, "png unreadable"
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    box = ImageChops.difference(rgb, Image.new("RGB", rgb.size, "white")).getbbox()
    if box is None:
        return None, "blank image"
    ink = rgb.crop(box)
    scale = size * (1 - 2 * MARGIN) / max(ink.size)
    fitted = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))),
                        Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
    return canvas, None


# ------------------------------------------------------------------------------------------------- split
def _unit_hash(*parts) -> float:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def is_heldout(path: str, heldout_frac: float, seed: int = 0) -> bool:
    """Stable across runs, machines and --limit: a hash of the drawing's path against the fraction."""
    return _unit_hash("superclip-clipart-split", seed, path) < heldout_frac


def select(paths, limit, heldout_frac, seed=0) -> set:
    """The drawings a --limit N build keeps: N in stable-hash order, the held-out share kept (at least one)."""
    if limit is None or limit >= len(paths):
        return set(paths)
    order = sorted(paths, key=lambda path: _unit_hash("superclip-clipart-limit", seed, path))
    held = [path for path in order if is_heldout(path, heldout_frac, seed)]
    train = [path for path in order if not is_heldout(path, heldout_frac, seed)]
    n_held = min(len(held), max(1, round(limit * heldout_frac))) if limit > 1 and heldout_frac > 0 else 0
    return set(held[:n_held]) | set(train[:limit - n_held])


def image_key(path: str) -> str:
    return hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- build
def _deduplicate_svgs(drawings, captions: dict, records: dict, categories: dict) -> list:
    """Usable drawings with one per byte-identical SVG (the first path); the others are recorded as copies."""
    first = {}
    for drawing in drawings:  # sorted by path
        categories.setdefault(drawing.svg_sha, set()).add(_category(drawing.path))
        if captions[drawing.path]["reason"]:
            records[drawing.path].update(split="skipped", skip_reason=captions[drawing.path]["reason"])
        elif drawing.svg_sha in first:
            records[drawing.path].update(split="skipped", skip_reason="duplicate svg",
                                         duplicate_of=first[drawing.svg_sha].path)
        else:
            first[drawing.svg_sha] = drawing
    return list(first.values())


def _render_all(root, usable, records, categories, image_size) -> list:
    """[(drawing, png bytes, categories)] for each drawing that renders to an image no earlier one has."""
    from tqdm import tqdm
    seen, kept = {}, []
    for drawing in tqdm(usable, desc="rendering png"):
        image, reason = render(root / "png" / f"{drawing.path}.png", image_size)
        if image is None:
            records[drawing.path].update(split="skipped", skip_reason=reason)
            continue
        digest = hashlib.sha256(image.tobytes()).hexdigest()
        if digest in seen:  # the kept drawing takes this copy's categories too
            seen[digest][2].update(categories[drawing.svg_sha])
            records[drawing.path].update(split="skipped", skip_reason="duplicate image",
                                         duplicate_of=seen[digest][0].path)
            continue
        encoded = io.BytesIO()
        image.save(encoded, format="PNG")
        seen[digest] = (drawing, encoded.getvalue(), set(categories[drawing.svg_sha]))
        kept.append(seen[digest])
    return kept


def _write_split(staging: Path, out: Path, name: str, rows) -> dict:
    """PNG files in OUT/NAME/ and OUT/NAME.csv in open_clip's CSV layout (absolute paths, tab-separated)."""
    (staging / name).mkdir()
    table = io.StringIO()
    writer = csv.writer(table, delimiter="\t", lineterminator="\n")
    writer.writerow(["filepath", "title", "long"])
    for drawing, png, caption, _ in rows:
        file_name = f"{image_key(drawing.path)}.png"
        (staging / name / file_name).write_bytes(png)
        writer.writerow([str(out / name / file_name), caption["short"], caption["long"]])
    (staging / f"{name}.csv").write_text(table.getvalue(), encoding="utf-8")
    return {"num_samples": len(rows), "csv": str(out / f"{name}.csv"), "images": str(out / name)}


def _write_eval(staging: Path, out: Path, heldout, min_class_size: int, log) -> tuple[dict, Counter]:
    """The clip_benchmark sets from the held-out drawings: classification by category, retrieval by title."""
    labelled = [(png, min(cats)) for _, png, _, cats in heldout  # min: the only category
                if len(cats) == 1 and min(cats) not in EXCLUDED_CATEGORIES | {""}]
    sizes = Counter(category for _, category in labelled)
    classes = sorted(category for category, n in sizes.items() if n >= min_class_size)
    items = [(png, classes.index(category)) for png, category in labelled if category in classes]
    retrieval = {}  # one image per title: a repeated title would have several right answers
    for _, png, caption, _ in heldout:
        retrieval.setdefault(caption["short"].casefold(), (png, [caption["short"]]))
    counts = Counter(classification_skipped_category=len(heldout) - len(labelled), retrieval_skipped_same_title=
                     len(heldout) - len(retrieval), classification_skipped_small_class=len(labelled) - len(items))
    names, eval_info = [category.replace("_", " ") for category in classes], {}
    for dataset, task in EVAL_SETS.items():
        folder = staging / "eval" / dataset.split("/", 1)[1]
        if task == "zeroshot_retrieval" and retrieval:
            write_retrieval(folder, list(retrieval.values()), image_format="png")
            info = {"num_images": len(retrieval), "captions_per_image": 1}
        elif task == "zeroshot_classification" and len(classes) >= 2:
            write_classification(folder, items, names, CLASS_TEMPLATES, image_format="png")
            info = {"num_images": len(items), "num_classes": len(classes),
                    "class_counts": {name: sizes[category] for name, category in zip(names, classes)}}
        else:
            log(f"note: {dataset} would be empty or have one class in this build; not written")
            continue
        eval_info[dataset] = {"root": str(out / folder.relative_to(staging)), "task": task, **info}
    return eval_info, counts


def _collect(root, paths, settings) -> tuple[dict, list, list, Counter]:
    """Reads, cleans, de-duplicates, selects and renders: (records, train rows, held-out rows, counts)."""
    counts = Counter(drawings_found=len(paths))
    drawings, unreadable = scan(root, paths)
    captions = caption_records(drawings, counts)
    records = {d.path: {"path": d.path, "category": _category(d.path), "title_raw": d.title, **captions[d.path],
                        "split": None} for d in drawings}
    records.update({path: {"path": path, "split": "skipped", "skip_reason": "svg unreadable"} for path in unreadable})
    categories = {}
    usable = _deduplicate_svgs(drawings, captions, records, categories)
    keep = select([d.path for d in usable], settings["limit"], settings["heldout_frac"], settings["seed"])
    for drawing in usable:
        if drawing.path not in keep:
            records[drawing.path].update(split="skipped", skip_reason="not selected (--limit)")
    usable = [drawing for drawing in usable if drawing.path in keep]
    train, heldout = [], []
    for drawing, png, cats in _render_all(root, usable, records, categories, settings["image_size"]):
        held = is_heldout(drawing.path, settings["heldout_frac"], settings["seed"])
        records[drawing.path].update(split="heldout" if held else "train", categories=sorted(cats),
                                     image=f"{'heldout' if held else 'train'}/{image_key(drawing.path)}.png")
        (heldout if held else train).append((drawing, png, captions[drawing.path], cats))
    for record in records.values():
        record.pop("reason", None)
        if record["split"] == "skipped":
            counts["skipped_" + record["skip_reason"].split(" (")[0].replace(" ", "_")] += 1
    counts.update(rendered=len(train) + len(heldout), train=len(train), heldout=len(heldout))
    random.Random(settings["seed"]).shuffle(train)  # open_clip's CSV loader reshuffles with --seed
    return records, train, heldout, counts


def build(out, *, source=None, cache=None, image_size=64, heldout_frac=0.1, seed=0, limit=None, min_class_size=5,
          force=False, log=print) -> dict:
    """Builds (or finds up to date) the clip-art data set at `out`; returns its manifest."""
    out = Path(out).absolute()
    root = find_source(source, cache, log)
    paths, fingerprint = source_files(root)
    settings = {"image_size": image_size, "heldout_frac": heldout_frac, "seed": seed, "limit": limit,
                "min_class_size": min_class_size}
    versions = {"pillow": metadata.version("pillow"), "source_sha256": fingerprint}
    if cached := up_to_date_manifest(out, FORMAT_VERSION, settings, versions, force, log):
        return cached
    started = time.time()
    records, train, heldout, counts = _collect(root, paths, settings)
    with staging_dir(out) as staging:
        train_info = _write_split(staging, out, "train", train)
        train_info.update(train_data=train_info["csv"], dataset_type="csv", csv_img_key="filepath",
                          csv_caption_key="title", csv_long_caption_key="long", csv_separator="\t")
        val_info = _write_split(staging, out, "heldout", heldout)
        val_info["val_data"] = val_info["csv"]
        eval_info, eval_counts = _write_eval(staging, out, heldout, min_class_size, log)
        counts.update(eval_counts)
        (staging / "drawings.jsonl").write_text("".join(json.dumps(records[path], ensure_ascii=False) + "\n"
                                                        for path in sorted(records)), encoding="utf-8")
        manifest = {
            "format": FORMAT_VERSION, "settings": settings, "versions": versions,
            "source": {"root": str(root), "debian_version": debian_version(root), "packages": list(DEBIAN_PACKAGES)},
            "counts": dict(sorted(counts.items())),
            "rules": {"split": "held out when sha256('superclip-clipart-split:SEED:PATH')[:8] / 2**64 < "
                               "heldout_frac; PATH = the SVG path below svg/ without .svg",
                      "shared_title_min": SHARED_TITLE_MIN, "shared_description_min": SHARED_DESCRIPTION_MIN,
                      "generic_keywords": sorted(GENERIC_KEYWORDS), "max_pixels": MAX_PIXELS, "margin": MARGIN,
                      "excluded_categories": sorted(EXCLUDED_CATEGORIES)},
            "train": train_info, "val": val_info, "eval": eval_info,
            "caption_templates": list(CAPTION_TEMPLATES), "class_templates": list(CLASS_TEMPLATES),
            "license": "Open Clip Art Library drawings (Debian openclipart-svg/-png): public domain.",
            "build_seconds": round(time.time() - started, 1),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return manifest


def summary(manifest: dict, out: Path) -> str:
    """What the CLI prints: every skip and cleaning count, the classes, the clip_benchmark commands."""
    counts, evals = manifest["counts"], manifest["eval"]
    listed = {group: ", ".join(f"{k.removeprefix('skipped_')} {n}" for k, n in counts.items()
                               if n and k.startswith(prefixes)) or "none"
              for group, prefixes in (("skipped", ("skipped_",)), ("eval", ("classification_", "retrieval_")),
                                      ("cleaning", ("removed_", "keywords_", "descriptions_", "title_")))}
    lines = [f"{out}: {counts['drawings_found']} drawings found, {counts['rendered']} rendered ({counts['train']} "
             f"train / {counts['heldout']} held out); skipped: {listed['skipped']}",
             f"caption cleaning: {listed['cleaning']}", f"held-out drawings left out of eval sets: {listed['eval']}"]
    if "wds/clipart_category" in evals:
        lines.append("classes (held-out images): " + ", ".join(
            f"{name} {n}" for name, n in evals["wds/clipart_category"]["class_counts"].items()))
    for dataset, info in evals.items():
        task = " --task zeroshot_retrieval" if info["task"] == "zeroshot_retrieval" else ""
        lines.append(f"eval: clip_benchmark eval --dataset {dataset}{task} --dataset_root '{out}/eval/{{dataset}}' "
                     f"... ({info['num_images']} images)")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="superclip clipart-data",
        description="Build the Open Clip Art data set (short caption = title, long = title + description + "
                    "keywords): a training CSV for open_clip and held-out clip_benchmark sets.")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--source", help="folder with svg/ and png/ (or a dpkg -x root); default: the system's")
    parser.add_argument("--cache", help=f"folder apt-get download fills (default ~/.cache/{CACHE_NAME})")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--heldout-frac", type=float, default=0.1, help="share of drawings held out (0.1)")
    parser.add_argument("--seed", type=int, default=0, help="changes the split and the training row order")
    parser.add_argument("--limit", type=int, help="keep only N usable drawings (deterministic subset)")
    parser.add_argument("--min-class-size", type=int, default=5,
                        help="held-out drawings a category needs to be a zero-shot class (default 5)")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT is up to date")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.image_size < 8 or args.min_class_size < 1 \
            or not 0 <= args.heldout_frac < 1:
        print("error: --limit and --min-class-size must be >= 1, --image-size >= 8, --heldout-frac in [0, 1)",
              file=sys.stderr)
        return 2
    return build_command(lambda: build(args.out, source=args.source, cache=args.cache, image_size=args.image_size,
                                       heldout_frac=args.heldout_frac, seed=args.seed, limit=args.limit,
                                       min_class_size=args.min_class_size, force=args.force), args.out, summary)


if __name__ == "__main__":
    sys.exit(main())
