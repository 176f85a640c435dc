"""clipart_data on a fake openclipart tree the test writes: cleaning, skips, split, CSV and eval layouts, caching.

No test needs the Debian packages: the tree has real-format RDF metadata and PNGs drawn with Pillow.
"""
import json
from collections import Counter
import random

import pytest
from PIL import Image

from open_clip_superclip.tools.demo import clipart_data as cd

from clipart_tree import ARGS, DRAWINGS, NICU, SKIPS, write_tree

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("openclipart")
    write_tree(root)
    return root


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("clipart") / "data"
    assert cd.main([str(out), "--source", str(source), *ARGS]) == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    records = {r["path"]: r for r in map(json.loads, (out / "drawings.jsonl").read_text(encoding="utf-8").splitlines())}
    return out, manifest, records


# --------------------------------------------------------------------------------------------------- units
@pytest.mark.parametrize("raw, expected", [
    ("big_dog-house", "big dog house"),
    ("Chodovian&#39;s Dog by Mikol\xe1\x9a Ale\x9a", "Chodovian's Dog by Mikoláš Aleš"),
    ("a HASH(0x85caca8) b hash(0x86a0bb0) 0x851ce54", "a b"),
    ("mail jean.victor.balin@gmail.com now", "mail now"),
    ("from  http://aiga.org, and www.example.com/x.", "from and"),
    ('<!-- Creative Commons --> <a href="x">Public</a> Domain', "Public Domain"),
    ("books aj.svg", "books aj"),
    ("  tab\there\nnewline ", "tab here newline"),
])
def test_fix_text(raw, expected):
    assert cd.fix_text(raw) == expected


def test_titles_and_boilerplate_rule():
    assert cd.clean_title("Clipart by Paul B. Joiner - United States - Texas") == "United States Texas"
    assert cd.clean_title(NICU) == "pear"
    for junk in ("", "  ", "NA", "null", "HASH(0x85caca8)", "someone@example.com", "12 34"):
        assert cd.clean_title(junk) == "", junk
    assert cd.title_words_in_file_name("Lightning", "signs_and_symbols/weather/lightning_jon_phillips_08")
    assert cd.title_words_in_file_name("Crawfish (B and W)", "food/crawfish1_bw_ganson")
    assert not cd.title_words_in_file_name("jigsaw red 10", "shapes/jigsaw/jigsaw_green_05")
    assert not cd.title_words_in_file_name("gramastar", "shapes/stars/star_73pt03step")
    counts = Counter()
    kept = cd.clean_keywords(["hash", "hash(0x86a0bb0)", "Pet", "pet", "big_dog", "", "Jane Doe", "Cat", "svg"],
                             "cat", counts, authors=("Jane Doe",))
    assert kept == ["Pet", "big dog"]
    assert counts["keywords_dropped_generic"] == 2 and counts["keywords_dropped_junk"] == 2
    assert counts["keywords_dropped_repeat"] == 2 and counts["keywords_dropped_author"] == 1
    assert cd.long_caption("Cat.", "A cat.", ["pet", "big dog"]) == "Cat. A cat. pet, big dog"
    assert cd.long_caption("Cat", "", []) == "Cat"


def test_split_rule_is_stable():
    paths = [f"cat/drawing_{i}" for i in range(400)]
    held = [p for p in paths if cd.is_heldout(p, 0.1, 0)]
    assert held == [p for p in paths if cd.is_heldout(p, 0.1, 0)]
    assert 20 < len(held) < 60
    assert held != [p for p in paths if cd.is_heldout(p, 0.1, 1)]
    chosen = cd.select(paths, 50, 0.1, 0)
    assert len(chosen) == 50 and sum(cd.is_heldout(p, 0.1, 0) for p in chosen) == 5
    assert chosen == cd.select(list(reversed(paths)), 50, 0.1, 0)


# ---------------------------------------------------------------------------------------------- built set
def test_counts_and_skip_reasons(built):
    _, manifest, records = built
    counts = manifest["counts"]
    assert counts["drawings_found"] == len(DRAWINGS) == len(records)
    assert {k[len("skipped_"):]: v for k, v in counts.items() if k.startswith("skipped_") and v} == SKIPS
    assert counts["rendered"] == counts["train"] + counts["heldout"] == len(DRAWINGS) - sum(SKIPS.values())
    assert records["food/fruit/pear"]["split"] != "skipped" and records["food/fruit/pear"]["short"] == "pear"
    assert records["food/fruit/lemon"]["skip_reason"] == "boilerplate title"
    assert records["computer/icons/a_icon"]["skip_reason"] == "boilerplate title"
    assert records["food/sugarbox_01"]["duplicate_of"] == "food/galette_01"
    assert records["signs_and_symbols/deer_01"]["duplicate_of"] == "animals/mammals/deer_01"
    assert records["animals/mammals/deer_01"]["categories"] == ["animals", "signs_and_symbols"]
    assert records["people/na"]["skip_reason"] == "no title"
    assert counts["removed_emails"] >= 1 and counts["removed_hash_tokens"] >= 2 and counts["removed_urls"] >= 1
    assert counts["descriptions_dropped_same_as_title"] == 1


def test_captions_cleaned(built):
    _, _, records = built
    assert records["animals/cat_01"]["short"] == "Cat"
    assert records["animals/cat_01"]["long"] == "Cat. Pet, big dog"
    assert records["people/skier_01"]["short"] == "Čerešňa à la crème"
    assert records["people/skier_01"]["long"] == "Čerešňa à la crème. Lyžař na svahu. people"
    assert records["people/tree-man"]["long"] == "tree. people"
    assert records["people/quoted"]["short"] == 'The "Big" Apple Pie'
    assert records["food/galette_01"]["long"] == "galette. See for the recipe. food"


def test_training_csv_readable_in_seeded_order(built):
    import pandas as pd
    from open_clip_train.data import CsvDataset
    out, manifest, records = built
    train = manifest["train"]
    table = pd.read_csv(train["train_data"], sep="\t")
    assert list(table.columns) == ["filepath", "title", "long"]
    dataset = CsvDataset(train["train_data"], None, "filepath", "title")
    expected = sorted((r for r in records.values() if r["split"] == "train"), key=lambda r: r["path"])
    random.Random(manifest["settings"]["seed"]).shuffle(expected)
    assert dataset.captions == [r["short"] for r in expected] and len(expected) == train["num_samples"]
    assert table["long"].tolist() == [r["long"] for r in expected]
    assert dataset.images == [str(out / r["image"]) for r in expected]
    for path in dataset.images:
        with Image.open(path) as image:
            assert image.size == (16, 16) and image.mode == "RGB"
    assert any("lion one" in r["path"] for r in records.values() if r["split"] != "skipped")
    held = pd.read_csv(manifest["val"]["val_data"], sep="\t")
    assert len(held) == manifest["counts"]["heldout"] >= 2 and list(held.columns) == list(table.columns)


def test_rendering_composites_on_white_and_fits_the_ink(source):
    image, reason = cd.render(source / "png" / "animals" / "mammals" / "deer_01.png", 32)
    assert reason is None and image.size == (32, 32) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    box = image.convert("L").point(lambda v: 255 if v < 250 else 0).getbbox()
    assert box[2] - box[0] >= 28 or box[3] - box[1] >= 28  # the ink fills the side, a small margin apart
    assert cd.render(source / "png" / "people" / "ghost.png", 32) == (None, "blank image")
    assert cd.render(source / "png" / "nothing.png", 32) == (None, "no png")


def _load(info, name):
    from clip_benchmark.datasets.builder import build_dataset
    return build_dataset(name, root=info["root"], split="test", transform=None, task=info["task"])


def test_eval_sets_readable_by_clip_benchmark(built):
    out, manifest, records = built
    held = {}
    for record in records.values():
        if record["split"] == "heldout":
            with Image.open(out / record["image"]) as image:
                held[image.convert("RGB").tobytes()] = record
    assert set(manifest["eval"]) == set(cd.EVAL_SETS)
    category = manifest["eval"]["wds/clipart_category"]
    root = out / "eval" / "clipart_category"
    for name in ("classnames.txt", "zeroshot_classification_templates.txt", "test/nshards.txt", "test/0.tar"):
        assert (root / name).is_file(), name
    dataset = _load(category, "wds/clipart_category")
    assert dataset.templates == list(cd.CLASS_TEMPLATES) and all("_" not in c for c in dataset.classes)
    samples = list(dataset)
    assert len(samples) == category["num_images"] == sum(category["class_counts"].values())
    for image, label in samples:
        record = held[image.convert("RGB").tobytes()]
        assert record["categories"] == [record["category"]]
        assert dataset.classes[label] == record["category"].replace("_", " ")
    retrieval = manifest["eval"]["wds/clipart_retrieval"]
    assert (out / "eval" / "clipart_retrieval" / "dataset_type.txt").read_text().strip() == "retrieval"
    pairs = list(_load(retrieval, "wds/clipart_retrieval"))
    assert len(pairs) == retrieval["num_images"] and retrieval["captions_per_image"] == 1
    for image, captions in pairs:
        assert captions == [held[image.convert("RGB").tobytes()]["short"]]
    assert manifest["caption_templates"] == ["{c}"]


def test_cache_reuse_then_rebuild_on_changed_settings(built, source, capsys):
    out, manifest, _ = built
    before = (out / "manifest.json").stat().st_mtime_ns
    assert cd.main([str(out), "--source", str(source), *ARGS]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == before
    train_csv = (out / "train.csv").read_text(encoding="utf-8")
    assert cd.main([str(out), "--source", str(source), *ARGS, "--seed", "1"]) == 0
    assert "rebuilding" in capsys.readouterr().out
    rebuilt = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert rebuilt["settings"]["seed"] == 1 and rebuilt["counts"]["rendered"] == manifest["counts"]["rendered"]
    assert cd.main([str(out), "--source", str(source), *ARGS]) == 0  # back to seed 0: the very same files
    assert (out / "train.csv").read_text(encoding="utf-8") == train_csv
    assert not list(out.parent.glob("data.tmp-*")) and not list(out.parent.glob("data.old-*"))


def test_limit_keeps_n_usable_drawings_with_a_held_out_one(source):
    paths, _ = cd.source_files(source)
    settings = {"image_size": 16, "heldout_frac": 0.2, "seed": 0, "limit": 4, "min_class_size": 1}
    records, train, heldout, counts = cd._collect(source, paths, settings)
    failed = sum(counts[f"skipped_{k}"] for k in ("png_unreadable", "no_png", "blank_image", "duplicate_image"))
    assert len(train) + len(heldout) + failed == 4 and len(heldout) >= 1
    usable = len(DRAWINGS) - SKIPS["boilerplate_title"] - SKIPS["no_title"] - SKIPS["duplicate_svg"]
    assert counts["skipped_not_selected"] == usable - 4
    assert counts["skipped_boilerplate_title"] == SKIPS["boilerplate_title"]  # judged on the whole tree


def test_source_errors(tmp_path, monkeypatch, capsys):
    assert cd.main([str(tmp_path / "out"), "--source", str(tmp_path)]) == 2
    assert "no svg/ and png/" in capsys.readouterr().err
    monkeypatch.setattr(cd, "SYSTEM_SOURCE", tmp_path / "absent")
    monkeypatch.setattr(cd.shutil, "which", lambda tool: None)
    assert cd.main([str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "apt-get" in err and "openclipart-svg" in err and "--source" in err
    assert not (tmp_path / "out").exists()
