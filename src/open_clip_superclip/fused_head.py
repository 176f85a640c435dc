"""Fused class head + logsumexp for the SuperCLIP class loss (the ``chunked`` implementation).

The class loss only needs, per sample, the log-partition ``logsumexp_v z[v]`` and the logits of the caption's
tokens, where ``z = x @ W.T + b`` spans the whole 49408-token vocabulary. Materialising ``z`` (and its softmax,
the dense targets and their gradients) costs several ``[B, V]`` fp32 buffers. Here the batch is swept a chunk
of rows at a time, so at most ``[rows, V]`` exists at once.

Why it is as fast as the dense formula: the gradient of ``lse`` with respect to ``z`` is the softmax, so the
forward pass, which has each chunk's softmax at hand anyway, also accumulates ``softmax @ W`` (for the input
gradient) and ``softmax.T @ x`` (for the weight gradient). Backward then scales them by the incoming gradient
instead of recomputing ``z``: three large matmuls in all, as in dense. That scaling is exact for the input
gradient; for the weight and bias gradients it assumes one common ``dlse`` for every row, which is what a
mean-reduced loss gives. Rows whose ``dlse`` differs from the common value (e.g. captions without targets,
``dlse = 0``) get an exact correction from their recomputed softmax, so any gradient is handled exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["fused_head_logsumexp", "dense_head_logsumexp"]


def _accumulate_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation (the loss is computed in fp32 even under AMP), fp64 kept for fp64 inputs."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _softmax_rows(xc: Tensor, w: Tensor, b: Tensor, acc_dtype: torch.dtype, token_ids=None):
    """(softmax, lse, token logits or None) of a chunk of rows: one matmul in the compute dtype, then every
    step in place in one [rows, V] buffer of the accumulation dtype (logsumexp would allocate a second one)."""
    z = torch.addmm(b, xc, w.t()).to(acc_dtype)
    token_logits = None if token_ids is None else z.gather(1, token_ids)
    top = z.amax(dim=1, keepdim=True)
    p = z.sub_(top).exp_()
    total = p.sum(dim=1, keepdim=True)
    return p.div_(total), (top + total.log()).squeeze(1), token_logits


def _sweep(x, weight, bias, token_ids, chunk_rows, compute_dtype, need_x, need_w, need_b):
    """lse, token logits, and the softmax products softmax @ W, softmax.T @ x, softmax.sum(0) (where needed)."""
    acc_dtype = _accumulate_dtype(compute_dtype)
    batch, dev = x.shape[0], x.device
    w, b = weight.to(compute_dtype), bias.to(compute_dtype)
    lse = torch.empty(batch, dtype=acc_dtype, device=dev)
    token_logits = torch.empty(token_ids.shape, dtype=acc_dtype, device=dev)
    soft_w = torch.empty(x.shape, dtype=acc_dtype, device=dev) if need_x else None
    # softmax.T @ x accumulates in place in the matmul dtype: under AMP a 16-bit [V, W] buffer, no fp32 temporaries
    soft_x = torch.zeros(weight.shape, dtype=compute_dtype, device=dev) if need_w else None
    soft_sum = torch.zeros(bias.shape, dtype=acc_dtype, device=dev) if need_b else None
    for start in range(0, batch, chunk_rows):
        rows = slice(start, start + chunk_rows)
        xc = x[rows].to(compute_dtype)
        p, lse[rows], token_logits[rows] = _softmax_rows(xc, w, b, acc_dtype, token_ids[rows])
        if need_b:
            soft_sum += p.sum(dim=0)
        pc = p.to(compute_dtype)
        if need_x:
            soft_w[rows] = pc @ w
        if need_w:
            soft_x.addmm_(pc.t(), xc)
    return lse, token_logits, [soft_w, soft_x, soft_sum]


_TOKEN_CHUNK_ELEMENTS = 1 << 21  # rows of the token-logit gradient are taken ~8 MB of fp32 at a time


class _FusedHeadLogSumExp(torch.autograd.Function):
    """Row-chunked forward that also accumulates the softmax products backward needs; see the module docstring.

    Autocast is switched off inside both passes and the casts are done explicitly with the dtype chosen at
    forward time, so the matmuls use the same precision whatever the autocast state of the thread running
    backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, token_ids, chunk_rows, compute_dtype, grad_enabled):
        need = [grad_enabled and n for n in ctx.needs_input_grad[:3]]
        with torch.autocast(x.device.type, enabled=False):
            lse, token_logits, products = _sweep(x, weight, bias, token_ids, chunk_rows, compute_dtype, *need)
        ctx.chunk_rows = chunk_rows
        ctx.compute_dtype = compute_dtype
        ctx.save_for_backward(x, weight, bias, token_ids)
        ctx.products = products  # backward turns them into the gradients in place, then drops them
        return lse, token_logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse, grad_tokens):
        x, weight, bias, token_ids = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        compute_dtype, chunk_rows = ctx.compute_dtype, ctx.chunk_rows
        acc_dtype = _accumulate_dtype(compute_dtype)
        with torch.autocast(x.device.type, enabled=False):
            if ctx.products is None:  # a second backward (retain_graph=True): sweep again
                ctx.products = _sweep(x, weight, bias, token_ids, chunk_rows, compute_dtype, need_x, need_w, need_b)[2]
            soft_w, soft_x, soft_sum = ctx.products
            ctx.products = None
            g_lse = grad_lse.to(acc_dtype)
            g_tok = grad_tokens.to(acc_dtype)
            # the dlse most rows share (all of them, for a mean-reduced loss); an empty batch has no gradient
            common = g_lse.median() if len(g_lse) else g_lse.new_zeros(())
            grad_x = g_lse[:, None] * soft_w if need_x else None
            grad_w = soft_x.to(acc_dtype).mul_(common) if need_w else None  # fp32 compute: in place, no copy
            del soft_x  # under AMP its 16-bit [V, W] buffer would otherwise stay beside grad_w to the end
            grad_b = soft_sum.mul_(common) if need_b else None
            odd = (g_lse != common).nonzero().squeeze(1) if need_w or need_b else ()
            if len(odd):  # exact correction for the rows whose dlse differs from the common one
                w, b = weight.to(compute_dtype), bias.to(compute_dtype)
                for start in range(0, len(odd), chunk_rows):
                    rows = odd[start:start + chunk_rows]
                    xc = x[rows].to(compute_dtype)
                    p = _softmax_rows(xc, w, b, acc_dtype)[0].mul_((g_lse[rows] - common)[:, None])
                    if need_b:
                        grad_b += p.sum(dim=0)
                    if need_w:  # in the accumulation dtype: no [V, W] temporaries under AMP
                        grad_w.addmm_(p.t(), xc.to(acc_dtype))
            # the token logits' part: grad_z[i, ids[i, l]] += g_tok[i, l]
            if need_x:
                grad_x += F.embedding_bag(token_ids, weight.to(acc_dtype), mode="sum", per_sample_weights=g_tok)
            if need_b:
                grad_b.index_add_(0, token_ids.reshape(-1), g_tok.reshape(-1))
            if need_w:
                step = max(1, _TOKEN_CHUNK_ELEMENTS // max(1, token_ids.shape[1] * x.shape[1]))
                for start in range(0, x.shape[0], step):
                    rows = slice(start, start + step)
                    contrib = g_tok[rows, :, None] * x[rows, None, :].to(acc_dtype)
                    grad_w.index_add_(0, token_ids[rows].reshape(-1), contrib.reshape(-1, x.shape[1]))
        return (None if grad_x is None else grad_x.to(x.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def fused_head_logsumexp(features: Tensor, weight: Tensor, bias: Tensor, token_ids: Tensor,
                         chunk_rows: int = 128) -> tuple[Tensor, Tensor]:
    """Return ``(lse [B], token_logits [B, L])`` of ``z = features @ weight.T + bias`` without building ``z``.

    ``lse[i] = logsumexp_v z[i, v]`` and ``token_logits[i, l] = z[i, token_ids[i, l]]``. At most
    ``[chunk_rows, V]`` logits exist at a time. Under autocast the matmuls run in the autocast dtype (as a
    dense ``nn.Linear`` would; fp64 inputs are left alone, as autocast does), the reductions in fp32. Outputs
    are fp64 for fp64 compute, fp32 otherwise.
    """
    if features.dim() != 2 or weight.dim() != 2 or bias.dim() != 1 or token_ids.dim() != 2:
        raise ValueError("expected features [B, W], weight [V, W], bias [V], token_ids [B, L]")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    device_type = features.device.type
    compute_dtype = torch.promote_types(torch.promote_types(features.dtype, weight.dtype), bias.dtype)
    if compute_dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    # grad mode as the caller has it (inside forward it is always off): no softmax products under no_grad
    return _FusedHeadLogSumExp.apply(features, weight, bias, token_ids, chunk_rows, compute_dtype,
                                     torch.is_grad_enabled())


def dense_head_logsumexp(features: Tensor, weight: Tensor, bias: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Same outputs the straightforward way, materialising the ``[B, V]`` logits (the benchmark baseline)."""
    z = F.linear(features, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return torch.logsumexp(z, dim=1), z.gather(1, token_ids)
