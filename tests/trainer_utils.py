"""Tiny generated datasets and real runs of the stock open_clip trainer, for tests."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = ("dog cat car red blue photo of a the on big small tree house bird green sky water road man woman "
         "newspaper statue boat plane ! ? 1 2").split()
DETERMINISTIC_AUG = ["--aug-cfg", "scale=(1.0,1.0)"]


def captions(n, seed=0, words=8):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, words + 1))) for _ in range(n)]


def _images(n, seed, size):
    rng = np.random.default_rng(seed + 1)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def make_csv(folder: Path, n=32, seed=0, size=64, extra_columns=None) -> Path:
    """A tab-separated CSV in open_clip's default layout (filepath, title)."""
    folder.mkdir(parents=True, exist_ok=True)
    extra_columns = extra_columns or {}
    header = ["filepath", "title", *extra_columns]
    lines = ["\t".join(header)]
    for i, (image, caption) in enumerate(zip(_images(n, seed, size), captions(n, seed))):
        path = folder / f"{i}.png"
        image.save(path)
        lines.append("\t".join([str(path), caption, *(col[i] for col in extra_columns.values())]))
    csv = folder / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def make_wds(folder: Path, n=32, shards=2, seed=0, size=64, extra_members=None) -> str:
    """webdataset shards (png + txt [+ extra members]); returns the braceexpand pattern."""
    import io
    import webdataset as wds
    folder.mkdir(parents=True, exist_ok=True)
    images, caps = _images(n, seed, size), captions(n, seed)
    per_shard = (n + shards - 1) // shards
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:06d}.tar")) as sink:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                buf = io.BytesIO()
                images[i].save(buf, format="PNG")
                sample = {"__key__": f"{i:08d}", "png": buf.getvalue(), "txt": caps[i]}
                for member, values in (extra_members or {}).items():
                    if values[i] is not None:
                        sample[member] = values[i]
                sink.write(sample)
    return str(folder / f"{{{0:06d}..{shards - 1:06d}}}.tar")


def write_tiny_stock_config(folder: Path) -> str:
    """A local-dir: model with the towers of SuperCLIP-ViT-Tiny and no head: a stock open_clip CLIP."""
    import open_clip
    folder.mkdir(parents=True, exist_ok=True)
    cfg = open_clip.get_model_config("SuperCLIP-ViT-Tiny")
    cfg.pop("superclip_cfg")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return f"local-dir:{folder}"


def base_args(data, logs: Path, name="run", model="SuperCLIP-ViT-Tiny", batch=8, epochs=1, dataset_type="csv"):
    args = ["--model", model, "--train-data", str(data), "--dataset-type", dataset_type, "--batch-size", str(batch),
            "--epochs", str(epochs), "--workers", "0", "--precision", "fp32", "--device", "cpu", "--logs-dir",
            str(logs), "--name", name, "--seed", "0", "--lr", "1e-3", "--warmup", "1", "--log-every-n-steps", "1",
            "--report-to", "", *DETERMINISTIC_AUG]
    return args


def run_trainer(args, launcher=("-m", "training.main"), nproc=None, env_extra=None, cwd=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "OPEN_CLIP_DISABLE_PLUGINS"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})})
    if nproc is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000), *launcher, *args]
    else:
        cmd = [sys.executable, *launcher, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


LOSS_RE = re.compile(r"(\w+_loss|Loss): ([0-9.e+-]+) \(")


def logged_losses(log_dir: Path, name="run"):
    """[{loss name: value}] per logged step, from the run's out.log."""
    steps = []
    for line in (log_dir / name / "out.log").read_text().splitlines():
        if "Train Epoch" in line:
            steps.append({k.lower(): float(v) for k, v in LOSS_RE.findall(line)})
    return steps


def checkpoint(log_dir: Path, name="run", epoch=1):
    return torch.load(log_dir / name / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu", weights_only=False)
