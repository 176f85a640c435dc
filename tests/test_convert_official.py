"""`superclip convert-official`: checkpoints in the official hustvl/SuperCLIP key layout -> ours."""
import argparse

import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import save_file

from open_clip_superclip import ClassificationAugmentedLoss
from open_clip_superclip.state_dicts import CheckpointError, infer_official_model
from open_clip_superclip.tools.checkpoints import convert_official_main

from conftest import TINY
from trainer_utils import captions

G = 48  # the official run's global batch size in these tests (not a power of two: the scaling is not exact)
TEXT_TOWER = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def official_layout(state: dict, global_batch_size: int = G, stats_prefix: str = "") -> dict:
    """Our state dict renamed to the documented official layout (written independently of the converter)."""
    official = {}
    for key, value in state.items():
        if key.startswith("visual.") or key in ("logit_scale", "logit_bias"):
            official[key] = value
        elif key.startswith(TEXT_TOWER):
            official["text." + key] = value
        elif key.startswith("class_head.norm."):
            official["text_decoder.ln_mlp." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("class_head.proj."):
            official["text_decoder.text_projection." + key.rsplit(".", 1)[1]] = value
        elif key == "class_idf.doc_freq":  # running sum of per-step fractions of the global batch, [1, V]
            official[stats_prefix + "cap_fq"] = (value / global_batch_size).reshape(1, -1)
        elif key == "class_idf.num_captions":  # number of steps, [1, 1]
            official[stats_prefix + "num_samples"] = (value / global_batch_size).reshape(1, 1)
        else:
            raise AssertionError(f"unexpected key {key}")
    return official


@pytest.fixture(scope="module")
def ours():
    """A tiny SuperCLIP with a non-trivial head bias and IDF statistics of 10 official steps of 48 captions."""
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, output_dict=True)
    with torch.no_grad():
        model.class_head.proj.bias.normal_()
        model.class_head.norm.weight.uniform_(0.5, 1.5)
    model.class_idf.num_captions.fill_(10 * G)
    model.class_idf.doc_freq.copy_(torch.randint(0, 10 * G + 1, model.class_idf.doc_freq.shape).double())
    return model


def _class_loss_and_embeddings(model):
    torch.manual_seed(1)
    images = torch.randn(6, 3, 64, 64)
    tokens = open_clip.get_tokenizer(TINY)(captions(6, seed=5))
    model.train()
    loss = ClassificationAugmentedLoss(ClipLoss(), statistics=model.class_idf, statistics_update="on_commit")
    with torch.no_grad():
        out = model(images, tokens)
        class_loss = loss(**out, output_dict=True)["class_loss"]
    return class_loss, out["image_features"], out["text_features"]


@pytest.mark.parametrize("fmt", ["nested_module_pickle", "flat_safetensors"])
def test_round_trip_gives_the_same_model_and_class_loss(ours, tmp_path, fmt):
    official = official_layout(ours.state_dict(), stats_prefix="text_decoder." if fmt == "flat_safetensors" else "")
    source, out = tmp_path / "official.bin", tmp_path / "converted.pt"
    if fmt == "nested_module_pickle":  # a trainer checkpoint of a DDP run
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in official.items()}}, source)
    else:
        source = tmp_path / "official.safetensors"
        save_file({k: v.contiguous() for k, v in official.items()}, source)

    # --keep-token-0-count: the exact round trip (by default the count of id 0 is reset, tested below)
    assert convert_official_main([str(source), str(out), "--model", TINY, "--global-batch-size", str(G),
                                  "--keep-token-0-count"]) == 0
    converted = open_clip.create_model(TINY, pretrained=str(out), output_dict=True)  # a strict load
    torch.testing.assert_close(converted.class_idf.doc_freq, ours.class_idf.doc_freq, rtol=1e-12, atol=0)
    assert converted.class_idf.doc_freq.dtype == torch.float64
    assert float(converted.class_idf.num_captions) == pytest.approx(10 * G, rel=1e-12)
    expected_loss, expected_image, expected_text = _class_loss_and_embeddings(ours)
    loss, image, text = _class_loss_and_embeddings(converted)
    assert expected_loss > 0 and abs(float(loss) - float(expected_loss)) <= 1e-6 * float(expected_loss)
    assert torch.equal(image, expected_image) and torch.equal(text, expected_text)


def test_statistics_are_scaled_by_the_global_batch_size(ours, tmp_path, capsys):
    source = tmp_path / "official.pt"
    torch.save(official_layout(ours.state_dict()), source)
    out = tmp_path / "converted.pt"
    assert convert_official_main([str(source), str(out), "--model", TINY, "--global-batch-size", "16",
                                  "--keep-token-0-count"]) == 0
    assert "another global batch size" in capsys.readouterr().err  # 48-caption steps are not whole at G=16
    stats = torch.load(out, weights_only=True)
    assert float(stats["class_idf.num_captions"]) == pytest.approx(10 * 16)
    torch.testing.assert_close(stats["class_idf.doc_freq"], ours.class_idf.doc_freq * 16 / G)


def test_token_0_counted_as_padding_is_reset_to_unseen_and_said(ours, tmp_path, capsys):
    """The official cap_fq[0] counts padding (nearly every caption): by default it becomes 0, every other count
    stays; the note names the official count, and training then weights a real '!' like a token never seen."""
    state = ours.state_dict()
    state["class_idf.doc_freq"] = state["class_idf.doc_freq"].clone()
    state["class_idf.doc_freq"][0] = 10 * G - 3  # padded: all but 3 captions
    source, out = tmp_path / "official.pt", tmp_path / "converted.pt"
    torch.save(official_layout(state), source)
    assert convert_official_main([str(source), str(out), "--model", TINY, "--global-batch-size", str(G)]) == 0
    err = capsys.readouterr().err
    assert f"token id 0 ('!'): the official cap_fq counts padding there ({10 * G - 3} of {10 * G} captions" in err
    assert "set to 0" in err and "--keep-token-0-count" in err
    converted = torch.load(out, weights_only=True)["class_idf.doc_freq"]
    assert converted[0] == 0
    torch.testing.assert_close(converted[1:], state["class_idf.doc_freq"][1:], rtol=1e-12, atol=0)
    model = open_clip.create_model(TINY, pretrained=str(out), output_dict=True)
    caption = 'so cute!~'  # '!~' is one BPE word with no merge: "!" (id 0, the padding id) + '~</w>'
    assert 0 in open_clip.get_tokenizer(TINY)([caption])[0, 1:6].tolist()
    loss = ClassificationAugmentedLoss(ClipLoss(), statistics=model.class_idf, statistics_update="on_commit")
    ids, targets, _ = loss.class_targets(open_clip.get_tokenizer(TINY)([caption]))
    weights = dict(zip(ids[0].tolist(), targets[0].tolist()))
    # N + 1 captions with this one: "!" is now the rarest token of the caption, not a weight-0 one
    assert weights[0] > 0 and weights[0] == max(weights.values())


def _with(state, **changes):
    state = dict(state)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


BAD_CASES = {
    "unknown": (lambda s: {**s, "text.cls_emb": torch.zeros(128), "decoder.bias": torch.zeros(1)},
                ["text.cls_emb", "decoder.bias"]),
    "missing": (lambda s: _with(s, text_decoder__ln_mlp__bias=None, text__ln_final__weight=None, num_samples=None),
                ["text_decoder.ln_mlp.bias", "text.ln_final.weight", "num_samples"]),
    "wrong_shape": (lambda s: _with(s, text_decoder__text_projection__weight=torch.zeros(100, 128)),
                    ["text_decoder.text_projection.weight"]),
    "given_twice": (lambda s: {**s, "text_decoder.cap_fq": s["cap_fq"]}, ["text_decoder.cap_fq"]),
    "not_official": (lambda s: {k.replace("text.", "", 1) if k.startswith("text.") else k: v for k, v in s.items()},
                     ["token_embedding.weight", "transformer.resblocks.0.attn.in_proj_weight"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_keys_are_listed(ours, tmp_path, capsys, case):
    mutate, named = BAD_CASES[case]
    source, out = tmp_path / "official.pt", tmp_path / "converted.pt"
    torch.save(mutate(official_layout(ours.state_dict())), source)
    assert convert_official_main([str(source), str(out), "--model", TINY, "--global-batch-size", str(G)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and all(key in error for key in named), error
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["official.pt"]


def test_inconsistent_statistics_and_unsafe_pickles_are_refused(ours, tmp_path, capsys):
    official = official_layout(ours.state_dict())
    official["cap_fq"] = official["cap_fq"].clone()
    official["cap_fq"][0, 7] = 11.0  # more than num_samples (10 steps)
    torch.save(official, tmp_path / "a.pt")
    assert convert_official_main([str(tmp_path / "a.pt"), str(tmp_path / "out.pt"), "--model", TINY]) == 2
    assert "cap_fq must lie in [0, num_samples]" in capsys.readouterr().err

    torch.save({"state_dict": official_layout(ours.state_dict()), "args": argparse.Namespace(lr=1)}, tmp_path / "b.pt")
    assert convert_official_main([str(tmp_path / "b.pt"), str(tmp_path / "out.pt"), "--model", TINY]) == 2
    assert "weights_only=True" in capsys.readouterr().err and not (tmp_path / "out.pt").exists()


def test_model_is_inferred_from_the_vision_width(ours, tmp_path, capsys):
    assert infer_official_model({"visual.conv1.weight": torch.empty(768, 3, 16, 16)}) == "SuperCLIP-ViT-B-16"
    assert infer_official_model({"visual.conv1.weight": torch.empty(1024, 3, 16, 16)}) == "SuperCLIP-ViT-L-16"
    with pytest.raises(CheckpointError, match="pass --model"):
        infer_official_model({"visual.conv1.weight": torch.empty(128, 3, 8, 8)})
    torch.save(official_layout(ours.state_dict()), tmp_path / "tiny.pt")
    assert convert_official_main([str(tmp_path / "tiny.pt"), str(tmp_path / "out.pt")]) == 2
    assert "vision width 128" in capsys.readouterr().err
