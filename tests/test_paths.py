"""Paths as users give them (issue 16), for every command and flag that takes one.

Data and outputs live under a dot-folder with a space and non-ASCII letters (`ROOT/.cache/ex pé rience`, as under
~/.cache), and each command gets them absolute, relative (from ROOT), through a symlinked folder
(`ROOT/lien vers -> ROOT/.cache/ex pé rience`) and as `file://` URLs. Each case works (outputs exist and are right)
or fails with a clear error: the command exits non-zero, the message names the path as it was given, and there is
no traceback. Existing outputs follow each command's rule: `--force` for the folder writers and convert-official,
an atomic replace for the file writers. The demo's folders are tested with the demo.
"""
import csv
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from open_clip_superclip.tools.cli import main as superclip

from conftest import TINY
from trainer_utils import base_args, captions, make_csv, make_wds

CASES = ["absolute", "relative", "symlink", "file_url"]
N = 8  # images and captions in each generated set; the CSV and the shards hold the same captions
RESUMED_CAPTIONS = 1000.0  # the IDF caption count stored in the test weights
# our key prefixes -> the official hustvl/SuperCLIP ones (the vision tower and logit_scale keep their names)
OFFICIAL_KEYS = (("token_embedding.", "text.token_embedding."), ("positional_embedding", "text.positional_embedding"),
                 ("transformer.", "text.transformer."), ("ln_final.", "text.ln_final."),
                 ("text_projection", "text.text_projection"), ("class_head.norm.", "text_decoder.ln_mlp."),
                 ("class_head.proj.", "text_decoder.text_projection."), ("class_idf.doc_freq", "cap_fq"),
                 ("class_idf.num_captions", "num_samples"))


class Home:
    """ROOT (the working directory of every test), the hard folder under it, and a symlink to that folder."""

    def __init__(self, root: Path):
        self.root = root
        self.base = root / ".cache" / "ex pé rience"
        self.link = root / "lien vers"

    def spell(self, path: Path, case: str) -> str:
        """`path` (under base) as a user would type it in `case`; relative spellings start at ROOT."""
        if case == "relative":
            return os.path.relpath(path, self.root)
        if case == "symlink":
            return str(self.link / path.relative_to(self.base))
        if case == "file_url":
            return "file://" + str(path)
        return str(path)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Images + a tab-separated CSV, the same samples as two webdataset shards, a word list, and one tiny model
    saved as a trainer checkpoint in a run folder (with params.txt), as a bare state dict and in the official
    hustvl/SuperCLIP key layout."""
    home = Home(tmp_path_factory.mktemp("paths"))
    base = home.base
    make_csv(base / "images et csv", n=N)
    make_wds(base / "shards é", n=N, shards=2)
    home.link.symlink_to(base, target_is_directory=True)
    (base / "mots.txt").write_text("dog\ncat\nrouge é\n", encoding="utf-8")

    torch.manual_seed(0)
    model = open_clip.create_model(TINY)
    model.class_idf.num_captions.fill_(RESUMED_CAPTIONS)
    state = model.state_dict()
    run = base / "runs" / "lr=1 é"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.txt").write_text(f"model: {TINY}\nsuperclip: True\n", encoding="utf-8")
    torch.save({"epoch": 1, "name": "lr=1 é", "state_dict": state}, run / "checkpoints" / "epoch_1.pt")
    torch.save(state, base / "bare weights.pt")
    official = {}
    for key, value in state.items():
        renamed = next((theirs + key[len(ours):] for ours, theirs in OFFICIAL_KEYS if key.startswith(ours)), key)
        official[renamed] = value.reshape(1, -1) if renamed in ("cap_fq", "num_samples") else value
    torch.save(official, base / "officiel é.pt")
    home.state = state
    return home


@pytest.fixture
def at_root(home, monkeypatch):
    monkeypatch.chdir(home.root)
    return home


def run(argv, capsys):
    """`superclip ARGV` in this process: (exit code, stdout, stderr); argparse errors count as exit codes."""
    try:
        code = superclip([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_clear_error(code, err, *paths, expected_code=None):
    """Non-zero exit, every path named as it was given, no traceback."""
    assert code != 0 if expected_code is None else code == expected_code, (code, err)
    assert "Traceback" not in err, err
    for path in paths:
        assert str(path) in err, (path, err)


def naive_doc_freq():
    """Document frequencies of the generated captions, counted caption by caption with open_clip's tokenizer."""
    from open_clip.tokenizer import SimpleTokenizer
    tokenizer = SimpleTokenizer()
    df = np.zeros(len(tokenizer.encoder), dtype=np.int64)
    for caption in captions(N, seed=0):
        for token in set(tokenizer.encode(caption)):
            df[token] += 1
    return df


# ------------------------------------------------------------------------------------------ superclip idf
def idf_inputs(home, case):
    shards, table = home.base / "shards é", home.base / "images et csv" / "train.csv"
    if case == "symlink":  # a folder stands for its shards
        return [home.spell(shards, case), home.spell(table, case)]
    return [home.spell(shards / "{000000..000001}.tar", case), home.spell(table, case)]


@pytest.mark.parametrize("case", CASES)
def test_idf(at_root, case, capsys):
    home = at_root
    output = home.base / "idf" / f"{case} counts.npz"
    code, out, err = run(["idf", *idf_inputs(home, case), "-o", home.spell(output, case), "--csv-separator", "\t",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert f"wrote {output if case == 'file_url' else home.spell(output, case)}" in out
    with np.load(output) as counts:
        assert int(counts["num_captions"]) == 2 * N  # the shards and the CSV
        np.testing.assert_array_equal(counts["doc_freq"], 2 * naive_doc_freq())
    if case == "file_url":  # file://FOLDER stands for the folder's shards, as the folder's path does
        folder_output = home.base / "idf" / "file folder.npz"
        code, _, err = run(["idf", home.spell(home.base / "shards é", case), "-o", folder_output, "--no-progress"],
                           capsys)
        assert code == 0, err
        with np.load(folder_output) as counts:
            assert int(counts["num_captions"]) == N


@pytest.mark.parametrize("missing", ["shard pattern", "csv", "folder"])
def test_idf_missing_input(at_root, missing, capsys):
    home = at_root
    absent = {"shard pattern": home.base / "absent é" / "{000000..000001}.tar",
              "csv": home.base / "absent é.csv", "folder": home.base / "absent é"}[missing]
    named = str(absent).replace("{000000..000001}", "000000")
    output = home.base / "idf" / f"absent {missing}.npz"
    code, _, err = run(["idf", str(absent), "-o", output, "--no-progress"], capsys)
    assert_clear_error(code, err, named, output, expected_code=1)
    assert "was NOT written" in err and not output.exists()


def test_idf_existing_outputs(at_root, capsys):
    """-o replaces an existing file atomically; a folder at -o, or a URL it cannot write, is an error naming it."""
    home = at_root
    shards = str(home.base / "shards é" / "{000000..000001}.tar")
    existing = home.base / "idf" / "existing.npz"
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_bytes(b"an older file")
    code, _, err = run(["idf", shards, "-o", existing, "--no-progress"], capsys)
    assert code == 0, err
    with np.load(existing) as counts:
        assert int(counts["num_captions"]) == N

    folder = home.base / "idf" / "a folder"
    folder.mkdir()
    code, _, err = run(["idf", shards, "-o", folder, "--no-progress"], capsys)
    assert_clear_error(code, err, folder, expected_code=1)
    assert folder.is_dir() and not any(folder.iterdir())

    code, _, err = run(["idf", shards, "-o", "s3://bucket/counts.npz", "--no-progress"], capsys)
    assert_clear_error(code, err, "s3://bucket/counts.npz", expected_code=2)
    assert not (home.root / "s3:").exists()  # was: written to ./s3:/bucket/counts.npz


# -------------------------------------------------------------------------------------- superclip cooccur
@pytest.mark.parametrize("case", CASES)
def test_cooccur(at_root, case, capsys):
    home = at_root
    md, table = home.base / "cooccur" / f"{case} table.md", home.base / "cooccur" / f"{case} table.csv"
    code, out, err = run(["cooccur", *idf_inputs(home, case), "-g", "dog", "--csv-separator", "\t", "--no-progress",
                          "--quiet", "--md", home.spell(md, case), "--csv", home.spell(table, case)], capsys)
    assert code == 0, err
    (row,) = list(csv.DictReader(table.open(encoding="utf-8")))
    with_dog = sum("dog" in caption.split() for caption in captions(N, seed=0))
    assert (row["keywords"], int(row["total_captions"]), int(row["captions_with_keywords"])) == \
        ("dog", 2 * N, 2 * with_dog)
    assert "dog" in md.read_text(encoding="utf-8")


def test_cooccur_missing_input_and_outputs(at_root, capsys):
    home = at_root
    shards = str(home.base / "shards é" / "{000000..000001}.tar")
    absent = home.base / "absent é.tar"
    code, _, err = run(["cooccur", str(absent), "-g", "dog", "--no-progress", "--quiet"], capsys)
    assert_clear_error(code, err, absent, expected_code=1)

    existing = home.base / "cooccur" / "existing.csv"
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_text("an older table\n")
    code, _, err = run(["cooccur", shards, "-g", "dog", "--no-progress", "--quiet", "--csv", existing], capsys)
    assert code == 0, err
    assert existing.read_text().startswith("keywords,")

    folder = home.base / "cooccur" / "a folder"
    folder.mkdir()
    code, _, err = run(["cooccur", shards, "-g", "dog", "--no-progress", "--quiet", "--md", folder], capsys)
    assert_clear_error(code, err, folder, expected_code=1)
    code, _, err = run(["cooccur", shards, "-g", "dog", "--no-progress", "--quiet", "--csv", "gs://b/t.csv"], capsys)
    assert_clear_error(code, err, "gs://b/t.csv", expected_code=2)
    assert not (home.root / "gs:").exists()


# --------------------------------------------------------------------------------------- superclip export
def checkpoint_path(home):
    return home.base / "runs" / "lr=1 é" / "checkpoints" / "epoch_1.pt"


def assert_exported(home, folder: Path):
    from safetensors.torch import load_file
    config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    assert "superclip_cfg" not in config["model_cfg"]
    weights = load_file(folder / "open_clip_model.safetensors")
    assert not any(k.startswith(("class_head.", "class_idf.")) for k in weights)
    assert set(weights) == {k for k in home.state if not k.startswith(("class_head.", "class_idf."))}
    assert torch.equal(weights["visual.conv1.weight"], home.state["visual.conv1.weight"])


@pytest.mark.parametrize("case", CASES)
def test_export(at_root, case, capsys):
    home = at_root
    out_dir = home.base / "export" / case
    given = home.spell(checkpoint_path(home), case)
    code, out, err = run(["export", given, home.spell(out_dir, case)], capsys)
    if case == "file_url":  # export reads local files only: the error names the URL as given
        assert_clear_error(code, err, given, expected_code=2)
        assert "no such file" in err and not out_dir.exists()
        return
    assert code == 0, err
    assert_exported(home, out_dir)


def test_export_missing_checkpoint(at_root, capsys):
    home = at_root
    for absent in (home.base / "runs" / "lr=1 é" / "checkpoints" / "epoch_9.pt", home.base / "absent é.pt"):
        code, _, err = run(["export", absent, home.base / "export" / "never"], capsys)
        assert_clear_error(code, err, absent, expected_code=2)
        assert "no such file" in err  # was, outside a run folder: "pass --model NAME", which then failed anyway
    assert not (home.base / "export" / "never").exists()


def test_export_existing_outputs(at_root, capsys):
    """A non-empty folder needs --force; through a symlink the link's target is replaced, not the link; a file at
    OUT_DIR is never replaced by a folder."""
    home = at_root
    target = home.base / "export" / "target é"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old")
    link = home.base / "export" / "link to target"
    link.symlink_to(target, target_is_directory=True)
    code, _, err = run(["export", checkpoint_path(home), link], capsys)
    assert_clear_error(code, err, link, expected_code=2)
    assert "--force" in err and (target / "stale.txt").exists()

    code, _, err = run(["export", checkpoint_path(home), link, "--force"], capsys)
    assert code == 0, err
    assert link.is_symlink() and not (target / "stale.txt").exists()  # was: the link replaced by a new folder
    assert_exported(home, target)

    a_file = home.base / "export" / "a file"
    a_file.write_text("keep me")
    for force in ([], ["--force"]):
        code, _, err = run(["export", checkpoint_path(home), a_file, *force], capsys)
        assert_clear_error(code, err, a_file, expected_code=2)
        assert a_file.read_text() == "keep me"  # was: silently replaced by the exported folder


# ----------------------------------------------------------------------------- superclip convert-official
def assert_converted(home, path: Path):
    converted = torch.load(path, weights_only=True)
    assert set(converted) == set(home.state)
    assert torch.equal(converted["class_head.proj.weight"], home.state["class_head.proj.weight"])
    assert float(converted["class_idf.num_captions"]) == RESUMED_CAPTIONS


CONVERT_FLAGS = ["--model", TINY, "--global-batch-size", "1", "--keep-token-0-count"]


@pytest.mark.parametrize("case", CASES)
def test_convert_official(at_root, case, capsys):
    home = at_root
    out = home.base / "converted" / f"{case} ours.pt"
    given = home.spell(home.base / "officiel é.pt", case)
    code, _, err = run(["convert-official", given, home.spell(out, case), *CONVERT_FLAGS], capsys)
    if case == "file_url":  # read with torch.load from local paths only: the error names the URL as given
        assert_clear_error(code, err, given, expected_code=2)  # was: "file:/..." (one slash lost)
        assert not out.exists()
        return
    assert code == 0, err
    assert_converted(home, out)


def test_convert_official_missing_input_and_existing_outputs(at_root, capsys):
    home = at_root
    official, out = home.base / "officiel é.pt", home.base / "converted" / "existing.pt"
    absent = home.base / "absent é.pt"
    code, _, err = run(["convert-official", absent, out, *CONVERT_FLAGS], capsys)
    assert_clear_error(code, err, absent, expected_code=2)
    code, _, err = run(["convert-official", home.base / "runs", out, *CONVERT_FLAGS], capsys)
    assert_clear_error(code, err, home.base / "runs", expected_code=2)  # a folder is not a checkpoint
    assert not out.exists()

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"an older file")
    code, _, err = run(["convert-official", official, out, *CONVERT_FLAGS], capsys)
    assert_clear_error(code, err, out, expected_code=2)
    assert "--force" in err and out.read_bytes() == b"an older file"
    code, _, err = run(["convert-official", official, out, *CONVERT_FLAGS, "--force"], capsys)
    assert code == 0, err
    assert_converted(home, out)

    folder = home.base / "converted" / "a folder"
    folder.mkdir()
    code, _, err = run(["convert-official", official, folder, *CONVERT_FLAGS, "--force"], capsys)
    assert_clear_error(code, err, folder, expected_code=2)  # was: IsADirectoryError traceback after converting
    assert folder.is_dir()


# ------------------------------------------------------------------------------------- superclip make-wds
def label_table(home) -> Path:
    table = home.base / "étiquettes.csv"
    if not table.exists():
        table.write_text("filepath,label\n" + "".join(f"{i}.png,{'chat' if i % 2 else 'chien é'}\n"
                                                      for i in range(N)), encoding="utf-8")
    return table


def assert_wds_folder(out: Path, stdout: str, classnames=("chat", "chien é"), templates=None):
    assert (out / "classnames.txt").read_text(encoding="utf-8").splitlines() == list(classnames)
    if templates is not None:
        assert (out / "zeroshot_classification_templates.txt").read_text(encoding="utf-8").splitlines() == templates
    assert (out / "test" / "nshards.txt").read_text().strip() == "1"
    with tarfile.open(out / "test" / "0.tar") as tar:
        assert sum(name.endswith(".png") for name in tar.getnames()) == N
    hint = next(line for line in stdout.splitlines() if line.startswith("evaluate: "))
    words = shlex.split(hint[len("evaluate: "):])  # the hint is a command that pastes into a shell as it is
    assert Path(words[words.index("--dataset_root") + 1]).resolve() == out.resolve()


@pytest.mark.parametrize("case", CASES)
def test_make_wds(at_root, case, capsys):
    home = at_root
    images, out = home.base / "images et csv", home.base / "wds" / f"{case} cls"
    classnames, templates = home.base / "classes é.txt", home.base / "modèles.txt"
    classnames.write_text("chien é\nchat\n", encoding="utf-8")  # fixes the class order
    templates.write_text("une photo de {c}.\n", encoding="utf-8")
    local = "absolute" if case == "file_url" else case
    given = home.spell(images, case)
    code, stdout, err = run(["make-wds", given, home.spell(label_table(home), local), home.spell(out, case),
                             "--classnames", home.spell(classnames, local), "--templates",
                             home.spell(templates, local)], capsys)
    if case == "file_url":  # images are read from a local folder only: the error names the URL as given
        assert_clear_error(code, err, given, expected_code=2)  # was: "file:/..." (one slash lost)
        assert not out.exists()
        return
    assert code == 0, err
    assert_wds_folder(out, stdout, classnames=["chien é", "chat"], templates=["une photo de {c}."])


@pytest.mark.parametrize("missing", ["images", "csv", "--classnames", "--templates"])
def test_make_wds_missing_input(at_root, missing, capsys):
    home = at_root
    absent = home.base / f"absent {missing.strip('-')} é"
    argv = {"images": [absent, label_table(home)], "csv": [home.base / "images et csv", absent]}.get(
        missing, [home.base / "images et csv", label_table(home)])
    extra = [missing, absent] if missing.startswith("--") else []
    out = home.base / "wds" / f"never {missing}"
    code, _, err = run(["make-wds", *argv, out, *extra], capsys)
    assert_clear_error(code, err, absent, expected_code=2)  # was, for csv / --classnames / --templates: a traceback
    assert not out.exists()


def test_make_wds_existing_outputs(at_root, capsys):
    home = at_root
    images, table = home.base / "images et csv", label_table(home)
    target = home.base / "wds" / "target é"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old")
    link = home.base / "wds" / "link to target"
    link.symlink_to(target, target_is_directory=True)
    code, _, err = run(["make-wds", images, table, link], capsys)
    assert_clear_error(code, err, link, expected_code=2)
    assert "--force" in err and (target / "stale.txt").exists()
    code, stdout, err = run(["make-wds", images, table, link, "--force"], capsys)
    assert code == 0, err
    assert link.is_symlink() and not (target / "stale.txt").exists()  # was: the link replaced by a new folder
    assert_wds_folder(target, stdout)

    a_file = home.base / "wds" / "a file"
    a_file.write_text("keep me")
    for force in ([], ["--force"]):
        code, _, err = run(["make-wds", images, table, a_file, *force], capsys)
        assert_clear_error(code, err, a_file, expected_code=2)
        assert a_file.read_text() == "keep me"  # was: silently replaced by the dataset folder


# ---------------------------------------------------------------------------------------- superclip words
def words_argv(home, case, out: Path):
    images = [home.spell(home.base / "images et csv", case),
              home.spell(home.base / "shards é" / "{000000..000001}.tar", case)]
    local = "absolute" if case == "file_url" else case  # --words and --pretrained are local files
    return ["words", "--model", TINY, "--pretrained", home.spell(checkpoint_path(home), local),
            "--images", *images, "--words", home.spell(home.base / "mots.txt", local),
            "--csv", home.spell(out / "ranking.csv", case), "--png", home.spell(out / "ranking.png", case),
            "--workers", "0", "--device", "cpu", "--no-progress", "--top", "3"]


@pytest.mark.parametrize("case", CASES)
def test_words(at_root, case, capsys):
    home = at_root
    out = home.base / "words" / case
    out.mkdir(parents=True)
    (out / "ranking.csv").write_text("an older ranking\n")  # replaced: the outputs have no --force rule
    code, stdout, err = run(words_argv(home, case, out), capsys)
    assert code == 0, err
    assert f"scored by mean cosine similarity to {2 * N} images" in stdout  # the folder's and the shards'
    rows = list(csv.DictReader((out / "ranking.csv").open(encoding="utf-8")))
    assert sorted(r["word"] for r in rows) == ["cat", "dog", "rouge é"]
    assert sorted(int(r["rank_1"]) for r in rows) == [1, 2, 3]
    assert (out / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("missing", ["--images folder", "--images file:// shard", "--words", "--pretrained"])
def test_words_missing_input(at_root, missing, capsys):
    home = at_root
    out = home.base / "words" / "never"
    argv = words_argv(home, "absolute", out)
    absent = str(home.base / ("absent é.tar" if "shard" in missing else "absent é"))
    if missing.startswith("--images"):
        absent = "file://" + absent if "file://" in missing else absent
        start = argv.index("--images") + 1
        argv[start:start + 2] = [absent]
    else:
        argv[argv.index(missing) + 1] = absent
    code, _, err = run(argv, capsys)
    assert_clear_error(code, err, absent, expected_code=2)  # was, for a file:// shard: a traceback
    assert not out.exists()


def test_words_outputs_are_checked_before_the_model_runs(at_root, capsys):
    home = at_root
    folder = home.base / "words" / "a folder"
    folder.mkdir(parents=True)
    argv = words_argv(home, "absolute", home.base / "words" / "unused")
    for flag, bad in (("--csv", str(folder)), ("--png", "s3://bucket/ranking.png")):
        given = list(argv)
        given[given.index(flag) + 1] = bad
        code, stdout, err = run(given, capsys)
        assert_clear_error(code, err, bad, expected_code=2)  # was: a traceback once the ranking was computed
        assert "scored by" not in stdout
    assert not (home.root / "s3:").exists()


# ------------------------------------------------------------------------------------ superclip benchmark
def test_benchmark(at_root, capsys):
    """One run over every hard property: the suite given relative through the symlink, a dataset root and a
    checkpoint relative to the suite's folder (the checkpoint's run folder holds '=' and 'é'), a missing dataset
    and a missing --checkpoint that fail as rows naming their paths, and an existing --out with stale results."""
    home = at_root
    code, _, err = run(["make-wds", home.base / "images et csv", label_table(home), home.base / "bench" / "cls é"],
                       capsys)
    assert code == 0, err
    suite = home.base / "bench" / "suite é.yaml"
    suite.write_text("datasets:\n  - root: cls é\n  - root: absent é\n    name: gone\n"
                     "models:\n  - pretrained: ../runs/lr=1 é/checkpoints/epoch_1.pt\n    label: tiny é\n",
                     encoding="utf-8")
    out = home.base / "bench" / "résultats 1"
    (out / "runs").mkdir(parents=True)
    (out / "results.csv").write_text("stale\n")
    absent_checkpoint = home.spell(home.base / "runs" / "absent é.pt", "symlink")
    code, _, err = run(["benchmark", home.spell(suite, "symlink"), "--out", home.spell(out, "relative"),
                        "--checkpoint", f"gone={absent_checkpoint}", "--model", TINY, "--num-workers", "0",
                        "--batch-size", "8"], capsys)
    assert code == 1, err  # the missing dataset and checkpoint fail; the rest runs
    assert "Traceback" not in err
    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    ok = {r["metric"]: float(r["value"]) for r in rows if r["status"] == "ok"}
    assert {r["model"] for r in rows if r["status"] == "ok"} == {"tiny é"}
    assert {r["dataset"] for r in rows if r["status"] == "ok"} == {"cls é"}
    assert 0.0 <= ok["acc1"] <= 1.0 and 0.0 <= ok["mean_per_class_recall"] <= 1.0
    ran = next(r for r in rows if r["status"] == "ok")
    assert ran["architecture"] == TINY  # from the run's params.txt
    assert os.path.samefile(ran["pretrained"], checkpoint_path(home))
    failed = {(r["model"], r["dataset"]): r["error"] for r in rows if r["status"] == "failed"}
    assert set(failed) == {("tiny é", "gone"), ("gone", "cls é"), ("gone", "gone")}
    assert home.spell(home.base / "bench" / "absent é", "symlink") + " is not a folder" in failed[("tiny é", "gone")]
    assert absent_checkpoint in failed[("gone", "cls é")]
    assert (out / "results.md").is_file() and (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_paths_that_fail_before_running(at_root, monkeypatch, capsys):
    home = at_root
    absent = home.base / "bench" / "absent suite é.yaml"
    code, _, err = run(["benchmark", absent, "--out", home.base / "bench" / "never"], capsys)
    assert_clear_error(code, err, absent, expected_code=2)
    code, _, err = run(["benchmark", "file://" + str(absent), "--out", home.base / "bench" / "never"], capsys)
    assert_clear_error(code, err, "file://" + str(absent), expected_code=2)  # was: "file:/..." (one slash lost)

    suite = home.base / "bench" / "only gone.yaml"
    suite.parent.mkdir(parents=True, exist_ok=True)
    suite.write_text("datasets:\n  - root: absent é\n", encoding="utf-8")
    a_file = home.base / "bench" / "a file"
    a_file.write_text("keep me")
    code, _, err = run(["benchmark", suite, "--out", a_file, "--checkpoint", checkpoint_path(home)], capsys)
    assert_clear_error(code, err, a_file, expected_code=2)
    assert a_file.read_text() == "keep me"

    # a relative checkpoint whose first folder holds '=' is a path, not LABEL=PATH (was: label "lr", path "1 é/...")
    monkeypatch.chdir(home.base / "runs")
    out = home.base / "bench" / "equals"
    code, _, err = run(["benchmark", suite, "--out", out, "--checkpoint", "lr=1 é/checkpoints/epoch_1.pt"], capsys)
    assert code == 1, err  # the dataset is missing: no run starts
    (row,) = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert (row["architecture"], row["pretrained"]) == (TINY, "lr=1 é/checkpoints/epoch_1.pt")
    assert "absent é is not a folder" in row["error"]


# ---------------------------------------------------------------------------------- python -m training.main
def test_trainer(at_root):
    """--train-data as file:// shards under the dot-folder, --logs-dir relative through the symlink, and an
    explicit --resume PATH relative through the symlink: the run resumes those weights and trains."""
    home = at_root
    shards = home.spell(home.base / "shards é" / "{000000..000001}.tar", "file_url")
    logs = os.path.relpath(home.spell(home.base / "logs é", "symlink"), home.root)  # lien vers/logs é
    resume = os.path.relpath(home.spell(home.base / "bare weights.pt", "symlink"), home.root)
    args = base_args(shards, logs, name="run é", batch=4, dataset_type="webdataset")
    args += ["--train-num-samples", str(N), "--resume", resume]
    env = {k: v for k, v in os.environ.items() if k != "OPEN_CLIP_DISABLE_PLUGINS"}
    result = subprocess.run([sys.executable, "-m", "training.main", *args], cwd=home.root, capture_output=True,
                            text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = home.base / "logs é" / "run é"
    log = (run_dir / "out.log").read_text(encoding="utf-8")
    assert f"=> loaded checkpoint '{resume}'" in log
    assert log.count("Train Epoch: 0") == N // 4
    final = torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    # the resumed weights' IDF statistics, plus the run's own captions: the weights really came from --resume
    assert float(final["state_dict"]["class_idf.num_captions"]) == RESUMED_CAPTIONS + N


@pytest.mark.parametrize("resume", ["absent file", "folder"])
def test_trainer_resume_path_checked_when_arguments_are_parsed(at_root, resume, capsys):
    """Parsed in this process (it stops before anything is built); was: a FileNotFoundError traceback after the
    model was created."""
    from training.main import main as trainer_main
    home = at_root
    given = str(home.base / "absent é.pt") if resume == "absent file" else home.spell(home.base / "runs", "symlink")
    with pytest.raises(SystemExit) as exit_:
        trainer_main(["--model", TINY, "--train-data", str(home.base / "images et csv" / "train.csv"),
                      "--dataset-type", "csv", "--logs-dir", str(home.base / "logs é"), "--resume", given])
    err = capsys.readouterr().err
    assert_clear_error(exit_.value.code, err, given, expected_code=2)
