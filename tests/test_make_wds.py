"""make-wds writes clip_benchmark's local wds layout; checked with clip_benchmark's own loader, offline."""
import csv
import tarfile

import pytest
from PIL import Image

from open_clip_superclip.tools import make_wds

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def _load(root, task="zeroshot_classification"):
    from clip_benchmark.datasets.builder import build_dataset
    return build_dataset("wds/mine", root=str(root), split="test", transform=None, task=task)


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def folder(tmp_path):
    """Six 8x8 solid-colour images in png, jpg and bmp (bmp is not decodable by the loader: re-encoded)."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    labels = []
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        ext = ("png", "jpg", "bmp")[i % 3]
        rel = f"sub/{i}.{ext}" if i % 2 else f"{i}.{ext}"
        Image.new("RGB", (8, 8), rgb).save(images / rel)
        labels.append((rel, name))
    return images, labels


def _colour_of(image):
    pixel = image.convert("RGB").getpixel((4, 4))
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], pixel)))


def test_classification_roundtrip(tmp_path, folder, capsys):
    images, labels = folder
    _write_csv(tmp_path / "labels.csv", ["filepath", "label"], labels)
    out = tmp_path / "out"
    assert make_wds.main([str(images), str(tmp_path / "labels.csv"), str(out)]) == 0
    assert "6 images, 3 classes" in capsys.readouterr().out
    dataset = _load(out)
    assert dataset.classes == ["blue", "green", "red"]  # sorted distinct labels
    assert dataset.templates == list(make_wds.DEFAULT_TEMPLATES)
    samples = list(dataset)
    assert len(samples) == 6
    for image, label in samples:
        assert dataset.classes[label] == _colour_of(image)
    # the bmp files were re-encoded (to png: the loader cannot decode bmp), so every member is decodable
    with tarfile.open(out / "test" / "0.tar") as tar:
        extensions = {name.rsplit(".", 1)[1] for name in tar.getnames()}
    assert extensions == {"png", "cls"}
    assert not list(tmp_path.glob("out.tmp-*"))


def test_classnames_file_fixes_order_and_allows_indices(tmp_path, folder):
    images, labels = folder
    order = ["red", "green", "blue"]
    rows = [(path, str(order.index(name)) if i % 2 else name) for i, (path, name) in enumerate(labels)]
    rows = [(path, label) for path, label in rows if not path.endswith(".bmp")]
    _write_csv(tmp_path / "labels.csv", ["filepath", "label"], rows)
    (tmp_path / "classes.txt").write_text("\n".join(order) + "\n")
    (tmp_path / "templates.txt").write_text("a {c} square\n{c}\n")
    out = tmp_path / "out"
    assert make_wds.main([str(images), str(tmp_path / "labels.csv"), str(out), "--classnames",
                          str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt")]) == 0
    dataset = _load(out)
    assert dataset.classes == order and dataset.templates == ["a {c} square", "{c}"]
    samples = list(dataset)
    assert len(samples) == 4
    assert all(order[label] == _colour_of(image) for image, label in samples)
    # all files were jpg/png: copied as they are, extensions kept
    with tarfile.open(out / "test" / "0.tar") as tar:
        assert {name.rsplit(".", 1)[1] for name in tar.getnames()} == {"png", "jpg", "cls"}


def test_retrieval_with_several_captions(tmp_path, folder):
    images, labels = folder
    rows = []
    for path, name in labels:
        rows.append((path, f"a {name} square"))
        rows.append((path, f"the colour {name}\nplain {name}"))  # two captions in one cell
    _write_csv(tmp_path / "captions.csv", ["filepath", "caption"], rows)
    out = tmp_path / "out"
    assert make_wds.main([str(images), str(tmp_path / "captions.csv"), str(out), "--image-format", "webp"]) == 0
    assert (out / "dataset_type.txt").read_text().strip() == "retrieval"
    samples = list(_load(out, task="zeroshot_retrieval"))
    assert len(samples) == 6
    for image, captions in samples:
        name = _colour_of(image)
        assert captions == [f"a {name} square", f"the colour {name}", f"plain {name}"]


def test_api_accepts_pil_images_and_bytes(tmp_path):
    red = Image.new("RGB", (8, 8), COLOURS["red"])
    blue_png = make_wds.encode_image(Image.new("RGB", (8, 8), COLOURS["blue"]), "png")
    n = make_wds.write_classification(tmp_path / "cls", [(red, 1), (blue_png, 0)], ["blue", "red"], ["{c}"],
                                      image_format="png")
    assert n == 2
    samples = list(_load(tmp_path / "cls"))
    assert [(label, _colour_of(image)) for image, label in samples] == [(1, "red"), (0, "blue")]
    with pytest.raises(ValueError):
        make_wds.write_classification(tmp_path / "bad", [(red, 2)], ["blue", "red"], ["{c}"])
    with pytest.raises(ValueError):
        make_wds.write_classification(tmp_path / "bad", [(red, 0)], ["blue", "red"], ["no placeholder"])
    with pytest.raises(ValueError):
        make_wds.write_retrieval(tmp_path / "bad", [(red, ["two\nlines"])])


def test_cli_errors(tmp_path, folder, capsys):
    images, labels = folder
    _write_csv(tmp_path / "both.csv", ["filepath", "label", "caption"], [(p, n, n) for p, n in labels])
    assert make_wds.main([str(images), str(tmp_path / "both.csv"), str(tmp_path / "o1")]) == 2
    assert "exactly one of the columns" in capsys.readouterr().err
    _write_csv(tmp_path / "missing.csv", ["filepath", "label"], labels + [("nope.png", "red")])
    assert make_wds.main([str(images), str(tmp_path / "missing.csv"), str(tmp_path / "o2")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    _write_csv(tmp_path / "twice.csv", ["filepath", "label"], labels + [(labels[0][0], "green")])
    assert make_wds.main([str(images), str(tmp_path / "twice.csv"), str(tmp_path / "o3")]) == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    _write_csv(tmp_path / "ok.csv", ["filepath", "label"], labels)
    assert make_wds.main([str(images), str(tmp_path / "ok.csv"), str(busy)]) == 2
    assert (busy / "keep.txt").exists()
    assert make_wds.main([str(images), str(tmp_path / "ok.csv"), str(busy), "--force"]) == 0
    assert not (busy / "keep.txt").exists() and (busy / "classnames.txt").exists()
