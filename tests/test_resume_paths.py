"""`--resume latest` for runs kept where users keep them: under dot-folders (~/.cache), with spaces and non-ASCII
names, through symlinks; only what lies below the checkpoints folder is judged temporary (issue 16)."""
import os
import random
import re
import subprocess
import sys
import time

import fsspec
import pytest
import torch

from trainer_utils import base_args, make_csv
from open_clip_superclip.train import fault_tolerance as ft

EPOCHS = 6


def _write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": value}, path)


def _latest(path, remote=False):
    return ft.latest_loadable_checkpoint(str(path), remote, sort_key=str, load=lambda p: torch.load(p))


@pytest.mark.parametrize("above", [".cache/exp", "home/.runs/ex périence", "scratch/.exp/my runs",
                                   "no dots/at all"])
def test_folders_above_the_checkpoints_never_make_a_checkpoint_temporary(tmp_path, above):
    checkpoints = tmp_path / above / "ft" / "checkpoints"
    _write(checkpoints / "epoch_1.pt", 1)
    _write(checkpoints / "epoch_2.pt", 2)
    _write(checkpoints / "tmp.pt", 3)  # stock --save-most-recent temporary
    _write(checkpoints / ".epoch_3.pt.partial-x" / "epoch_3.pt", 3)  # ours, below the folder: temporary
    _write(checkpoints / f"{ft.STOP_CHECKPOINT_PREFIX}epoch_2_step_9.pt", 9)
    assert _latest(checkpoints) == str(checkpoints / "epoch_2.pt")
    relative = os.path.relpath(checkpoints)
    assert _latest(relative) == os.path.join(relative, "epoch_2.pt")
    link = tmp_path / "linked run"
    link.symlink_to(tmp_path / above, target_is_directory=True)
    assert _latest(link / "ft" / "checkpoints") == str(link / "ft" / "checkpoints" / "epoch_2.pt")


@pytest.mark.parametrize("url", ["memory://bucket/.cache/exp é/ft/checkpoints", "file://{tmp}/.runs/my exp/ft/checkpoints"])
def test_remote_listings_judge_only_what_lies_below_the_listed_root(tmp_path, url):
    url = url.format(tmp=tmp_path)
    fs, root = fsspec.core.url_to_fs(url)
    for name, value in (("epoch_1.pt", 1), ("epoch_2.pt", 2), ("tmp.pt", 3), (".hidden/epoch_3.pt", 3)):
        fs.makedirs(os.path.dirname(f"{root}/{name}"), exist_ok=True)
        with fs.open(f"{root}/{name}", "wb") as f:
            torch.save({"epoch": value}, f)
    chosen = ft.latest_loadable_checkpoint(url, True, sort_key=str, load=lambda p: fs.open(p).close())
    assert chosen == f"{url}/epoch_2.pt"


def _start(args, log_path):
    env = {k: v for k, v in os.environ.items() if k != "OPEN_CLIP_DISABLE_PLUGINS"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "training.main", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env), log


def _kill_after(args, log_path, wanted, rng):
    """Starts the run, waits for checkpoint `wanted` to exist, then SIGKILLs it a random 0-0.5 s later."""
    proc, log = _start(args, log_path)
    deadline = time.time() + 300
    with log:
        while not wanted.exists():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()


def _newest_whole_epoch(checkpoints):
    epochs = [int(m.group(1)) for p in checkpoints.iterdir() if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))]
    return max(epochs)


@pytest.mark.timeout(600)
def test_sigkilled_run_under_a_dot_folder_resumes_its_newest_whole_checkpoint_and_finishes(tmp_path):
    """The held-out failure: a run under ~/.cache restarted from scratch. Killed after epoch 2 and again after
    epoch 4, with a truncated newer epoch file and a stale tmp.pt planted, it resumes the newest whole checkpoint
    each time and trains every epoch."""
    rng = random.Random(os.getpid())
    home = tmp_path / "home"
    data = make_csv(home / "data sets" / "tiny", n=16)
    logs = home / ".cache" / "exp runs é"
    args = base_args(data, logs, name="ft", batch=8, epochs=EPOCHS) + ["--save-frequency", "1", "--resume", "latest"]
    checkpoints = logs / "ft" / "checkpoints"

    _kill_after(args, tmp_path / "first.log", checkpoints / "epoch_2.pt", rng)
    for restart, wanted in (("second", checkpoints / "epoch_4.pt"), ("third", None)):
        whole = _newest_whole_epoch(checkpoints)
        if whole < EPOCHS:
            truncated = checkpoints / f"epoch_{whole + 1}.pt"
            torch.save({"epoch": whole + 1, "state_dict": {"w": torch.zeros(1000)}}, truncated)
            truncated.write_bytes(truncated.read_bytes()[:500])
        torch.save({"epoch": 99}, checkpoints / "tmp.pt")  # the stock temporary name: never resumed
        log_path = tmp_path / f"{restart}.log"
        if wanted is not None and whole < 4:
            _kill_after(args, log_path, wanted, rng)
        else:
            proc, log = _start(args, log_path)
            with log:
                assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        out = log_path.read_text()
        assert f"--resume latest: resuming from {checkpoints / f'epoch_{whole}.pt'}" in out, out[-3000:]
        if whole < EPOCHS:
            assert f"--resume latest: skipping {checkpoints / f'epoch_{whole + 1}.pt'}: it does not load" in out
        assert "no loadable checkpoint" not in out
    assert (checkpoints / f"epoch_{EPOCHS}.pt").is_file()
    final = torch.load(checkpoints / f"epoch_{EPOCHS}.pt", map_location="cpu", weights_only=True)
    assert final["epoch"] == EPOCHS
    # every epoch was trained once and counted once: 16 captions per epoch in the IDF statistics
    assert final["state_dict"]["class_idf.num_captions"] == 16 * EPOCHS


def test_a_shard_list_none_of_which_exists_stops_instead_of_waiting_forever(tmp_path):
    """Stock open_clip_train skips unreadable shards and its loader then waits for samples forever when none
    opens; a local list with no existing shard now stops at once, naming the pattern. A list with one shard
    there, or a remote one, goes to the stock function unchanged."""
    import argparse

    from open_clip_train import data
    calls = []
    checked = ft.stop_if_no_shard_exists(lambda args, preprocess, is_train, **kw: calls.append(args) or "stock")
    missing = str(tmp_path / "my shards é" / "{000000..000002}.tar")
    for get_wds_dataset in (checked, data.get_wds_dataset):  # the function, and as installed in open_clip_train
        with pytest.raises(FileNotFoundError, match=r"--train-data .*my shards é/\{000000..000002\}.tar: none of "
                                                    r"its 3 shard\(s\) exists"):
            get_wds_dataset(argparse.Namespace(train_data=missing, val_data=None), None, True)
    (tmp_path / "my shards é").mkdir()
    (tmp_path / "my shards é" / "000001.tar").write_bytes(b"")
    for pattern in (missing, f"file://{missing}", "s3://bucket/{0..9}.tar", "pipe:cat x.tar"):
        assert checked(argparse.Namespace(train_data=pattern, val_data=None), None, True) == "stock"
    assert len(calls) == 4
