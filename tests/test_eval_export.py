"""Issue 6: a trained SuperCLIP checkpoint evaluated by the stock `clip_benchmark eval`, `superclip benchmark`, and
`superclip export` to a folder that vanilla open_clip (plugin disabled) loads with the same embeddings."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms

from open_clip_superclip import SuperCLIP
from open_clip_superclip.tools import benchmark
from open_clip_superclip.tools.checkpoints import export_main, export_stock, read_run_settings, superclip_counterpart
from open_clip_superclip.tools.make_wds import write_classification, write_retrieval

from conftest import TINY
from trainer_utils import base_args, captions, make_csv, run_trainer

CLASSES = ["dog", "cat", "car", "tree", "boat"]  # >= 5 classes, so acc5 is defined


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny SuperCLIP trained for two steps by the real trainer: LOGS/run/checkpoints/epoch_1.pt + params.txt."""
    root = tmp_path_factory.mktemp("train")
    result = run_trainer(base_args(make_csv(root / "data", n=16), root / "logs", batch=8))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "logs" / "run" / "checkpoints" / "epoch_1.pt"


@pytest.fixture(scope="module")
def bare_state_dict(trained, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bare") / "weights.pt"
    torch.save(torch.load(trained, weights_only=True)["state_dict"], path)
    return path


@pytest.fixture(scope="module")
def wds_root(tmp_path_factory) -> Path:
    """Generated classification (10 images, 5 classes) and retrieval (10 images x 2 captions) sets in
    clip_benchmark's wds layout, written by `superclip make-wds`'s writer."""
    root = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(10)]
    write_classification(root / "cls", [(image, i % len(CLASSES)) for i, image in enumerate(images)], CLASSES)
    texts = captions(20, seed=3)
    write_retrieval(root / "ret", [(image, texts[2 * i:2 * i + 2]) for i, image in enumerate(images)])
    return root


def _env():
    env = {k: v for k, v in os.environ.items() if k != "OPEN_CLIP_DISABLE_PLUGINS"}
    return {**env, "OMP_NUM_THREADS": "1"}


def _in_unit_range(value) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 1.0


# ------------------------------------------------------------------------------------------ stock loader
def test_trainer_checkpoint_loads_weights_only_strictly_with_model_normalisation(trained, tmp_path):
    from clip_benchmark.models import load_clip
    checkpoint = torch.load(trained, weights_only=True)
    assert checkpoint["optimizer"]["state"], "the trainer checkpoint should carry optimizer state"

    model, transform, _ = load_clip("open_clip", TINY, str(trained), None, "cpu")  # clip_benchmark's loader
    assert isinstance(model, SuperCLIP)
    loaded = model.state_dict()
    assert set(loaded) == set(checkpoint["state_dict"])
    assert all(torch.equal(loaded[k], v) for k, v in checkpoint["state_dict"].items())
    assert float(model.class_idf.num_captions) == 16  # the IDF statistics came along
    normalize = next(t for t in transform.transforms if isinstance(t, transforms.Normalize))
    assert tuple(normalize.mean) == tuple(model.visual.preprocess_cfg["mean"])
    assert tuple(normalize.std) == tuple(model.visual.preprocess_cfg["std"])

    state = dict(checkpoint["state_dict"])
    state["class_head.extra"] = torch.zeros(1)
    del state["ln_final.weight"]
    tampered = tmp_path / "tampered.pt"
    torch.save(state, tampered)
    with pytest.raises(RuntimeError, match=r"(?s)ln_final\.weight.*class_head\.extra"):
        open_clip.create_model(TINY, pretrained=str(tampered))


def test_stock_clip_benchmark_cli_classification(trained, wds_root, tmp_path):
    out = tmp_path / "cls.json"
    cli = Path(sys.executable).with_name("clip_benchmark")
    result = subprocess.run(
        [str(cli), "eval", "--model", TINY, "--pretrained", str(trained), "--dataset", "wds/cls",
         "--dataset_root", str(wds_root / "cls"), "--task", "zeroshot_classification", "--output", str(out),
         "--num_workers", "0"], capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    assert all(_in_unit_range(v) for v in metrics.values()), metrics


# --------------------------------------------------------------------------------------------- benchmark
def test_benchmark_reports_failing_datasets_and_runs_the_rest(bare_state_dict, wds_root, tmp_path, capfd):
    broken = tmp_path / "broken"
    shutil.copytree(wds_root / "cls", broken)
    (broken / "test" / "0.tar").write_bytes(b"not a tar file" * 100)  # fails inside clip_benchmark
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"datasets:\n  - root: {wds_root / 'ret'}\n  - broken\n  - root: missing\n    name: gone\n")
    out = tmp_path / "bench"

    rc = benchmark.main([str(suite), "--out", str(out), "--checkpoint", f"tiny={bare_state_dict}", "--model", TINY,
                         "--num-workers", "0", "--recall-k", "1", "5"])
    assert rc == 1  # some runs failed
    rows = list(csv.DictReader((out / "results.csv").open()))
    ok = {r["metric"]: float(r["value"]) for r in rows if r["dataset"] == "ret" and r["status"] == "ok"}
    assert set(ok) == {f"{kind}_retrieval_recall@{k}" for kind in ("image", "text") for k in (1, 5)}
    assert all(_in_unit_range(v) for v in ok.values()), ok
    failed = {r["dataset"]: r["error"] for r in rows if r["status"] == "failed"}
    assert set(failed) == {"broken", "gone"}
    assert "ReadError" in failed["broken"] and "is not a folder" in failed["gone"]
    assert all(r["model"] == "tiny" and r["architecture"] == TINY for r in rows)
    markdown = (out / "results.md").read_text().splitlines()
    assert len(markdown) == 2 + len(rows) and "| failed |" in markdown[-1]
    with Image.open(out / "results.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > 300
    progress = capfd.readouterr().err
    assert "[1/3] tiny x ret (zeroshot_retrieval): running" in progress
    assert "[2/3] tiny x broken: FAILED: ReadError" in progress


def _fake_run_with_custom_mean(trained, tmp_path) -> Path:
    """The trained checkpoint in a run folder whose params.txt says it trained with --image-mean/--image-std."""
    checkpoint = tmp_path / "logs" / "custom" / "checkpoints" / "epoch_1.pt"
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(trained, checkpoint)
    params = (trained.parent.parent / "params.txt").read_text()
    params = params.replace("image_mean: None", "image_mean: [0.5, 0.5, 0.5]")
    params = params.replace("image_std: None", "image_std: [0.25, 0.25, 0.25]")
    (checkpoint.parent.parent / "params.txt").write_text(params)
    return checkpoint


def test_run_settings_clip_benchmark_cannot_see_are_refused_and_exported(trained, tmp_path):
    checkpoint = _fake_run_with_custom_mean(trained, tmp_path)
    settings = read_run_settings(checkpoint)
    assert settings.model == TINY and settings.preprocess == {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    model = benchmark.resolve_model(None, str(checkpoint))
    assert model.model == TINY and "--image-mean, --image-std" in model.problem and "superclip export" in model.problem

    assert superclip_counterpart("ViT-B-16") == "SuperCLIP-ViT-B-16" and superclip_counterpart("RN50") is None
    assert "ignores pretrained" in benchmark.resolve_model(f"local-dir:{tmp_path}", str(checkpoint)).problem

    export_stock(checkpoint, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["mean"] == [0.5] * 3 and config["preprocess_cfg"]["std"] == [0.25] * 3


# ------------------------------------------------------------------------------------------------ export
VANILLA = """
import sys, torch, open_clip
from open_clip import factory
from open_clip.model import CLIP
folder, inputs_path, out_path = sys.argv[1:]
assert not any(name.startswith("SuperCLIP") for name in open_clip.list_models()), "the plugin is active"
assert factory.CLIP is CLIP
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
assert type(model) is CLIP, type(model)
model.eval()
inputs = torch.load(inputs_path)
assert torch.equal(open_clip.get_tokenizer("local-dir:" + folder)(inputs["captions"]), inputs["tokens"])
with torch.no_grad():
    torch.save({"image": model.encode_image(inputs["images"]), "text": model.encode_text(inputs["tokens"]),
                "mean": list(model.visual.preprocess_cfg["mean"])}, out_path)
"""


def test_export_loads_in_vanilla_open_clip_with_the_same_embeddings(trained, tmp_path):
    out = tmp_path / "exported"
    assert export_main([str(trained), str(out)]) == 0  # the model name comes from the run's params.txt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no staging folder left behind
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert "superclip_cfg" not in config["model_cfg"] and config["model_cfg"] == {
        k: v for k, v in open_clip.get_model_config(TINY).items() if k != "superclip_cfg"}
    from safetensors.torch import load_file
    assert not any(k.startswith(("class_head.", "class_idf.")) for k in load_file(out / "open_clip_model.safetensors"))

    model = open_clip.create_model(TINY, pretrained=str(trained)).eval()
    torch.manual_seed(0)
    texts = ["a dog on the road", "red car", "!"]
    inputs = {"images": torch.randn(3, 3, 64, 64), "captions": texts, "tokens": open_clip.get_tokenizer(TINY)(texts)}
    torch.save(inputs, tmp_path / "inputs.pt")
    result = subprocess.run([sys.executable, "-c", VANILLA, str(out), str(tmp_path / "inputs.pt"),
                             str(tmp_path / "vanilla.pt")], capture_output=True, text=True, timeout=600,
                            env={**_env(), "OPEN_CLIP_DISABLE_PLUGINS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    vanilla = torch.load(tmp_path / "vanilla.pt")
    with torch.no_grad():
        image, text = model.encode_image(inputs["images"]), model.encode_text(inputs["tokens"])
    assert (vanilla["image"] - image).abs().max() <= 1e-6 and (vanilla["text"] - text).abs().max() <= 1e-6
    assert vanilla["mean"] == list(model.visual.preprocess_cfg["mean"])


def test_export_is_atomic_and_refuses_to_overwrite(bare_state_dict, tmp_path, capsys):
    state = torch.load(bare_state_dict, weights_only=True)
    del state["visual.ln_post.bias"]
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    out = tmp_path / "out"
    assert export_main([str(broken), str(out), "--model", TINY]) == 2
    assert "visual.ln_post.bias" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt"]  # nothing half-written

    assert export_main([str(bare_state_dict), str(out)]) == 2  # a bare state dict has no params.txt
    assert "--model" in capsys.readouterr().err
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_main([str(bare_state_dict), str(out), "--model", TINY]) == 2
    assert "--force" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep.txt"]
