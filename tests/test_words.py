"""`superclip words`: word-image similarity ranking (paper A.4) on the tiny model and generated images."""
import csv
import re
import tarfile

import numpy as np
import pytest
import torch

from open_clip_superclip.tools import words as words_mod
from open_clip_superclip.tools.words import main, ranks_of, vocabulary_words
from trainer_utils import make_csv, make_wds

TINY = "SuperCLIP-ViT-Tiny"
WORDS = ["dog", "cat", "red", "blue", "newspaper", "statue", "man", "woman", "sky", "water", "boat", "tree"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two tiny checkpoints (a bare state dict and a trainer-style one), the same 24 images as folder and shards."""
    import open_clip
    root = tmp_path_factory.mktemp("words")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(TINY).state_dict(), root / "bare.pt")
    torch.manual_seed(1)
    state = {"module." + k: v for k, v in open_clip.create_model(TINY).state_dict().items()}
    torch.save({"state_dict": state, "epoch": 1}, root / "epoch_1.pt")
    make_csv(root / "images", n=24)
    shards = make_wds(root / "shards", n=24, shards=3)
    word_file = root / "words.txt"
    word_file.write_text("# a comment\n" + "\n".join(WORDS) + "\n\ndog\ncat\n")  # repeats are dropped
    return {"root": root, "bare": str(root / "bare.pt"), "trainer": str(root / "epoch_1.pt"),
            "folder": str(root / "images"), "shards": shards, "words": str(word_file)}


def run(argv):
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def common(data, out, images=None, workers=0):
    return ["--images", images or data["folder"], "--words", data["words"], "--csv", out / "r.csv",
            "--png", out / "r.png", "--workers", workers, "--no-progress", "--top", 4]


def test_two_models_ranking_is_complete_deterministic_and_written(data, tmp_path, capsys):
    models = ["--model", TINY, "--pretrained", data["bare"], "--model", TINY, "--pretrained", data["trainer"]]
    rows = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        assert run(models + common(data, out)) == 0
        rows.append(read_csv(out / "r.csv"))
        assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind
    assert rows[0] == rows[1]
    first = rows[0]
    assert sorted(r["word"] for r in first) == sorted(WORDS)
    for k in ("1", "2"):
        assert sorted(int(r[f"rank_{k}"]) for r in first) == list(range(1, len(WORDS) + 1))
        by_rank = sorted(first, key=lambda r: int(r[f"rank_{k}"]))
        scores = [float(r[f"score_{k}"]) for r in by_rank]
        assert scores == sorted(scores, reverse=True)
    assert all(int(r["rank_change"]) == int(r["rank_1"]) - int(r["rank_2"]) for r in first)
    assert [int(r["rank_1"]) for r in first] == list(range(1, len(WORDS) + 1))  # ordered by model 1
    assert any(int(r["rank_change"]) != 0 for r in first)  # the two models do disagree: the comparison shows
    report = capsys.readouterr().out
    assert "top 4:" in report and "middle 4:" in report and "bottom 4:" in report
    assert "rose most under model 2" in report and "fell most under model 2" in report
    assert "24 images" in report


def test_score_is_mean_cosine_and_shards_match_folder(data, tmp_path):
    import open_clip
    out_folder, out_shards = tmp_path / "folder", tmp_path / "shards"
    assert run(["--model", TINY, "--pretrained", data["bare"]] + common(data, out_folder)) == 0
    assert run(["--model", TINY, "--pretrained", data["bare"], "--batch-size", 5]
               + common(data, out_shards, images=data["shards"], workers=2)) == 0
    folder, shards = read_csv(out_folder / "r.csv"), read_csv(out_shards / "r.csv")
    assert [r["word"] for r in folder] == [r["word"] for r in shards]
    np.testing.assert_allclose([float(r["score_1"]) for r in folder], [float(r["score_1"]) for r in shards],
                               atol=2e-6)

    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=data["bare"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY)
    from PIL import Image
    paths = words_mod.resolve_images([data["folder"]]).files
    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True)
        text = model.encode_text(tokenizer([f"a photo of {w}" for w in ("dog", "statue")]), normalize=True)
    expected = (text @ images.T).mean(dim=1)
    got = {r["word"]: float(r["score_1"]) for r in folder}
    np.testing.assert_allclose([got["dog"], got["statue"]], expected.numpy(), atol=2e-6)


def test_max_images(data, tmp_path, capsys):
    argv = ["--model", TINY, "--pretrained", data["bare"], "--max-images", 5]
    assert run(argv + common(data, tmp_path, images=data["shards"])) == 0
    assert "5 images" in capsys.readouterr().out


def _whole_words_in_the_bpe_file():
    """Counted from open_clip's BPE merges file, not through the tokenizer: the 49408 ids are 256 byte symbols,
    the same 256 with "</w>" (word end), 49408 - 512 - 2 = 48894 merges (the file's lines after its header; each
    merge's token is its two parts joined) and SOT/EOT. Whole words: "a</w>".."z</w>" (26) and the merged
    tokens that are lowercase letters then "</w>"."""
    import gzip
    from open_clip.tokenizer import default_bpe
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merged = ["".join(line.split()) for line in lines[1:1 + 49408 - 2 * 256 - 2]]
    return 26 + sum(1 for token in merged if token.endswith("</w>") and re.fullmatch("[a-z]+", token[:-4]))


def test_vocabulary_whole_words():
    import open_clip
    tokenizer = open_clip.get_tokenizer(TINY)
    vocab = vocabulary_words(tokenizer)
    assert _whole_words_in_the_bpe_file() == 32875  # 26 single letters + 32849 merged words
    assert len(vocab) == len(set(vocab)) == 32875
    assert all(re.fullmatch("[a-z]+", w) and tokenizer.encoder[w + "</w>"] for w in vocab)
    assert {"dog", "newspaper", "statue"} <= set(vocab)
    ids = [tokenizer.encoder[w + "</w>"] for w in vocab]
    assert ids == sorted(ids)


def test_ranks_break_ties_by_word():
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    assert ranks_of(scores, ["pear", "fig", "apple", "kiwi"]).tolist() == [3, 1, 2, 4]


def _error(capsys):
    return capsys.readouterr().err


def test_bad_model_name(data, tmp_path, capsys):
    assert run(["--model", "No-Such-Model", "--pretrained", data["bare"]] + common(data, tmp_path)) == 2
    assert "unknown model 'No-Such-Model'" in _error(capsys)


def test_empty_word_list(data, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    argv = ["--model", TINY, "--pretrained", data["bare"]] + common(data, tmp_path)
    argv[argv.index("--words") + 1] = empty
    assert run(argv) == 2
    assert "holds no words" in _error(capsys)
    assert not (tmp_path / "r.csv").exists()


def test_empty_image_sets(data, tmp_path, capsys):
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("not an image")
    argv = ["--model", TINY, "--pretrained", data["bare"]]
    assert run(argv + common(data, tmp_path, images=tmp_path / "no_images")) == 2
    assert "folder holds no image files" in _error(capsys)
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    assert run(argv + common(data, tmp_path, images=tmp_path / "empty.tar")) == 2
    assert "the image set is empty" in _error(capsys)
    assert run(argv + common(data, tmp_path, images=tmp_path / "missing-{0..1}.tar")) == 2
    assert "neither an image folder nor a shard file" in _error(capsys)
    assert not (tmp_path / "r.csv").exists()


def test_sample_without_image(data, tmp_path, capsys):
    import webdataset as wds
    with wds.TarWriter(str(tmp_path / "text.tar")) as sink:
        sink.write({"__key__": "0001", "txt": "a caption only"})
    argv = ["--model", TINY, "--pretrained", data["bare"]]
    assert run(argv + common(data, tmp_path, images=tmp_path / "text.tar")) == 2
    assert "has no image member" in _error(capsys)


@pytest.mark.parametrize("extra,message", [
    (["--pretrained", "x.pt"], "--pretrained given twice for --model SuperCLIP-ViT-Tiny"),
    (["--model", TINY], "--model SuperCLIP-ViT-Tiny needs --pretrained"),
    (["--model", "local-dir:/x", "--pretrained", "x.pt"], "local-dir:/x brings its own weights"),
    (["--template", "a photo"], "must contain '{}'"),
    (["--max-images", 0], "--max-images must be >= 1"),
])
def test_bad_flags(data, tmp_path, capsys, extra, message):
    argv = ["--model", TINY, "--pretrained", data["bare"]] + common(data, tmp_path) + extra
    assert run(argv) == 2
    assert message in _error(capsys)


def test_missing_checkpoint(data, tmp_path, capsys):
    assert run(["--model", TINY, "--pretrained", tmp_path / "nope.pt"] + common(data, tmp_path)) == 2
    assert "neither a file nor a known tag" in _error(capsys)


def test_pretrained_before_model(data, tmp_path, capsys):
    assert run(["--pretrained", data["bare"], "--model", TINY] + common(data, tmp_path)) == 2
    assert "--pretrained must come after the --model" in _error(capsys)
