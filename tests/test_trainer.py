"""Real short runs of the stock open_clip trainer with SuperCLIP (issue 3)."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from trainer_utils import (base_args, checkpoint, logged_losses, make_csv, make_wds, run_trainer,
                           write_tiny_stock_config)

N = 16  # samples: 2 steps at batch 8


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory):
    return make_csv(tmp_path_factory.mktemp("csv"), n=N)


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _assert_superclip_run(logs, name="run", epoch=1, captions=N):
    sd = checkpoint(logs, name, epoch)["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    assert sd["class_head.proj.weight"].shape == (49408, 128)
    assert sd["class_idf.num_captions"].item() == captions
    assert sd["class_idf.doc_freq"].dtype == torch.float64
    steps = logged_losses(logs, name)
    assert len(steps) >= 2 and all({"contrastive_loss", "class_loss"} <= set(s) for s in steps)
    return sd, steps


@pytest.mark.parametrize("launcher,nproc", [(("-m", "open_clip_train.main"), None),
                                            (("-m", "training.main"), None),
                                            (("-m", "training.main"), 1)],
                         ids=["open_clip_train.main", "training.main", "torchrun-training.main"])
def test_command_forms_train_and_checkpoint(tmp_path, csv_data, launcher, nproc):
    _ok(run_trainer(base_args(csv_data, tmp_path), launcher=launcher, nproc=nproc))
    _assert_superclip_run(tmp_path)


def test_amp_bf16_run(tmp_path, csv_data):
    _ok(run_trainer(base_args(csv_data, tmp_path) + ["--precision", "amp_bf16"]))
    _assert_superclip_run(tmp_path)


def _probe_run(args, record, configs=None):
    """run_trainer through tests/trainer_probe.py, which records what the trainer built into `record`."""
    record.mkdir(parents=True, exist_ok=True)
    env = {"SUPERCLIP_PROBE_DIR": str(record), **({"SUPERCLIP_PROBE_MODEL_CONFIGS": str(configs)} if configs else {})}
    _ok(run_trainer(args, launcher=(str(Path(__file__).with_name("trainer_probe.py")),), env_extra=env))


def test_superflip_run_trains_a_model_that_drops_half_the_patches(tmp_path, csv_data):
    """--force-patch-dropout reaches the model the trainer builds: every training forward keeps CLS + 32 of
    the 64 patch tokens (the head's use of exactly those is test_model's patch-dropout test)."""
    _probe_run(base_args(csv_data, tmp_path / "logs") + ["--force-patch-dropout", "0.5"], tmp_path / "record")
    _assert_superclip_run(tmp_path / "logs")
    record = tmp_path / "record" / "patch_dropout.jsonl"  # absent if the model has no PatchDropout module
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    assert calls == [{"training": True, "prob": 0.5, "tokens_in": 65, "tokens_out": 33}] * 2  # 2 steps


def _class_loss_reference(token_rows, logits):
    """SPEC.md's class loss in float64 for a first batch (IDF counts = this batch's): tokens strictly between
    SOT and EOT, w = log((N + 1) / (df + 1)), targets w / sum(w), mean of -sum(target * log_softmax)."""
    sets = [set(row[1:row.index(49407)]) for row in token_rows.tolist()]
    df = {}
    for tokens in sets:
        for t in tokens:
            df[t] = df.get(t, 0) + 1
    n, total = len(sets), 0.0
    for tokens, row in zip(sets, logits.double()):
        weights = {t: math.log((n + 1) / (df[t] + 1)) for t in tokens}
        norm = sum(weights.values())
        if norm > 0:
            log_probs = torch.log_softmax(row, dim=0)
            total -= sum(w / norm * log_probs[t].item() for t, w in weights.items())
    return total / n


def test_supersiglip_model_trains_with_siglip_loss_plus_lambda_class_loss_on_clip_bpe(tmp_path, csv_data):
    """A SuperSigLIP-* model (a tiny one registered for the test: the name is what selects the loss and the
    tokenizer) trains with open_clip's SigLipLoss inside ClassificationAugmentedLoss, without --siglip; the
    first step's losses equal SigLIP's on the same features and lambda x the float64 class loss formula; the
    captions are CLIP BPE tokens (the class vocabulary), not the SigLIP T5 tokenizer's."""
    import open_clip
    from open_clip.loss import SigLipLoss
    from open_clip.tokenizer import SimpleTokenizer
    configs = tmp_path / "configs"
    configs.mkdir()
    config = dict(open_clip.get_model_config("SuperCLIP-ViT-Tiny"), init_logit_scale=math.log(10), init_logit_bias=-10.0)
    (configs / "SuperSigLIP-ViT-Tiny.json").write_text(json.dumps(config))
    args = base_args(csv_data, tmp_path / "logs", model="SuperSigLIP-ViT-Tiny") + [
        "--superclip-lambda", "0.5", "--superclip-loss-impl", "dense"]
    _probe_run(args, tmp_path / "record", configs)
    sd, steps = _assert_superclip_run(tmp_path / "logs")
    # SigLIP's init. The name sets args.siglip, after which the run takes the path --siglip on a SuperCLIP model
    # takes (main's SigLIP init kwargs through our model factory, create_loss's SigLipLoss): this run covers both
    assert sd["logit_bias"].item() == pytest.approx(-10, abs=0.1)
    assert sd["logit_scale"].item() == pytest.approx(math.log(10), abs=0.1)

    call = torch.load(tmp_path / "record" / "loss_call_0.pt", weights_only=False)
    assert call["contrastive_type"] == "open_clip.loss.SigLipLoss" and call["class_loss_weight"] == 0.5
    inputs, losses = call["kwargs"], call["losses"]
    assert call["prior"][1].item() == 0 and not call["prior"][0].any()  # the first call: no counts before it
    tokens = inputs["class_tokens"]
    captions = [line.split("\t")[1] for line in csv_data.read_text().splitlines()[1:]]
    bpe_rows = {tuple(row) for row in SimpleTokenizer()(captions).tolist()}
    assert tokens.shape == (8, 77) and all(tuple(row) in bpe_rows for row in tokens.tolist())
    siglip = SigLipLoss()(inputs["image_features"], inputs["text_features"], inputs["logit_scale"],
                          inputs["logit_bias"], output_dict=True)["contrastive_loss"]
    assert losses["contrastive_loss"].item() == pytest.approx(siglip.item(), rel=1e-6)
    assert losses["class_loss"].item() == pytest.approx(0.5 * _class_loss_reference(tokens, inputs["class_logits"]),
                                                        rel=1e-5)
    assert steps[0]["loss"] == pytest.approx(losses["contrastive_loss"].item() + losses["class_loss"].item(), rel=1e-4)


def test_webdataset_shards(tmp_path):
    shards = make_wds(tmp_path / "wds", n=N, shards=2)
    args = base_args(shards, tmp_path / "logs", dataset_type="webdataset") + ["--train-num-samples", str(N)]
    _ok(run_trainer(args))
    _assert_superclip_run(tmp_path / "logs")


def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, csv_data):
    # full-batch epochs: a single process shuffles with the global RNG, DDP with DistributedSampler, so only
    # the whole dataset is the same global batch in both
    # (--wd 0: timm optimizers skip no_weight_decay() on a DDP-wrapped model, a stock difference)
    sgd = ["--opt", "timm/sgd", "--lr", "0.05", "--wd", "0", "--gather-with-grad", "--lr-scheduler", "const"]
    one = base_args(csv_data, tmp_path / "one", batch=N, epochs=2) + sgd
    two = base_args(csv_data, tmp_path / "two", batch=N // 2, epochs=2) + sgd
    _ok(run_trainer(one))
    _ok(run_trainer(two, nproc=2))
    sd1, steps1 = _assert_superclip_run(tmp_path / "one", epoch=2, captions=2 * N)
    sd2, _ = _assert_superclip_run(tmp_path / "two", epoch=2, captions=2 * N)
    steps2 = logged_losses(tmp_path / "two")
    assert [s["contrastive_loss"] for s in steps1] == pytest.approx([s["contrastive_loss"] for s in steps2], abs=1e-5)
    assert torch.equal(sd1["class_idf.doc_freq"], sd2["class_idf.doc_freq"])
    assert sd1.keys() == sd2.keys()
    for key in sd1:
        torch.testing.assert_close(sd1[key], sd2[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.fixture(scope="module")
def accum_runs(tmp_path_factory, csv_data):
    """One optimizer step over the 16 samples: batch 16, and batch 8 with --accum-freq 2 under each class-loss
    implementation. {label: (state dict, logged steps)}, shared by the two tests below.

    SGD, whose update is lr x the gradient, so the weights show the gradients themselves: AdamW's first update
    is about lr x sign(gradient), blind to a gradient that is off by a factor. One step, because open_clip_train's
    accumulation loop gives logit_scale K times its gradient (see the test below), which a second step would
    spread to every weight."""
    root = tmp_path_factory.mktemp("accum")
    sgd = ["--opt", "timm/sgd", "--lr", "0.05", "--wd", "0", "--lr-scheduler", "const"]
    runs = {}
    for label, batch, extra in (("big", N, ["--superclip-loss-impl", "chunked"]),
                                ("accum-chunked", N // 2, ["--accum-freq", "2", "--superclip-loss-impl", "chunked"]),
                                ("accum-dense", N // 2, ["--accum-freq", "2", "--superclip-loss-impl", "dense"])):
        _ok(run_trainer(base_args(csv_data, root / label, batch=batch) + sgd + extra))
        impl = extra[extra.index("--superclip-loss-impl") + 1]
        assert f"class loss impl={impl}" in (root / label / "run" / "out.log").read_text()
        sd = checkpoint(root / label)["state_dict"]
        assert sd["class_idf.num_captions"].item() == N
        runs[label] = (sd, logged_losses(root / label))
    return runs


def test_accum_freq_equals_one_step_on_the_larger_batch(accum_runs):
    """Logged losses, IDF counts and the weights after the step (which no logged loss shows)."""
    (sd_big, steps_big), (sd_acc, steps_acc) = accum_runs["big"], accum_runs["accum-chunked"]
    assert len(steps_big) == len(steps_acc) == 1
    for key in ("class_loss", "contrastive_loss"):
        assert steps_acc[0][key] == pytest.approx(steps_big[0][key], abs=1e-5)
    assert torch.equal(sd_big["class_idf.doc_freq"], sd_acc["class_idf.doc_freq"])
    assert sd_big.keys() == sd_acc.keys()
    for key in sd_big.keys() - {"logit_scale"}:
        torch.testing.assert_close(sd_acc[key], sd_big[key], rtol=0, atol=1e-6, msg=key)
    # stock open_clip_train: each of the K re-runs backpropagates the whole loss into logit_scale (it is not
    # concatenated like the features), so its gradient is K times the large batch's: with SGD, twice the step
    init = math.log(1 / 0.07)
    assert sd_acc["logit_scale"].item() - init == pytest.approx(2 * (sd_big["logit_scale"].item() - init), rel=1e-3)


def test_loss_impl_flag_selects_the_chunked_kernel_with_the_same_training(accum_runs):
    """--superclip-loss-impl chunked reaches the model and trains as dense does (here with --accum-freq 2)."""
    (sd_dense, steps_dense), (sd_chunked, steps_chunked) = accum_runs["accum-dense"], accum_runs["accum-chunked"]
    for key in ("class_loss", "contrastive_loss"):
        assert [s[key] for s in steps_chunked] == pytest.approx([s[key] for s in steps_dense], abs=1e-4)
    assert sd_dense.keys() == sd_chunked.keys()
    for key in sd_dense:
        torch.testing.assert_close(sd_chunked[key], sd_dense[key], rtol=1e-4, atol=1e-6, msg=key)


def test_resume_restores_statistics_and_matches_uninterrupted_run(tmp_path, csv_data):
    # one full-batch step per epoch: the stock CSV loader reshuffles from the global RNG, which resume resets
    full = ["--lr-scheduler", "const"]
    _ok(run_trainer(base_args(csv_data, tmp_path, "straight", batch=N, epochs=3) + full))
    _ok(run_trainer(base_args(csv_data, tmp_path, "stopped", batch=N, epochs=1) + full))
    resumed = base_args(csv_data, tmp_path, "stopped", batch=N, epochs=3) + full + ["--resume", "latest"]
    _ok(run_trainer(resumed))
    straight = checkpoint(tmp_path, "straight", 3)["state_dict"]
    stopped = checkpoint(tmp_path, "stopped", 3)["state_dict"]
    assert straight["class_idf.num_captions"].item() == 3 * N
    assert torch.equal(straight["class_idf.doc_freq"], stopped["class_idf.doc_freq"])
    assert straight.keys() == stopped.keys()
    for key in straight:  # the batch order differs (resume reseeds the loader): float summation order only
        torch.testing.assert_close(straight[key], stopped[key], atol=1e-5, rtol=1e-5, msg=key)


def test_stock_run_is_bit_identical_with_the_plugin_installed(tmp_path, csv_data):
    model = write_tiny_stock_config(tmp_path / "stock_model")
    runs = {}
    for label, env in (("plugin", {}), ("vanilla", {"OPEN_CLIP_DISABLE_PLUGINS": "1"})):
        args = base_args(csv_data, tmp_path / label, model=model)
        args[args.index("--logs-dir")] = "--logs"  # the stock parser has no --logs-dir
        _ok(run_trainer(args, launcher=("-m", "open_clip_train.main"), env_extra=env))
        runs[label] = (logged_losses(tmp_path / label), checkpoint(tmp_path / label)["state_dict"])
    (losses_a, sd_a), (losses_b, sd_b) = runs["plugin"], runs["vanilla"]
    assert losses_a == losses_b and len(losses_a) == 2 and "class_loss" not in losses_a[0]
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


# Test-local start-up code for the 2-process webdataset runs below (its folder goes on PYTHONPATH), written
# independently of the plugin. SUPERCLIP_TEST_WDS_IN_ORDER: open_clip_train.data's sample shuffle
# (`wds.shuffle`, seeded from the pid and the clock) passes samples through in order; the shard shuffle before it
# is seeded by --seed and the epoch, and each of the 2 ranks gets 1 of the 2 shards (wds.split_by_node), so the
# order is fixed. SUPERCLIP_TEST_CPU_DDP: stock open_clip_train passes device_ids=[cpu device] to DDP, which a
# CPU module rejects; this turns that into device_ids=None, for the run without the plugin (whose own shim does
# the same).
SITECUSTOMIZE = """
import os

if os.environ.get("SUPERCLIP_TEST_WDS_IN_ORDER"):
    import webdataset

    def _in_order(*args, **kwargs):
        return lambda samples: samples

    webdataset.shuffle = _in_order

if os.environ.get("SUPERCLIP_TEST_CPU_DDP"):
    import torch
    import torch.nn.parallel

    class _CpuDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = _CpuDistributedDataParallel
"""


@pytest.fixture(scope="module")
def ddp_wds_runs(tmp_path_factory):
    """2-process torchrun runs on webdataset shards (2 steps of 2 x 4 samples), in a fixed sample order:
    ``vanilla``: a stock model (SuperCLIP-ViT-Tiny's towers, no head) with OPEN_CLIP_DISABLE_PLUGINS=1;
    ``plugin``: the same run with the plugin loaded; ``lambda0``: SuperCLIP-ViT-Tiny with --superclip-lambda 0.
    {label: (state dict without the ``module.`` prefix, logged steps)}."""
    root = tmp_path_factory.mktemp("ddp_wds")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    shards = make_wds(root / "wds", n=N, shards=2)
    stock_model = write_tiny_stock_config(root / "stock_model")
    # explicit AdamW settings: open_clip picks defaults from the model name, and local-dir: names hold no "vit"
    adam = ["--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--train-num-samples", str(N)]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(root / "site"), os.environ.get("PYTHONPATH")])),
           "SUPERCLIP_TEST_WDS_IN_ORDER": "1"}
    runs = {}
    for label, model, launcher, extra_env, extra in (
            ("vanilla", stock_model, "open_clip_train.main", {"OPEN_CLIP_DISABLE_PLUGINS": "1",
                                                              "SUPERCLIP_TEST_CPU_DDP": "1"}, []),
            ("plugin", stock_model, "open_clip_train.main", {}, []),
            ("lambda0", "SuperCLIP-ViT-Tiny", "training.main", {}, ["--superclip-lambda", "0"])):
        args = base_args(shards, root / label, model=model, batch=N // 4, dataset_type="webdataset") + adam + extra
        args[args.index("--logs-dir"):args.index("--logs-dir") + 2] = []  # the stock parser has no --logs-dir:
        (root / label).mkdir()                                               # the default ./logs, in cwd
        _ok(run_trainer(args, launcher=("-m", launcher), nproc=2, env_extra={**env, **extra_env}, cwd=root / label))
        sd = checkpoint(root / label / "logs")["state_dict"]
        runs[label] = ({k.removeprefix("module."): v for k, v in sd.items()}, logged_losses(root / label / "logs"))
    return runs


def test_stock_ddp_webdataset_run_is_bit_identical_with_the_plugin_installed(ddp_wds_runs):
    (sd_plugin, steps_plugin), (sd_vanilla, steps_vanilla) = ddp_wds_runs["plugin"], ddp_wds_runs["vanilla"]
    assert len(steps_vanilla) == 2 and "class_loss" not in steps_vanilla[0]
    assert steps_plugin == steps_vanilla
    assert sd_plugin.keys() == sd_vanilla.keys()
    assert all(torch.equal(sd_plugin[k], sd_vanilla[k]) for k in sd_vanilla)


def test_lambda_0_under_ddp_trains_plain_clip_with_no_unused_parameters(ddp_wds_runs):
    """--superclip-lambda 0 builds the model without the head (a head outside the loss would be an unused
    parameter, which DDP with find_unused_parameters off rejects): 2 DDP steps train, and what trains is stock
    CLIP, bit for bit the run without the plugin."""
    (sd, steps), (sd_vanilla, steps_vanilla) = ddp_wds_runs["lambda0"], ddp_wds_runs["vanilla"]
    assert not any(k.startswith(("class_head", "class_idf")) for k in sd)
    assert steps == steps_vanilla and len(steps) == 2
    assert sd.keys() == sd_vanilla.keys() and all(torch.equal(sd[k], sd_vanilla[k]) for k in sd_vanilla)


def test_lambda_turns_a_stock_vit_into_superclip_and_zero_gives_plain_clip(tmp_path, csv_data):
    model = write_tiny_stock_config(tmp_path / "stock_model")
    _ok(run_trainer(base_args(csv_data, tmp_path / "on", model=model) + ["--superclip-lambda", "1"]))
    _assert_superclip_run(tmp_path / "on")
    _ok(run_trainer(base_args(csv_data, tmp_path / "off") + ["--superclip-lambda", "0"]))
    sd = checkpoint(tmp_path / "off")["state_dict"]
    assert not any(k.startswith(("class_head", "class_idf")) for k in sd)
    assert "class_loss" not in logged_losses(tmp_path / "off")[0]


@pytest.mark.parametrize("extra,model,message", [
    (["--superclip-lambda", "-1"], "SuperCLIP-ViT-Tiny", "--superclip-lambda must be a finite number >= 0"),
    (["--superclip-idf", "bogus"], "SuperCLIP-ViT-Tiny", "--superclip-idf must be one of"),
    (["--superclip-lambda", "1"], "RN50", "cannot be used with --model RN50"),
    (["--superclip-idf", "none"], "RN50", "--superclip-idf has no effect"),
])
def test_bad_flags_exit_2_and_write_nothing(tmp_path, csv_data, extra, model, message):
    result = run_trainer(base_args(csv_data, tmp_path / "logs", model=model) + extra)
    assert result.returncode == 2
    assert message in result.stderr and "usage:" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_help_lists_our_group():
    result = run_trainer(["--help"])
    assert result.returncode == 0
    assert "SuperCLIP (open_clip_superclip):" in result.stdout and "--superclip-lambda FLOAT" in result.stdout


def test_short_aliases_get_vit_optimizer_defaults():
    from open_clip_train.params import parse_args
    for name in ("SuperCLIP-L-14", "SuperCLIP-ViT-L-14", "ViT-B-16"):
        args = parse_args(["--model", name])
        assert (args.beta2, args.eps) == (0.98, 1e-6), name
    assert parse_args(["--model", "RN50"]).beta2 == 0.999
    assert parse_args(["--model", "SuperSigLIP-B-16"]).siglip
