"""Fault tolerance (issue 10): atomic checkpoints, `--resume latest` that skips broken files, the NaN guard."""
import argparse
import glob
import inspect
import logging
import os
import socket
import subprocess
import sys
import time

import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss
from open_clip_train import main as train_main
from open_clip_train import train
from open_clip_train.data import DataInfo

from open_clip_superclip import ClassificationAugmentedLoss, atomic, patching
from open_clip_superclip.idf import batch_document_frequency, distinct_caption_tokens
from trainer_utils import base_args, captions, make_csv
from open_clip_superclip.train import fault_tolerance as ft
from open_clip_superclip.train import plugin

TINY = "SuperCLIP-ViT-Tiny"
N = 32  # samples


@pytest.fixture(scope="module", autouse=True)
def installed():
    patching.install(plugin.ON_TRAINER_START)  # in this process: open_clip_train.main as imported above
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared: more threads are much slower
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory):
    return make_csv(tmp_path_factory.mktemp("csv"), n=N)


def _state(model):
    return {"w": torch.arange(6.0).view(2, 3) + model, "epoch": model, "name": "x"}


# --- upstream contract: the names the patches replace are still used the way they assume -------------------------

def test_trainer_still_saves_resumes_and_steps_through_the_patched_names():
    main_src, train_src = inspect.getsource(train_main), inspect.getsource(train.train_one_epoch)
    assert main_src.count("torch.save(") == 2 and "torch.save(checkpoint_dict, tmp_save_path)" in main_src
    assert "resume_from = get_latest_checkpoint(checkpoint_path, remote=args.remote_sync is not None)" in main_src
    assert "checkpoint = pt_load(args.resume, map_location='cpu')" in main_src
    assert ("train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, "
            "tb_writer=writer)") in main_src
    assert train_src.count("backward(total_loss, scaler)") == 2 and "optimizer.zero_grad()" in train_src
    assert "scaler.step(optimizer)" in train_src and "optimizer.step()" in train_src
    stock = train_main.train_one_epoch.__wrapped__
    assert inspect.signature(stock) == inspect.signature(train_main.train_one_epoch)
    assert train_main.torch.save is atomic.atomic_save and train_main.torch.cuda is torch.cuda
    assert train.backward.__wrapped__.__module__ == "open_clip_train.train"


# --- atomic checkpoint writes ------------------------------------------------------------------------------------

def test_atomic_save_writes_the_bytes_torch_save_writes_and_leaves_nothing_else(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    torch.save(_state(1), tmp_path / "a" / "epoch_1.pt")
    train_main.torch.save(_state(1), str(tmp_path / "b" / "epoch_1.pt"))  # the name open_clip_train.main calls
    assert (tmp_path / "a" / "epoch_1.pt").read_bytes() == (tmp_path / "b" / "epoch_1.pt").read_bytes()
    assert os.listdir(tmp_path / "b") == ["epoch_1.pt"]


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("disk full, say")


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "epoch_latest.pt"
    atomic.atomic_save(_state(1), path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        atomic.atomic_save({"w": torch.zeros(1000), "x": _FailsToPickle()}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["epoch_latest.pt"]


# --- --resume latest ---------------------------------------------------------------------------------------------

def _killed_during_save(folder):
    """What kills mid-save leave: a truncated newest epoch file (stock in-place write), the stock tmp.pt of
    --save-most-recent, a partial of ours, and a stop checkpoint of the NaN guard (never resumed)."""
    folder.mkdir(parents=True)
    torch.save(_state(1), folder / "epoch_1.pt")
    torch.save(_state(2), folder / "epoch_2.pt")
    (folder / "epoch_2.pt").write_bytes((folder / "epoch_2.pt").read_bytes()[:700])
    torch.save(_state(3), folder / "tmp.pt")
    partial = folder / f".epoch_3.pt{atomic.PARTIAL_MARK}x1y2"
    partial.mkdir()
    (partial / "epoch_3.pt").write_bytes(b"PK\x03\x04 half a zip")
    torch.save(_state(2), folder / f"{ft.STOP_CHECKPOINT_PREFIX}epoch_1_step_7.pt")
    return partial


def test_resume_latest_picks_the_newest_checkpoint_that_loads(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    partial = _killed_during_save(folder)
    assert train_main.get_latest_checkpoint.__wrapped__(str(folder), remote=False).endswith("tmp.pt")  # stock
    with caplog.at_level(logging.INFO):
        chosen = train_main.get_latest_checkpoint(str(folder), remote=False)
    assert chosen == str(folder / "epoch_1.pt")
    assert f"skipping {folder / 'epoch_2.pt'}: it does not load" in caplog.text
    assert f"resuming from {folder / 'epoch_1.pt'}" in caplog.text
    assert not partial.exists()  # the leftover of the interrupted write is cleaned up


def test_resume_latest_with_nothing_loadable_starts_fresh(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "epoch_1.pt").write_bytes(b"not a checkpoint")
    assert train_main.get_latest_checkpoint(str(folder), remote=False) is None


def test_remote_resume_listing_skips_temporary_and_broken_files():
    import fsspec
    fs = fsspec.filesystem("memory")
    root = f"memory://ft-{os.getpid()}/run/checkpoints"
    for name, state in (("epoch_1.pt", 1), ("epoch_2.pt", 2), ("tmp.pt", 3)):
        with fs.open(f"{root}/{name}", "wb") as f:
            torch.save(_state(state), f)
    fs.pipe(f"{root}/epoch_2.pt", fs.cat(f"{root}/epoch_2.pt")[:500])
    assert train_main.get_latest_checkpoint(root, remote=True) == f"{root}/epoch_1.pt"


# --- the non-finite loss guard, in process on the stock train_one_epoch ------------------------------------------

def _batches(n, batch=4):
    tokenizer = open_clip.get_tokenizer(TINY)
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 64, 64, generator=generator), tokenizer(captions(batch, seed=i)))
            for i in range(n)]


class _Loader(list):
    @property
    def num_batches(self):
        return len(self)

    @property
    def num_samples(self):
        return sum(len(b[0]) for b in self)


def _train(batches, guarded, accum_freq=1, use_scaler=False, max_bad_steps=20, tmp_path=None):
    """One epoch of the stock open_clip_train.train.train_one_epoch (guarded or not) on a fresh tiny SuperCLIP."""
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, output_dict=True)
    loss = ClassificationAugmentedLoss(ClipLoss(), statistics=model.class_idf, statistics_update="on_commit")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.register_step_post_hook(lambda *_: loss.commit_statistics())
    scaler = torch.amp.GradScaler("cpu") if use_scaler else None
    args = argparse.Namespace(
        device="cpu", precision="fp32", accum_freq=accum_freq, distill=False, skip_scheduler=True, horovod=False,
        grad_clip_norm=1.0, log_every_n_steps=1, batch_size=len(batches[0][0]), world_size=1, rank=0,
        local_rank=0, wandb=False, superclip=True, superclip_max_bad_steps=max_bad_steps, save_logs=True,
        checkpoint_path=str(tmp_path), name="t")
    one_epoch = train_main.train_one_epoch if guarded else train.train_one_epoch
    one_epoch(model, {"train": DataInfo(_Loader(batches))}, loss, 0, optimizer, scaler, None, None, args)
    return model, optimizer, ft._guard if guarded else None, scaler


def _assert_same(run_a, run_b):
    (model_a, opt_a, _, scaler_a), (model_b, opt_b, _, scaler_b) = run_a, run_b
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert sd_a["class_idf.num_captions"] > 0 and sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a), [k for k in sd_a if not torch.equal(sd_a[k], sd_b[k])]
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and all(state_a[p].keys() == state_b[p].keys() for p in state_a)
    assert all(torch.equal(state_a[p][k], state_b[p][k]) for p in state_a for k in state_a[p])
    assert (scaler_a is None) == (scaler_b is None)
    if scaler_a is not None:  # scale and growth tracker: a skipped step leaves them as they were
        assert scaler_a.state_dict() == scaler_b.state_dict()


@pytest.mark.parametrize("accum_freq,use_scaler", [(1, False), (2, True)], ids=["plain", "accum2-gradscaler"])
def test_healthy_steps_are_bit_identical_with_the_guard(accum_freq, use_scaler):
    batches = _batches(2 * accum_freq)
    _assert_same(_train(batches, guarded=True, accum_freq=accum_freq, use_scaler=use_scaler),
                 _train(batches, guarded=False, accum_freq=accum_freq, use_scaler=use_scaler))


@pytest.mark.parametrize("accum_freq,use_scaler,bad", [(1, False, 0), (2, True, 0), (2, True, 1)],
                         ids=["plain", "accum2-gradscaler", "accum2-gradscaler-step1"])
def test_a_nan_class_loss_step_is_skipped_and_counted(monkeypatch, caplog, accum_freq, use_scaler, bad):
    # step `bad` of 3 has a NaN class loss: the run must equal a stock run that never saw that step's batches
    # (same weights, same AdamW moments and step counts, same IDF statistics, same GradScaler scale and growth
    # tracker: step 1, after the scaler has a scale, shows a skipped step leaves it alone)
    monkeypatch.setenv(ft.INJECT_ENV, f"class_loss:{bad}")
    batches = _batches(3 * accum_freq)
    with caplog.at_level(logging.WARNING):
        guarded = _train(batches, guarded=True, accum_freq=accum_freq, use_scaler=use_scaler)
    without_bad = batches[:bad * accum_freq] + batches[(bad + 1) * accum_freq:]
    _assert_same(guarded, _train(without_bad, guarded=False, accum_freq=accum_freq, use_scaler=use_scaler))
    guard = guarded[2]
    assert (guard.total, guard.consecutive) == (1, 0)
    assert f"Non-finite loss at epoch 0 step {bad}: class_loss; step skipped" in caplog.text
    assert "Epoch 0: 1 optimizer steps skipped for a non-finite loss" in caplog.text


def test_too_many_consecutive_bad_steps_stop_with_the_last_good_state(monkeypatch, tmp_path):
    monkeypatch.setenv(ft.INJECT_ENV, "contrastive_loss:1-2")
    batches = _batches(3)
    with pytest.raises(ft.NonFiniteLossError, match=r"2 consecutive optimizer steps had a non-finite loss "
                                                    r"\(contrastive_loss; last at epoch 0 step 2\), more than "
                                                    r"--superclip-max-bad-steps 1"):
        _train(batches, guarded=True, max_bad_steps=1, tmp_path=tmp_path)
    saved = torch.load(tmp_path / f"{ft.STOP_CHECKPOINT_PREFIX}epoch_0_step_2.pt", weights_only=True)
    good = _train(batches[:1], guarded=False)
    assert saved["step"] == 2 and saved["epoch"] == 0
    assert saved["state_dict"].keys() == good[0].state_dict().keys()
    assert all(torch.equal(v, good[0].state_dict()[k]) for k, v in saved["state_dict"].items())


def test_max_bad_steps_0_stops_at_the_first_bad_step(monkeypatch, tmp_path):
    monkeypatch.setenv(ft.INJECT_ENV, "class_loss:1")
    batches = _batches(3)
    with pytest.raises(ft.NonFiniteLossError, match=r"1 consecutive optimizer steps had a non-finite loss "
                                                    r"\(class_loss; last at epoch 0 step 1\), more than "
                                                    r"--superclip-max-bad-steps 0"):
        _train(batches, guarded=True, max_bad_steps=0, tmp_path=tmp_path)
    saved = torch.load(tmp_path / f"{ft.STOP_CHECKPOINT_PREFIX}epoch_0_step_1.pt", weights_only=True)
    good = _train(batches[:1], guarded=False)[0].state_dict()
    assert saved["state_dict"].keys() == good.keys()
    assert all(torch.equal(v, good[k]) for k, v in saved["state_dict"].items())


class _NoGuard:
    def __init__(self, *args, **kwargs):
        raise AssertionError("--superclip-max-bad-steps -1 built the non-finite loss guard")


def test_max_bad_steps_minus_1_runs_the_stock_epoch_without_the_guard(monkeypatch):
    """-1: no guard object (so no per-step flag all-reduce and host sync) and no skipping: a NaN batch reaches
    the optimizer as in stock open_clip_train, and the weights turn NaN."""
    monkeypatch.setattr(ft, "NonFiniteLossGuard", _NoGuard)
    batches = _batches(2)
    batches[1] = (torch.full_like(batches[1][0], float("nan")), batches[1][1])
    model = _train(batches, guarded=True, max_bad_steps=-1)[0]
    assert torch.isnan(model.class_head.proj.weight).all() and torch.isnan(model.visual.proj).all()


@pytest.mark.parametrize("value", ["-1", "0"])
def test_max_bad_steps_accepts_minus_1_and_0(value):
    from open_clip_train.params import parse_args
    assert parse_args(["--model", TINY, "--superclip-max-bad-steps", value]).superclip_max_bad_steps == int(value)


def test_bad_injection_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="expected NAME:STEPS"):
        ft.NonFiniteInjection("class_loss")


# --- real runs of the trainer ------------------------------------------------------------------------------------

def _trainer(args, log_file, nproc=None, env_extra=None):
    """The trainer as a child process (Popen: the tests kill it)."""
    env = {k: v for k, v in os.environ.items() if k != "OPEN_CLIP_DISABLE_PLUGINS"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})})
    cmd = [sys.executable, "-m", "training.main", *args]
    if nproc:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)


def _run_to_end(args, tmp_path, label, **kwargs):
    with open(tmp_path / f"{label}.txt", "w") as log_file:
        proc = _trainer(args, log_file, **kwargs)
        proc.wait(timeout=300)
    return proc.returncode, (tmp_path / f"{label}.txt").read_text()


def _kill_when(args, tmp_path, condition):
    """Starts a run and SIGKILLs it once condition() holds."""
    with open(tmp_path / "killed.txt", "w") as log_file:
        proc = _trainer(args, log_file)
        deadline = time.time() + 300
        while not condition():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.txt").read_text()[-3000:]
            time.sleep(0.005)
        proc.kill()
        proc.wait()


def _state_dict(path):
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _epoch_counts(csv):
    """IDF counts of one pass over the data set, from its captions."""
    lines = csv.read_text().splitlines()[1:]
    tokens = open_clip.get_tokenizer(TINY)([line.split("\t")[1] for line in lines])
    ids, present, _ = distinct_caption_tokens(tokens, 49406, 49407, 49408)
    return batch_document_frequency(ids, present, 49408), len(lines)


def test_sigkill_during_a_checkpoint_write_then_resume_latest_finishes(tmp_path, csv_data):
    logs = tmp_path / "logs"
    args = base_args(csv_data, logs, batch=16, epochs=2)
    ckpt = logs / "run" / "checkpoints"
    partial = str(ckpt / f".epoch_2.pt{atomic.PARTIAL_MARK}*" / "epoch_2.pt")
    _kill_when(args, tmp_path, lambda: glob.glob(partial))
    assert not (ckpt / "epoch_2.pt").exists() and glob.glob(partial), "the kill landed outside the write"

    code, out = _run_to_end(args + ["--resume", "latest"], tmp_path, "resumed")
    assert code == 0, out[-3000:]
    assert f"--resume latest: resuming from {ckpt / 'epoch_1.pt'}" in out
    assert not glob.glob(str(ckpt / ".*"))
    first, final = _state_dict(ckpt / "epoch_1.pt"), _state_dict(ckpt / "epoch_2.pt")
    # as in an uninterrupted run: every caption seen twice, each pass counted once
    assert first["class_idf.num_captions"] == N and final["class_idf.num_captions"] == 2 * N
    assert torch.equal(final["class_idf.doc_freq"], 2 * first["class_idf.doc_freq"])


def test_torchrun_nan_skip_on_one_rank_then_stop_then_resume_latest_finishes(tmp_path, csv_data):
    # 2 ranks x batch 8 = 2 steps per epoch. Step 0: NaN class loss on rank 1 only: both ranks skip it and step 1
    # trains; steps 2-3: NaN contrastive loss everywhere: with --superclip-max-bad-steps 1 the run stops at step 3
    logs = tmp_path / "logs"
    args = base_args(csv_data, logs, epochs=2)
    inject = {ft.INJECT_ENV: "class_loss:0:1;contrastive_loss:2-3"}
    code, out = _run_to_end(args + ["--superclip-max-bad-steps", "1"], tmp_path, "stopped", nproc=2,
                            env_extra=inject)
    assert code != 0
    assert "Non-finite loss at epoch 0 step 0: class_loss (on 1 of 2 ranks); step skipped" in out
    assert "Non-finite loss at epoch 1 step 2: contrastive_loss (on 2 of 2 ranks); step skipped" in out
    ckpt = logs / "run" / "checkpoints"
    stop = ckpt / f"{ft.STOP_CHECKPOINT_PREFIX}epoch_1_step_3.pt"
    assert ("NonFiniteLossError: SuperCLIP: 2 consecutive optimizer steps had a non-finite loss (contrastive_loss; "
            f"last at epoch 1 step 3), more than --superclip-max-bad-steps 1 allows: stopping. The model and "
            f"optimizer are those of the last good step, saved to {stop}") in out
    # skipped steps change nothing: the stop checkpoint is the state at the end of epoch 0 (step 1 only)
    first, stopped = _state_dict(ckpt / "epoch_1.pt"), _state_dict(stop)
    assert first["class_idf.num_captions"] == N // 2
    assert stopped.keys() == first.keys() and all(torch.equal(v, first[k]) for k, v in stopped.items())

    code, out = _run_to_end(args + ["--resume", "latest"], tmp_path, "resumed", nproc=2)
    assert code == 0, out[-3000:]
    assert f"--resume latest: resuming from {ckpt / 'epoch_1.pt'}" in out  # not the newer stop checkpoint
    final = _state_dict(ckpt / "epoch_2.pt")
    epoch_df, epoch_n = _epoch_counts(csv_data)
    assert final["class_idf.num_captions"] == N // 2 + epoch_n
    assert torch.equal(final["class_idf.doc_freq"], first["class_idf.doc_freq"] + epoch_df)


@pytest.mark.parametrize("extra,message", [
    (["--superclip-max-bad-steps", "-2"], "--superclip-max-bad-steps must be >= -1"),
    (["--model", "ViT-B-32", "--superclip-max-bad-steps", "3"], "--superclip-max-bad-steps has no effect"),
])
def test_bad_flag_values_exit_2(capsys, extra, message):
    from open_clip_train.params import parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model", TINY, *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
