"""Training with a precomputed IDF file (`--superclip-idf PATH`): fixed weights, every bad file a parse error."""
import math

import numpy as np
import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from open_clip_superclip.idf_counts import save_idf_counts, tokenizer_identity
from open_clip_superclip.tools.idf.counter import naive_doc_freq
from trainer_utils import captions

from conftest import TINY


@pytest.fixture
def counts_file(tmp_path):
    corpus = captions(200, seed=3)
    df, n = naive_doc_freq(corpus)
    path = tmp_path / "idf.npz"
    save_idf_counts(str(path), df, n, tokenizer_identity(SimpleTokenizer()))
    return path, df, n


def _parse(extra):
    from open_clip_train.params import parse_args
    return parse_args(["--model", TINY, "--device", "cpu", *extra])


def test_training_loss_uses_exactly_the_files_weights(counts_file):
    path, df, n = counts_file
    args = _parse(["--superclip-idf", str(path)])
    args.rank, args.world_size, args.distill, args.horovod = 0, 1, False, False
    model, _, _ = open_clip.create_model_and_transforms(TINY, output_dict=True)  # the trainer's own call
    loss = open_clip.create_loss(args)
    assert loss.idf == "fixed"
    expected = torch.log(torch.tensor(n + 1.0, dtype=torch.float64) / (torch.from_numpy(df).double() + 1))
    assert torch.equal(loss.fixed_idf_weights, expected)

    texts = SimpleTokenizer()(["a red car on the road", "a dog", "big big tree"])
    logits = torch.randn(3, 49408, dtype=torch.float64)
    out = loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor(1.0), class_tokens=texts, class_logits=logits,
               output_dict=True)
    reference = 0.0
    for row, caption in zip(logits, ["a red car on the road", "a dog", "big big tree"]):
        ids = set(SimpleTokenizer().encode(caption))
        w = {t: math.log((n + 1) / (df[t] + 1)) for t in ids}
        log_probs = torch.log_softmax(row, 0)
        reference += -sum(w[t] / sum(w.values()) * log_probs[t].item() for t in ids)
    assert out["class_loss"].item() == pytest.approx(reference / 3, rel=1e-9)
    assert model.class_idf.num_captions.item() == 0  # fixed weights: the running statistics stay untouched


def _bad_files(tmp_path, counts_file):
    path, df, n = counts_file
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file at all")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    small_vocab = tmp_path / "small.npz"
    save_idf_counts(str(small_vocab), np.minimum(df[:1000], n), n, "open_clip.SimpleTokenizer/x/1000")
    other_tok = tmp_path / "other_tokenizer.npz"
    save_idf_counts(str(other_tok), df, n, "open_clip.HFTokenizer/some-other/49408")
    return {"missing": (tmp_path / "nope.npz", "must be one of"), "corrupt": (corrupt, "corrupt.npz"),
            "truncated": (truncated, "truncated.npz"), "vocab": (small_vocab, "vocab_size 1000"),
            "tokenizer": (other_tok, "built with tokenizer")}


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "vocab", "tokenizer"])
def test_bad_idf_files_are_parse_errors(tmp_path, counts_file, capsys, case):
    bad, message = _bad_files(tmp_path, counts_file)[case]
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--superclip-idf", str(bad)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
