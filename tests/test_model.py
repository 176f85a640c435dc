import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from torch.utils._python_dispatch import TorchDispatchMode

from open_clip_superclip import ClassificationAugmentedLoss, SuperCLIP, list_superclip_models, to_stock_state_dict
from open_clip_superclip.model import ClassHead, check_head_attachable

from conftest import TINY

REQUIRED = ["SuperCLIP-ViT-B-16", "SuperCLIP-ViT-B-32", "SuperCLIP-ViT-L-14", "SuperCLIP-ViT-L-16",
            "SuperSigLIP-ViT-B-16", "SuperSigLIP-ViT-L-16", "SuperFLIP-ViT-B-16", "SuperFLIP-ViT-L-16"]


def test_configs_listed_with_aliases_and_stock_towers():
    listed = open_clip.list_models()
    for name in REQUIRED:
        alias = name.replace("ViT-", "")
        assert name in listed and alias in listed
        ours = open_clip.get_model_config(name)
        assert ours == open_clip.get_model_config(alias)
        stock = open_clip.get_model_config("ViT-" + name.split("-ViT-")[1])
        expected_vision = dict(stock["vision_cfg"], **({"patch_dropout": 0.5} if "FLIP" in name else {}))
        assert ours["vision_cfg"] == expected_vision and ours["text_cfg"] == stock["text_cfg"]
        assert ours["embed_dim"] == stock["embed_dim"]
    assert TINY in listed
    assert set(list_superclip_models()) <= set(listed)


def test_siglip_variant_uses_clip_bpe_tokenizer_and_siglip_init():
    tokenizer = open_clip.get_tokenizer("SuperSigLIP-ViT-B-16")
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)
    cfg = open_clip.get_model_config("SuperSigLIP-B-16")
    assert cfg["init_logit_bias"] == -10 and cfg["init_logit_scale"] == pytest.approx(2.302585, abs=1e-6)


# LayerNorm(width) weight + bias, then Linear(width, 49408) weight + bias: 2 * width + 49408 * (width + 1)
@pytest.mark.parametrize("width,params", [(768, 37_996_288), (1024, 50_645_248)])
def test_head_sizes_match_the_paper(width, params):
    # 38.0M for B/16 (768 wide), 50.6M for L (1024 wide); create_model of the full models is checked in the note
    assert params == 2 * width + 49408 * (width + 1)
    head = ClassHead(width, 49408)
    assert sum(p.numel() for p in head.parameters()) == params
    assert head.proj.bias.abs().sum() == 0
    assert head.proj.weight.std().item() == pytest.approx(width ** -0.5, rel=0.01)


def test_factory_builds_superclip_and_stock_clip_unchanged():
    assert type(open_clip.create_model(TINY)) is SuperCLIP
    stock = open_clip.create_model("ViT-S-32")
    assert type(stock) is CLIP and not hasattr(stock, "class_head")


def test_head_reads_mean_of_post_ln_patch_tokens_in_the_same_pass(tiny_model):
    model = tiny_model.train()
    model.class_loss_impl = "dense"
    images = torch.randn(3, 3, 64, 64)
    texts = open_clip.get_tokenizer(TINY)(["a dog", "a cat", "a car"])
    visual = model.visual
    calls = []
    handle = visual.register_forward_hook(lambda *a: calls.append(1))
    out = model(images, texts)
    handle.remove()
    assert len(calls) == 1  # one visual pass for both branches
    # manual pass through the visual tower
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(3, 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.transformer(visual.ln_pre(x))
    x = visual.ln_post(x)
    expected_logits = model.class_head(x[:, 1:].mean(dim=1))
    torch.testing.assert_close(out["class_logits"], expected_logits)
    torch.testing.assert_close(out["image_features"], F.normalize(x[:, 0] @ visual.proj, dim=-1))
    assert torch.equal(out["class_tokens"], texts)


def test_cls_branch_equals_stock_clip_on_same_weights(tiny_model):
    cfg = open_clip.get_model_config(TINY)
    cfg.pop("superclip_cfg")
    stock = CLIP(**cfg, output_dict=True)
    stock.load_state_dict(to_stock_state_dict(tiny_model.state_dict()))
    images = torch.randn(2, 3, 64, 64)
    texts = open_clip.get_tokenizer(TINY)(["a dog", "a cat"])
    for mode in ("eval", "train"):
        getattr(stock, mode)(), getattr(tiny_model, mode)()
        ours, theirs = tiny_model(images, texts), stock(images, texts)
        for key in ("image_features", "text_features", "logit_scale"):
            assert torch.equal(ours[key], theirs[key]), (mode, key)
    assert torch.equal(tiny_model.encode_image(images), stock.encode_image(images))


def test_chunked_and_dense_outputs_agree(tiny_model):
    model = tiny_model.train()
    images = torch.randn(4, 3, 64, 64)
    texts = open_clip.get_tokenizer(TINY)(["a dog", "a cat on a mat", "", "a red car"])
    losses = {}
    for impl in ("dense", "chunked"):
        model.class_loss_impl = impl
        loss = ClassificationAugmentedLoss(ClipLoss(), 1.0, idf="none")
        losses[impl] = loss(**model(images, texts), output_dict=True)["class_loss"]
    torch.testing.assert_close(losses["dense"], losses["chunked"], rtol=1e-5, atol=1e-5)


def test_auto_loss_impl_follows_the_measured_crossover(tiny_model):
    from open_clip_superclip.model import CPU_AUTOCAST_CHUNKED_MIN_ROWS, auto_class_loss_impl
    cpu, rows = torch.device("cpu"), CPU_AUTOCAST_CHUNKED_MIN_ROWS
    assert auto_class_loss_impl(torch.device("cuda"), 4096) == "dense"
    assert auto_class_loss_impl(cpu, 4) == auto_class_loss_impl(cpu, rows) == "chunked"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert auto_class_loss_impl(cpu, rows - 1) == "dense" and auto_class_loss_impl(cpu, rows) == "chunked"
    # through the model: the keys of the class outputs say which implementation ran
    model = tiny_model.train()
    assert model.class_loss_impl == "auto"
    images, texts = torch.randn(2, 3, 64, 64), open_clip.get_tokenizer(TINY)(["a dog", "a cat"])
    out = model(images, texts)
    assert "class_logsumexp" in out and "class_logits" not in out
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "class_logits" in model(images, texts)


class _HostReads(TorchDispatchMode):
    """Records the ops that make CUDA wait for the GPU: reading a value (item, bool()), ops whose output size
    depends on the data (nonzero, unique, boolean-mask indexing), value comparisons returning a bool. On CPU,
    tolist() and numpy() read memory without dispatching an op: the test wraps them with `record_call`."""
    DATA_DEPENDENT = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                      "repeat_interleave", "bincount", "equal", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.found = []

    def record_call(self, name, method):
        def recorded(tensor, *args, **kwargs):
            self.found.append(name)
            return method(tensor, *args, **kwargs)
        return recorded

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        mask_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if name in self.DATA_DEPENDENT or mask_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("idf", ["online", "online-on-commit", "none", "fixed"])
def test_cuda_default_training_step_never_waits_for_the_gpu(tiny_model, idf, monkeypatch):
    """On CUDA `auto` runs dense; its forward, class loss and backward must not read device values on the host
    (a sync per step stalls the GPU's queue). Checked on CPU through the ops dispatched."""
    model = tiny_model.train()
    model.class_loss_impl = "dense"
    kwargs = {"online": {"statistics": model.class_idf},
              "online-on-commit": {"statistics": model.class_idf, "statistics_update": "on_commit"},
              "none": {"idf": "none"}, "fixed": {"idf_weights": torch.rand(49408, dtype=torch.float64)}}[idf]
    loss = ClassificationAugmentedLoss(ClipLoss(), 1.0, **kwargs)
    images, texts = torch.randn(3, 3, 64, 64), open_clip.get_tokenizer(TINY)(["a dog", "a cat on a mat", ""])
    reads = _HostReads()
    for name in ("tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, reads.record_call(name, getattr(torch.Tensor, name)))
    with reads:
        losses = loss(**model(images, texts), output_dict=True)
        sum(losses.values()).backward()
    assert reads.found == []
    assert model.class_head.proj.weight.grad.abs().sum() > 0  # the class loss did take part


def test_patch_dropout_mean_runs_over_kept_patches():
    model = open_clip.create_model(TINY, force_patch_dropout=0.5, output_dict=True).train()
    model.class_loss_impl = "dense"
    kept = []
    model.visual.ln_post.register_forward_hook(lambda m, i, o: kept.append(o))
    model(torch.randn(2, 3, 64, 64), open_clip.get_tokenizer(TINY)(["a", "b"]))
    assert kept[0].shape[1] == 1 + 64 // 2


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_patch_dropout_head_reads_the_mean_of_exactly_the_kept_tokens_after_ln_post(impl):
    """SuperFLIP: the head's input is the mean of the kept patch tokens (CLS excluded) after ln_post, on both
    class-loss paths. The kept set is read off PatchDropout's own output and checked to be distinct patch
    tokens of its input; the reference then runs the rest of the tower on them by hand."""
    model = open_clip.create_model(TINY, force_patch_dropout=0.5, output_dict=True).train()
    model.class_loss_impl = impl
    visual, seen = model.visual, {}
    hooks = [visual.patch_dropout.register_forward_hook(lambda m, i, o: seen.update(all=i[0], kept=o)),
             model.class_head.norm.register_forward_pre_hook(lambda m, i: seen.update(head_input=i[0]))]
    images = torch.randn(3, 3, 64, 64)
    out = model(images, open_clip.get_tokenizer(TINY)(["a dog", "a cat", "a red car"]))
    for hook in hooks:
        hook.remove()
    assert ("class_logits" in out) == (impl == "dense")
    everything, kept = seen["all"], seen["kept"]
    assert everything.shape[1] == 1 + 64 and kept.shape[1] == 1 + 32  # 8 x 8 patches of 8 px, half kept
    assert torch.equal(kept[:, 0], everything[:, 0])  # CLS always kept
    for row in range(3):
        match = (kept[row, 1:, None, :] == everything[row, None, 1:, :]).all(dim=-1)  # [kept, all patches]
        assert match.sum(dim=1).tolist() == [1] * 32 and match.any(dim=0).sum() == 32  # 32 distinct patches
    with torch.no_grad():
        expected = visual.ln_post(visual.transformer(visual.ln_pre(kept)))[:, 1:].mean(dim=1)
    torch.testing.assert_close(seen["head_input"], expected)


def test_stock_checkpoint_loads_with_fresh_head_and_other_keys_strict(tmp_path, caplog):
    stock = open_clip.create_model("ViT-S-32")
    cfg = open_clip.get_model_config("ViT-S-32")
    path = tmp_path / "stock.pt"
    torch.save(stock.state_dict(), path)
    sc = SuperCLIP(**cfg)
    fresh_head = sc.class_head.proj.weight.clone()
    with caplog.at_level("INFO"):
        open_clip.load_checkpoint(sc, str(path))
    assert "class_head is not in the checkpoint" in caplog.text
    assert torch.equal(sc.class_head.proj.weight, fresh_head)
    assert torch.equal(sc.visual.proj, stock.visual.proj)
    broken = dict(stock.state_dict())
    broken.pop("visual.proj")
    with pytest.raises(RuntimeError, match="visual.proj"):
        sc.load_state_dict(broken)
    partial = dict(sc.state_dict())
    partial.pop("class_head.proj.bias")
    with pytest.raises(RuntimeError, match="class_head.proj.bias"):
        sc.load_state_dict(partial)


def test_round_trip_stock_superclip_stock():
    stock = open_clip.create_model("ViT-S-32")
    sc = SuperCLIP(**open_clip.get_model_config("ViT-S-32"))
    sc.load_state_dict(stock.state_dict())
    back = to_stock_state_dict(sc.state_dict())
    assert back.keys() == stock.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in stock.state_dict().items())
    prefixed = {"module." + k: v for k, v in sc.state_dict().items()}
    assert to_stock_state_dict(prefixed).keys() == {"module." + k for k in back}


def test_local_dir_save_and_load(tmp_path, tiny_model):
    tiny_model.class_idf.add_(torch.arange(49408, dtype=torch.float64), 100.0)
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save(tiny_model.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(TINY)}))
    loaded = open_clip.create_model(f"local-dir:{folder}")
    assert type(loaded) is SuperCLIP
    saved = tiny_model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(loaded.state_dict()[k], saved[k]) for k in saved)
    assert loaded.class_idf.doc_freq.dtype == torch.float64


def test_statistics_stay_float64_under_half():
    model = open_clip.create_model(TINY)
    model.class_idf.add_(torch.full((49408,), 123457.0, dtype=torch.float64), 1e6)
    model.half()
    assert model.class_idf.doc_freq.dtype == torch.float64 and model.class_idf.doc_freq[0] == 123457.0


def test_unknown_model_error_lists_our_models():
    with pytest.raises(RuntimeError, match="SuperCLIP-ViT-B-16"):
        open_clip.create_model("SuperCLIP-ViT-Q-99")


@pytest.mark.parametrize("model", ["RN50", "ViT-B-16-SigLIP"])
def test_head_cannot_attach_to_non_native_vit(model):
    with pytest.raises(ValueError, match="cannot attach"):
        check_head_attachable(open_clip.get_model_config(model)["vision_cfg"])
