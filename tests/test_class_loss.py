"""The class loss against a direct, loop-by-loop implementation of SPEC.md's formulas (float64)."""
import math

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from open_clip_superclip import ClassificationAugmentedLoss, IDFStatistics
from open_clip_superclip.idf import caption_token_mask

V = 49408
CAPTIONS = [
    ["a dog on a dog bed", "a cat!! wow!~ !^", "", "a photo of a red red car", "! ! !|"],
    ["the dog", "a " + " ".join(["very"] * 100) + " long caption", "bird", "", "a cat"],
    ["two dogs and a cat", "hello! world!", "a photo", "a photo of a dog", "zebra"],
    ["", "", "a dog", "a dog", "dog dog dog"],
    ["a red car", "a blue car", "a car", "cars", "a photo of a cat and a dog!"],
    ["zebra crossing", "!", "dog", "another caption with numbers 1 2 3", "a photo"],
]


def reference_stream_losses(captions_stream, logits_stream, context_length=77, idf=True):
    """SPEC.md section 1, written out directly: online counts including the current batch."""
    tokenizer = SimpleTokenizer()
    df = {}
    n = 0
    losses = []
    for captions, logits in zip(captions_stream, logits_stream):
        token_sets = [set(tokenizer.encode(c)[:context_length - 2]) for c in captions]
        n += len(captions)
        for tokens in token_sets:
            for t in tokens:
                df[t] = df.get(t, 0) + 1
        total = 0.0
        for tokens, row in zip(token_sets, logits):
            weights = {t: (math.log((n + 1) / (df[t] + 1)) if idf else 1.0) for t in tokens}
            norm = sum(weights.values())
            if norm == 0:
                continue
            log_probs = torch.log_softmax(row, dim=0)
            total += -sum(w / norm * log_probs[t].item() for t, w in weights.items())
        losses.append(total / len(captions))
    return losses, df, n


class _ZeroContrastive(torch.nn.Module):
    def forward(self, image_features, text_features, logit_scale, output_dict=False):
        return {"contrastive_loss": image_features.sum() * 0}


def _stream_inputs(seed=0):
    tokenizer = SimpleTokenizer()
    generator = torch.Generator().manual_seed(seed)
    tokens = [tokenizer(c) for c in CAPTIONS]
    logits = [torch.randn(len(c), V, generator=generator, dtype=torch.float64) * 3 for c in CAPTIONS]
    return tokens, logits


def _run_loss(loss, tokens, logits, impl):
    feats = torch.zeros(tokens.shape[0], 4, dtype=torch.float64)
    if impl == "dense":
        class_outputs = {"class_logits": logits}
    else:
        class_outputs = {"class_logsumexp": torch.logsumexp(logits, dim=1),
                         "class_token_logits": logits.gather(1, tokens)}
    out = loss(feats, feats, torch.tensor(1.0), class_tokens=tokens, output_dict=True, **class_outputs)
    return out["class_loss"].item()


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("idf", ["online", "none"])
def test_class_loss_matches_reference_over_a_stream(impl, idf):
    tokens, logits = _stream_inputs()
    expected, df, n = reference_stream_losses(CAPTIONS, logits, idf=idf == "online")
    stats = IDFStatistics()
    loss = ClassificationAugmentedLoss(_ZeroContrastive(), 1.0, idf=idf, statistics=stats)
    got = [_run_loss(loss, t, lg, impl) for t, lg in zip(tokens, logits)]
    assert got == pytest.approx(expected, abs=1e-6, rel=1e-6)
    assert all(math.isfinite(v) for v in got)
    if idf == "online":
        assert stats.num_captions.item() == n
        dense_df = torch.zeros(V, dtype=torch.float64)
        for t, c in df.items():
            dense_df[t] = c
        assert torch.equal(stats.doc_freq, dense_df)
        assert stats.doc_freq[49406] == 0 and stats.doc_freq[49407] == 0
        assert stats.doc_freq[0] > 0  # "!" is a real token


def test_deferred_statistics_equal_per_call():
    tokens, logits = _stream_inputs(1)
    per_call = ClassificationAugmentedLoss(_ZeroContrastive(), 1.0, statistics=IDFStatistics())
    deferred = ClassificationAugmentedLoss(_ZeroContrastive(), 1.0, statistics=IDFStatistics(),
                                           statistics_update="on_commit")
    for t, lg in zip(tokens, logits):
        a = _run_loss(per_call, t, lg, "dense")
        b1 = _run_loss(deferred, t, lg, "dense")
        b2 = _run_loss(deferred, t, lg, "dense")  # an accumulation re-run: counted once
        deferred.commit_statistics()
        assert a == pytest.approx(b1, abs=1e-12) and b1 == b2
    assert torch.equal(per_call.statistics.doc_freq, deferred.statistics.doc_freq)


def test_lambda_scales_and_empty_batch_is_zero_not_nan():
    tokenizer = SimpleTokenizer()
    tokens = tokenizer(["", ""])
    logits = torch.randn(2, V, dtype=torch.float64)
    loss = ClassificationAugmentedLoss(_ZeroContrastive(), 1.6)
    assert _run_loss(loss, tokens, logits, "dense") == 0.0
    tokens = tokenizer(["a dog", "a cat"])
    base = ClassificationAugmentedLoss(_ZeroContrastive(), 1.0, idf="none")
    scaled = ClassificationAugmentedLoss(_ZeroContrastive(), 0.4, idf="none")
    assert _run_loss(scaled, tokens, logits, "dense") == pytest.approx(0.4 * _run_loss(base, tokens, logits, "dense"))


def test_fp32_under_autocast_and_large_logits():
    tokenizer = SimpleTokenizer()
    tokens = tokenizer(["a dog", "a cat on a mat"])
    logits = (torch.randn(2, V) * 1e4).to(torch.bfloat16)
    loss = ClassificationAugmentedLoss(_ZeroContrastive(), 1.0, idf="none")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor(1.0), class_tokens=tokens,
                   class_logits=logits, output_dict=True)
    assert out["class_loss"].dtype == torch.float32 and torch.isfinite(out["class_loss"])


def _bf16_exact_head(batch, width=8, seed=0):
    """Features, weight and bias whose head logits are exact in bf16 (and so in any matmul kernel's rounding):
    entries are multiples of 1/8 with |logit| <= 8 * 2 + 2 = 18, i.e. at most 144 units of 1/8, and bf16 holds
    every integer up to 256. The float64 product is then the very logit the bf16 head produces."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (batch, width), generator=generator).float()
    w = torch.randint(-16, 17, (V, width), generator=generator).float() / 8
    b = torch.randint(-16, 17, (V,), generator=generator).float() / 8
    return x, w, b, x.double() @ w.double().t() + b.double()


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_loss_on_bf16_logits_under_autocast_equals_float64_reference(impl):
    """SPEC: the class loss is computed in fp32 even under AMP. Under bf16 autocast the head's logits are bf16
    (dense: nn.Linear's output; chunked: the fused head's matmul); the loss on them must equal the float64
    formula on the same logits to ~1e-6 relative. A log-softmax taken in bf16 and cast to fp32 afterwards is
    off by ~5e-4 relative (each bf16 log-probability near -11 carries up to 0.03 of rounding)."""
    from open_clip_superclip.fused_head import fused_head_logsumexp
    captions = CAPTIONS[0] + CAPTIONS[4]
    tokens = SimpleTokenizer()(captions)
    x, w, b, logits64 = _bf16_exact_head(len(captions))
    (expected,), _, _ = reference_stream_losses([captions], [logits64])
    loss = ClassificationAugmentedLoss(_ZeroContrastive(), 1.0, statistics=IDFStatistics())
    feats = torch.zeros(len(captions), 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if impl == "dense":
            logits = torch.nn.functional.linear(x, w, b)
            assert logits.dtype == torch.bfloat16 and torch.equal(logits.double(), logits64)
            class_outputs = {"class_logits": logits}
        else:
            lse, token_logits = fused_head_logsumexp(x, w, b, tokens, chunk_rows=3)
            class_outputs = {"class_logsumexp": lse, "class_token_logits": token_logits}
        out = loss(feats, feats, torch.tensor(1.0), class_tokens=tokens, output_dict=True, **class_outputs)
    assert out["class_loss"].dtype == torch.float32
    assert out["class_loss"].item() == pytest.approx(expected, rel=1e-6, abs=0)


def test_token_mask_is_between_sot_and_eot():
    tokens = SimpleTokenizer()(["hi !"], context_length=8)[0]
    mask = caption_token_mask(tokens[None], 49406, 49407)[0]
    assert tokens[mask].tolist() == SimpleTokenizer().encode("hi !")


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_lambda_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="lambda"):
        ClassificationAugmentedLoss(_ZeroContrastive(), bad)


def test_unknown_idf_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown IDF mode 'bogus'"):
        ClassificationAugmentedLoss(_ZeroContrastive(), 1.0, idf="bogus")
