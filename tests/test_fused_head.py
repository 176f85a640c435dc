"""The fused chunked head must match the dense formula in values and gradients, and never build [B, V]."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from open_clip_superclip.fused_head import dense_head_logsumexp, fused_head_logsumexp


def _inputs(batch, width, vocab, length, dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, width, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    w = (torch.randn(vocab, width, generator=gen, dtype=torch.float64) * width ** -0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.1).to(dtype).requires_grad_()
    tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    if length > 1:
        tokens[0, 1] = tokens[0, 0]  # a token repeated within a row
    g_lse = torch.rand(batch, generator=gen, dtype=torch.float64).to(dtype)
    g_tok = -torch.rand(batch, length, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b, tokens, g_lse, g_tok


def _reference(x, w, b, tokens):
    """Dense float64 formula, written out independently of the module under test."""
    z = x.double() @ w.double().t() + b.double()
    return torch.logsumexp(z, dim=1), z.gather(1, tokens)


def _values_and_grads(fn, x, w, b, tokens, g_lse, g_tok):
    lse, tok = fn(x, w, b, tokens)
    grads = torch.autograd.grad((lse, tok), (x, w, b), (g_lse.to(lse.dtype), g_tok.to(tok.dtype)))
    return (lse, tok), grads


def _assert_close(actual, expected, rtol):
    """Tolerance relative to the largest reference entry, so near-zero entries do not dominate."""
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


SHAPES = [  # batch, width, vocab, length, rows per chunk
    (7, 8, 50, 5, 3),  # batch not a multiple of the chunk; odd vocabulary
    (6, 16, 64, 7, 3),  # batch a multiple of the chunk
    (1, 8, 37, 1, 8),  # B = 1, L = 1
    (5, 4, 30, 3, 64),  # one chunk larger than the batch
    (2, 6, 11, 4, 1),  # one row per chunk
]


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("batch,width,vocab,length,chunk", SHAPES)
def test_matches_dense_float64_reference(batch, width, vocab, length, chunk, dtype, rtol):
    args = _inputs(batch, width, vocab, length, dtype, scale=3.0)
    out, grads = _values_and_grads(lambda *a: fused_head_logsumexp(*a, chunk_rows=chunk), *args)
    ref_out, ref_grads = _values_and_grads(_reference, *args)
    assert out[0].dtype == out[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out[0].shape == (batch,) and out[1].shape == (batch, length)
    for got, want in zip(out + grads, ref_out + ref_grads):
        _assert_close(got, want, rtol)
    for grad, param in zip(grads, args[:3]):
        assert grad.dtype == param.dtype


@pytest.mark.parametrize("zero_rows", [(), (2,), (0, 3, 4)])
def test_mean_reduced_gradient_and_rows_without_targets(zero_rows):
    """The common case: one dlse for every row (the precomputed softmax products), a few rows at 0 (corrected)."""
    x, w, b, tokens, _, g_tok = _inputs(7, 8, 50, 5, torch.float64, scale=3.0, seed=4)
    g_lse = torch.full((7,), 1 / 7, dtype=torch.float64)
    g_lse[list(zero_rows)] = 0.0
    g_tok[list(zero_rows)] = 0.0
    args = (x, w, b, tokens, g_lse, g_tok)
    out, grads = _values_and_grads(lambda *a: fused_head_logsumexp(*a, chunk_rows=3), *args)
    ref_out, ref_grads = _values_and_grads(_reference, *args)
    for got, want in zip(out + grads, ref_out + ref_grads):
        _assert_close(got, want, 1e-10)


def test_no_grad_forward_computes_no_gradient_buffers():
    x, w, b, tokens, _, _ = _inputs(4, 8, 50, 5, torch.float32)
    with torch.no_grad(), _LargestTensor() as mode:
        lse, tok = fused_head_logsumexp(x, w, b, tokens, chunk_rows=2)
    assert mode.largest < 50 * 8  # no [V, W] softmax product was accumulated
    for got, want in zip((lse, tok), _reference(x, w, b, tokens)):
        _assert_close(got, want, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_logits_are_finite(dtype):
    """|z| ~ 1e4 would overflow a naive exp; the online logsumexp must stay finite and exact."""
    args = _inputs(4, 8, 50, 5, dtype, scale=1e4 / 3)
    out, grads = _values_and_grads(lambda *a: fused_head_logsumexp(*a, chunk_rows=2), *args)
    ref_out, ref_grads = _values_and_grads(_reference, *args)
    assert ref_out[1].abs().max() > 5e3
    for t in out + grads:
        assert torch.isfinite(t).all()
    for got, want in zip(out, ref_out):
        _assert_close(got, want, 1e-5 if dtype == torch.float32 else 1e-10)
    # fp32 logits of size 1e4 carry ~1e-3 absolute rounding, which the peaked softmax turns into ~1e-3
    # relative gradient error for any fp32 implementation, dense included.
    for got, want in zip(grads, ref_grads):
        _assert_close(got, want, 1e-2 if dtype == torch.float32 else 1e-10)


def test_bf16_autocast_matches_dense_under_autocast():
    args = _inputs(6, 32, 300, 6, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _values_and_grads(lambda *a: fused_head_logsumexp(*a, chunk_rows=2), *args)
        ref_out, ref_grads = _values_and_grads(dense_head_logsumexp, *args)
    assert out[0].dtype == out[1].dtype == torch.float32
    for got, want in zip(out + grads, ref_out + ref_grads):
        _assert_close(got, want, 2e-2)
    for grad in grads:
        assert grad.dtype == torch.float32


def test_gradcheck_float64():
    x, w, b, tokens, _, _ = _inputs(2, 3, 7, 3, torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b: fused_head_logsumexp(x, w, b, tokens, chunk_rows=1), (x, w, b))


def test_dense_helper_matches_reference():
    args = _inputs(3, 8, 40, 4, torch.float32)
    for got, want in zip(dense_head_logsumexp(*args[:4]), _reference(*args[:4])):
        _assert_close(got, want, 1e-5)


def test_only_needed_grads_are_computed():
    x, w, b, tokens, g_lse, g_tok = _inputs(3, 8, 40, 4, torch.float32)
    lse, tok = fused_head_logsumexp(x.detach(), w, b.detach(), tokens, chunk_rows=2)
    (grad_w,) = torch.autograd.grad((lse, tok), (w,), (g_lse, g_tok))
    ref_lse, ref_tok = _reference(x.detach(), w, b.detach(), tokens)
    (ref_w,) = torch.autograd.grad((ref_lse, ref_tok), (w,), (g_lse.double(), g_tok.double()))
    _assert_close(grad_w, ref_w, 1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op allocates (views and in-place results excluded), backward included."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # new storage only
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_batch_by_vocab():
    batch, width, vocab, chunk = 32, 4, 500, 2  # B * V = 16000 > V * W = 2000 (the weight grad) > chunk * V
    x, w, b, tokens, g_lse, g_tok = _inputs(batch, width, vocab, 3, torch.float32)
    with _LargestTensor() as mode:
        lse, tok = fused_head_logsumexp(x, w, b, tokens, chunk_rows=chunk)
        torch.autograd.grad((lse, tok), (x, w, b), (g_lse, g_tok))
    assert mode.largest == vocab * width
    with _LargestTensor() as mode:
        lse, tok = dense_head_logsumexp(x, w, b, tokens)
    assert mode.largest == batch * vocab  # the probe does see a [B, V] tensor when one is built


def test_empty_batch_has_zero_gradients_as_dense():
    x, w, b, tokens, _, _ = _inputs(0, 4, 9, 1, torch.float32)
    for fn in (fused_head_logsumexp, dense_head_logsumexp):
        lse, tok = fn(x, w, b, tokens)
        assert lse.shape == (0,) and tok.shape == (0, 1)
        grads = torch.autograd.grad((lse.sum() + tok.sum(),), (x, w, b))
        assert grads[0].shape == (0, 4) and all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


def test_rejects_bad_chunk():
    x, w, b, tokens, _, _ = _inputs(2, 3, 7, 2, torch.float32)
    with pytest.raises(ValueError):
        fused_head_logsumexp(x, w, b, tokens, chunk_rows=0)
