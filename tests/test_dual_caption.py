"""DualCaption and caption mixing on the stock data paths (issue 5): the tensors the loss receives, the mixing
ratio and its reproducibility, missing long captions, flag validation, and real trainer runs."""
import json
import logging
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

import open_clip
from open_clip_train import data as oc_data
from open_clip_train.params import parse_args
from open_clip_superclip.patching import UpstreamMoved
from open_clip_superclip.train.plugin import insert_wds_sample_stage
from open_clip_superclip.train.dual_caption import (CaptionChooser, CaptionCounters, DualCaptionConfig, DualCaptionCsvDataset,
                                      LongCaptionStage, mix_picks_long)
from trainer_utils import _images, base_args, captions, checkpoint, logged_losses, make_csv, make_wds, run_trainer

TINY = "SuperCLIP-ViT-Tiny"
PLAIN = "ViT-B-32"  # a stock model name: no SuperCLIP head, only its (CLIP BPE) tokenizer is built here
TOK = open_clip.get_tokenizer(TINY)
LONG_WORDS = 40  # "word dog" x 40 + "sample i": ~85 BPE tokens, more than the 77 of the text tower


def long_caption(i):
    return f"sample {i} " + " ".join(["word dog"] * LONG_WORDS)


def longs(n, missing=()):
    return [None if i in missing else long_caption(i) for i in range(n)]


def parsed(train_data, extra, dataset_type="webdataset", model=TINY, n=None):
    argv = ["--model", model, "--train-data", str(train_data), "--dataset-type", dataset_type, "--batch-size", "4",
            "--workers", "0", "--seed", "0", *extra]
    if n is not None and dataset_type == "webdataset":
        argv += ["--train-num-samples", str(n)]
    args = parse_args(argv)
    args.distributed, args.world_size, args.rank, args.local_rank, args.device = False, 1, 0, 0, "cpu"
    return args


def train_loader(args, tokenizer=TOK):
    return oc_data.get_data(args, (TF.to_tensor, TF.to_tensor), tokenizer=tokenizer)["train"].dataloader


def image_index(n, seed=0, size=64):
    return {TF.to_tensor(image).numpy().tobytes(): i for i, image in enumerate(_images(n, seed, size))}


def samples(loader, index):
    """{sample index: text row} over one epoch (rows keyed by their image)."""
    out = {}
    for images, texts in loader:
        for image, row in zip(images, texts):
            out[index[image.numpy().tobytes()]] = row
    return out


def ids(row):
    """The token ids of a row between SOT and EOT."""
    row = row.tolist()
    assert row[0] == TOK.sot_token_id
    return row[1:row.index(TOK.eot_token_id)]


def is_long(row, i):
    prefix = TOK.encode(f"sample {i} word")
    return ids(row)[:len(prefix)] == prefix


def epoch_report(caplog):
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DualCaption epoch")]
    assert len(lines) == 1, lines
    return lines[0]


# --- the tensors the loss receives ---------------------------------------------------------------------------

def test_wds_class_targets_come_from_the_long_caption_uncut_and_contrastive_from_the_short(tmp_path, caplog):
    n = 8
    shards = make_wds(tmp_path, n=n, shards=2, extra_members={"long.txt": longs(n)})
    args = parsed(shards, ["--superclip-long-caption-key", "long.txt"], n=n)
    caplog.set_level(logging.INFO)
    rows = samples(train_loader(args), image_index(n))
    assert sorted(rows) == list(range(n))
    shorts = captions(n)
    for i, row in rows.items():
        assert row.shape == (77 + 256,)
        assert torch.equal(row[:77], TOK(shorts[i])[0])
        assert ids(row[77:]) == TOK.encode(long_caption(i))
        assert len(ids(row[77:])) > 77  # not cut at the text tower's context length
    assert "8 samples" in epoch_report(caplog) and "cut at 256 tokens: 0" in epoch_report(caplog)

    # what SuperCLIP hands the loss: text features of the short caption, class tokens of the long one
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, output_dict=True).train()
    images = torch.stack([TF.to_tensor(im) for im in _images(n, 0, 64)])
    texts = torch.stack([rows[i] for i in range(n)])
    with torch.no_grad():
        out = model(images, texts)
        short_features = model.encode_text(TOK(shorts), normalize=True)
    assert torch.equal(out["class_tokens"], texts[:, 77:])
    torch.testing.assert_close(out["text_features"], short_features)


def test_csv_long_column_with_both_captions_and_a_class_context_cut(tmp_path, caplog):
    n = 8
    csv = make_csv(tmp_path, n=n, extra_columns={"recaption": [long_caption(i) if i != 3 else "" for i in range(n)]})
    args = parsed(csv, ["--csv-long-caption-key", "recaption", "--superclip-class-caption", "both",
                        "--superclip-class-context-length", "64"], dataset_type="csv")
    caplog.set_level(logging.INFO)
    rows = samples(train_loader(args), image_index(n))
    shorts = captions(n)
    for i, row in rows.items():
        assert row.shape == (77 + 64,)
        assert torch.equal(row[:77], TOK(shorts[i])[0])
        if i == 3:  # empty long caption: the short one alone
            assert ids(row[77:]) == TOK.encode(shorts[i])
        else:  # short then long, cut at 64 tokens (SOT + 62 + EOT)
            assert ids(row[77:]) == (TOK.encode(shorts[i]) + TOK.encode(long_caption(i)))[:62]
    report = epoch_report(caplog)
    assert "long caption missing for 1 (absent 0, empty 1" in report
    assert "cut at 64 tokens: 7" in report  # batches of 4 over 8 rows: every row delivered once


def test_json_field_key_and_its_missing_cases(tmp_path, caplog):
    n = 8
    members = [{"recaption": long_caption(i), "other": 1} for i in range(n)]
    members[1] = {"other": 1}  # field absent
    members[4] = {"recaption": "   "}  # empty
    members[6] = {"recaption": ["a", "list"]}  # not a string: unreadable
    members = [json.dumps(m).encode() for m in members]
    shards = make_wds(tmp_path, n=n, shards=2, extra_members={"json": members})
    args = parsed(shards, ["--superclip-long-caption-key", "json:recaption"], n=n)
    caplog.set_level(logging.INFO)
    rows = samples(train_loader(args), image_index(n))
    shorts = captions(n)
    for i, row in rows.items():
        assert ids(row[77:]) == TOK.encode(shorts[i] if i in (1, 4, 6) else long_caption(i))
    assert "long caption missing for 3 (absent 1, empty 1, unreadable 1) -> short caption used" in \
        epoch_report(caplog)


def _stage_payloads(raw_samples, policy):
    config = DualCaptionConfig(long_key="json:recaption", mix_long_ratio=0.0, class_caption="long",
                               class_context_length=256, missing_long=policy, seed=0)
    return [json.loads(s["txt"]) for s in LongCaptionStage(CaptionChooser(config, CaptionCounters()))(raw_samples)]


def test_stage_on_raw_samples_malformed_json_and_non_training_samples():
    raw = [{"__key__": "a", "__url__": "/d/0.tar", "png": b"x", "txt": b"short a", "json": b"{not json"},
           {"__key__": "b", "__url__": "/d/0.tar", "png": b"x", "txt": b"short b",
            "json": json.dumps({"recaption": "long b"}).encode()}]
    a, b = _stage_payloads(raw, "short")
    assert (a["class"], a["missing"]) == (["short a"], "unreadable")
    assert (b["class"], b["missing"]) == (["long b"], None)
    assert [p["class"] for p in _stage_payloads(raw, "skip")] == [["long b"]]
    with pytest.raises(ValueError, match=r"sample 'a' of /d/0.tar: long caption unreadable \(json:recaption\)"):
        _stage_payloads(raw, "error")
    no_image = {"__key__": "c", "txt": b"short c"}  # the stock filter drops it later, untouched here
    assert list(LongCaptionStage(CaptionChooser(DualCaptionConfig("long.txt", 0.0, None, None, "error", 0),
                                                CaptionCounters()))([no_image])) == [no_image]


# --- missing long captions --------------------------------------------------------------------------------------

def test_wds_missing_long_skip_drops_and_error_names_the_sample(tmp_path, caplog):
    n = 8
    shards = make_wds(tmp_path, n=n, shards=2, extra_members={"long.txt": longs(n, missing={2, 5})})
    caplog.set_level(logging.INFO)
    # 6 usable samples in batches of 2: the first pass over the shards yields all 6 in 3 full batches, whatever
    # the (unseeded) sample shuffle does; the epoch's 4th batch comes from the wrap-around. Batches of 4 would
    # drop a random partial batch of 2 at the end of each pass and make coverage a matter of chance.
    args = parsed(shards, ["--superclip-long-caption-key", "long.txt", "--superclip-missing-long", "skip",
                           "--batch-size", "2"], n=n)
    assert set(samples(train_loader(args), image_index(n))) == set(range(n)) - {2, 5}
    assert "samples without a long caption skipped" in caplog.text

    args = parsed(shards, ["--superclip-long-caption-key", "long.txt", "--superclip-missing-long", "error"], n=n)
    with pytest.raises(ValueError, match=r"sample '0000000[25]' of .*\.tar: long caption absent \(long.txt\)"):
        samples(train_loader(args), image_index(n))


def test_csv_missing_long_policies_act_at_start_up(tmp_path, caplog):
    n = 8
    csv = make_csv(tmp_path, n=n, extra_columns={"long": [long_caption(i) if i != 6 else "" for i in range(n)]})
    caplog.set_level(logging.INFO)
    skip = parsed(csv, ["--csv-long-caption-key", "long", "--superclip-missing-long", "skip"], dataset_type="csv")
    loader = train_loader(skip)
    assert len(loader.dataset) == n - 1 and loader.num_samples == n - 1
    assert "1 of 8 rows have no long caption (removed)" in caplog.text
    rows = samples(loader, image_index(n))
    assert 6 not in rows and all(is_long(r[77:], i) for i, r in rows.items())

    error = parsed(csv, ["--csv-long-caption-key", "long", "--superclip-missing-long", "error"], dataset_type="csv")
    with pytest.raises(ValueError, match=r"row 6 \(line 8, image .*6.png\) has an empty long caption"):
        train_loader(error)


def test_csv_without_the_long_column_is_a_start_up_error(tmp_path):
    csv = make_csv(tmp_path, n=4)
    with pytest.raises(ValueError, match="no long caption column 'long'"):
        train_loader(parsed(csv, ["--csv-long-caption-key", "long"], dataset_type="csv"))


# --- caption mixing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.2, 0.8])
def test_mix_decision_matches_the_ratio_and_depends_only_on_seed_and_identity(ratio):
    ids = [f"{s:06d}.tar/{k:08d}" for s in range(20) for k in range(1000)]
    picks = np.array([mix_picks_long(0, i, ratio) for i in ids])
    sigma = math.sqrt(len(ids) * ratio * (1 - ratio))
    assert abs(picks.sum() - ratio * len(ids)) < 5 * sigma
    assert np.array_equal(picks, [mix_picks_long(0, i, ratio) for i in ids])
    other_seed = np.array([mix_picks_long(1, i, ratio) for i in ids])
    assert 0.5 * sigma < np.sum(picks != other_seed)  # another seed is another draw
    assert not any(mix_picks_long(0, i, 0.0) for i in ids[:100]) and all(mix_picks_long(0, i, 1.0) for i in ids[:100])


def _mix_choices(loader, index, n):
    rows = samples(loader, index)
    assert sorted(rows) == list(range(n)) and all(r.shape == (77,) for r in rows.values())  # plain CLIP: no class
    return {i: is_long(r, i) for i, r in rows.items()}


def test_mixing_in_a_plain_clip_run_is_reproducible_across_workers_and_data_formats(tmp_path, caplog):
    n, ratio = 64, 0.5
    flags = ["--caption-mix-long-ratio", str(ratio)]
    csv = make_csv(tmp_path / "csv", n=n, size=8, extra_columns={"long": longs(n)})
    index = image_index(n, size=8)
    csv_args = parsed(csv, ["--csv-long-caption-key", "long", *flags], dataset_type="csv", model=PLAIN)
    caplog.set_level(logging.INFO)
    one = _mix_choices(train_loader(csv_args), index, n)
    csv_args.workers = 2
    assert _mix_choices(train_loader(csv_args), index, n) == one
    assert one == {i: mix_picks_long(0, f"row {i}", ratio) for i in range(n)}
    assert abs(sum(one.values()) - ratio * n) < 4 * math.sqrt(n * ratio * (1 - ratio))
    assert f"contrastive caption long for {sum(one.values())} " in caplog.text

    shards = make_wds(tmp_path / "wds", n=n, shards=2, size=8, extra_members={"long.txt": longs(n)})
    wds_args = parsed(shards, ["--superclip-long-caption-key", "long.txt", *flags], model=PLAIN, n=n)
    wds_one = _mix_choices(train_loader(wds_args), index, n)
    wds_args.workers = 2
    assert _mix_choices(train_loader(wds_args), index, n) == wds_one
    shard_of = {i: f"{i // (n // 2):06d}.tar/{i:08d}" for i in range(n)}
    assert wds_one == {i: mix_picks_long(0, shard_of[i], ratio) for i in range(n)}
    wds_args.seed = 1
    assert _mix_choices(train_loader(wds_args), index, n) != wds_one


# --- flags ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--csv-long-caption-key", "long"], "reads csv training data, but --train-data"),
    (["--superclip-long-caption-key", "long.txt", "--dataset-type", "csv"], "reads webdataset training data"),
    (["--superclip-long-caption-key", "long.txt", "--dataset-type", "synthetic"], "reads webdataset training"),
    (["--superclip-class-caption", "long"], "--superclip-class-caption needs a long caption"),
    (["--caption-mix-long-ratio", "0.2"], "--caption-mix-long-ratio needs a long caption"),
    (["--superclip-missing-long", "skip"], "--superclip-missing-long needs a long caption"),
    (["--superclip-long-caption-key", "long.txt", "--csv-long-caption-key", "long"], "not both"),
    (["--superclip-long-caption-key", "long.txt", "--caption-mix-long-ratio", "1.5"], "probability in [0, 1]"),
    (["--superclip-long-caption-key", "txt"], "is the short caption itself"),
    (["--superclip-long-caption-key", "json:"], "field name after ':' is empty"),
    (["--superclip-long-caption-key", "meta:caption"], "is not one (use json:FIELD)"),
    (["--superclip-long-caption-key", "long.txt", "--superclip-class-context-length", "2"], "must be >= 3"),
    (["--superclip-long-caption-key", "long.txt", "--force-context-length", "77"], "--force-context-length cannot"),
    (["--superclip-long-caption-key", "long.txt", "--superclip-class-caption", "short"], "has no effect"),
    (["--superclip-long-caption-key", "long.txt", "--superclip-lambda", "0"], "has no effect"),
    (["--superclip-long-caption-key", "long.txt", "--superclip-lambda", "0", "--superclip-class-caption", "long",
      "--caption-mix-long-ratio", "0.2"], "--superclip-class-caption has no effect: this run trains no SuperCLIP"),
])
def test_flags_that_cannot_act_are_start_up_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model", TINY, "--train-data", "shards/{0..1}.tar", "--dataset-type", "webdataset", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_flag_defaults():
    args = parse_args(["--model", TINY, "--train-data", "a/{0..1}.tar", "--superclip-long-caption-key", "Long.TXT"])
    assert (args.superclip_class_caption, args.superclip_class_context_length, args.caption_mix_long_ratio,
            args.superclip_missing_long) == ("long", 256, 0.0, "short")
    plain = parse_args(["--model", PLAIN, "--train-data", "a.csv", "--csv-long-caption-key", "long",
                        "--caption-mix-long-ratio", "0.2"])
    assert plain.superclip_class_caption is None and plain.superclip_class_context_length is None


# --- the stock path and the upstream contract ------------------------------------------------------------------

def test_without_the_flags_the_data_paths_are_stock(tmp_path):
    n = 8
    csv = make_csv(tmp_path / "csv", n=n, extra_columns={"long": longs(n)})
    args = parsed(csv, [], dataset_type="csv")
    loader = train_loader(args)
    assert type(loader) is torch.utils.data.DataLoader
    stock = DualCaptionCsvDataset.__base__(str(csv), TF.to_tensor, "filepath", "title", tokenizer=TOK)
    assert len(loader.dataset) == len(stock) == n
    for i in range(n):
        (image, text), (stock_image, stock_text) = loader.dataset[i], stock[i]
        assert torch.equal(image, stock_image) and torch.equal(text, stock_text)

    shards = make_wds(tmp_path / "wds", n=n, shards=2, extra_members={"long.txt": longs(n)})
    args = parsed(shards, [], n=n)
    stock_info = oc_data.get_wds_dataset.__wrapped__(args, TF.to_tensor, True, tokenizer=TOK)
    ours, theirs = samples(train_loader(args), image_index(n)), samples(stock_info.dataloader, image_index(n))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[i], theirs[i]) for i in ours)
    assert all(torch.equal(ours[i], TOK(captions(n)[i])[0]) for i in ours)


def test_the_wds_stage_insertion_fails_loudly_if_upstream_moves():
    class Info:
        dataloader = torch.utils.data.DataLoader([1, 2])  # no wds pipeline
    with pytest.raises(UpstreamMoved, match="tarfile_to_samples_nothrow"):
        insert_wds_sample_stage(Info(), lambda samples: samples)


# --- real trainer runs ------------------------------------------------------------------------------------------

def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _dual_caption_lines(logs):
    return [line for line in (logs / "run" / "out.log").read_text().splitlines() if "DualCaption epoch" in line]


def test_trainer_dual_caption_run_with_workers_and_accum_freq(tmp_path):
    n, missing = 32, {0, 5, 10, 15, 20, 25, 30}
    shards = make_wds(tmp_path / "wds", n=n, shards=2, extra_members={"long.txt": longs(n, missing)})
    args = base_args(shards, tmp_path / "logs", batch=4, dataset_type="webdataset") + [
        "--train-num-samples", str(n), "--workers", "2", "--accum-freq", "2",
        "--superclip-long-caption-key", "long.txt", "--caption-mix-long-ratio", "0.25"]
    _ok(run_trainer(args))
    steps = logged_losses(tmp_path / "logs")
    assert len(steps) == 4 and all(math.isfinite(s["class_loss"]) and math.isfinite(s["contrastive_loss"])
                                   for s in steps)
    [report] = _dual_caption_lines(tmp_path / "logs")
    assert f"{n} samples;" in report and f"long caption missing for {len(missing)} (absent {len(missing)}" in report
    # the class statistics saw the long captions: "sample" occurs in no short caption
    sd = checkpoint(tmp_path / "logs")["state_dict"]
    [sample_id] = TOK.encode("sample")
    assert sd["class_idf.num_captions"].item() == n
    assert sd["class_idf.doc_freq"][sample_id].item() == n - len(missing)


def test_trainer_ddp_sums_the_counts_over_ranks(tmp_path):
    n = 16
    csv = make_csv(tmp_path / "csv", n=n, extra_columns={"long": longs(n)})
    args = base_args(csv, tmp_path / "logs", batch=4) + ["--csv-long-caption-key", "long",
                                                         "--superclip-class-caption", "both"]
    _ok(run_trainer(args, nproc=2))
    [report] = _dual_caption_lines(tmp_path / "logs")
    assert f"{n} samples;" in report and "long caption missing for 0" in report
    sd = checkpoint(tmp_path / "logs")["state_dict"]
    assert sd["module.class_idf.doc_freq"][TOK.encode("sample")].item() == n
