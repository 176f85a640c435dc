"""Fused class head + logsumexp for the SuperCLIP class loss.

The class loss only needs, per sample, the log-partition ``logsumexp_v z[v]`` and the logits of the caption's
tokens, where ``z = x @ W.T + b`` spans the whole 49408-token vocabulary. Materialising ``z`` (and its softmax
and gradient) costs several ``[B, V]`` fp32 buffers, which dominates activation memory at large batch. Here the
vocabulary is swept in chunks with an online logsumexp, and the backward pass recomputes each chunk's logits,
so peak extra memory is ``O(B * chunk_size)`` instead of ``O(B * V)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_head_logsumexp", "dense_head_logsumexp"]


def _accumulate_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation (the loss is computed in fp32 even under AMP), fp64 kept for fp64 inputs."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _chunk_logits(x: Tensor, weight: Tensor, bias: Tensor, start: int, end: int, compute_dtype: torch.dtype,
                  acc_dtype: torch.dtype) -> Tensor:
    """Logits of vocabulary rows [start, end): matmul in the compute dtype, result in the accumulation dtype."""
    w = weight[start:end].to(compute_dtype)
    b = bias[start:end].to(compute_dtype)
    return F.linear(x, w, b).to(acc_dtype)


def _chunk_tokens(token_ids: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
    """Mask of the token ids inside [start, end) and their (clamped, so always valid) column in the chunk."""
    inside = (token_ids >= start) & (token_ids < end)
    cols = (token_ids - start).clamp(0, end - start - 1)
    return inside, cols


class _FusedHeadLogSumExp(torch.autograd.Function):
    """Chunked forward with an online logsumexp; backward recomputes chunk logits instead of storing them.

    Autocast is switched off inside both passes and the casts are done explicitly with the dtype chosen at
    forward time, so the backward matmuls use the same precision as the forward whatever the autocast state
    of the thread running backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, token_ids, chunk_size, compute_dtype):
        acc_dtype = _accumulate_dtype(compute_dtype)
        batch, vocab = x.shape[0], weight.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(compute_dtype)
            run_max = torch.full((batch,), float("-inf"), dtype=acc_dtype, device=x.device)
            run_sum = torch.zeros(batch, dtype=acc_dtype, device=x.device)
            token_logits = torch.zeros(token_ids.shape, dtype=acc_dtype, device=x.device)
            for start in range(0, vocab, chunk_size):
                end = min(start + chunk_size, vocab)
                z = _chunk_logits(xc, weight, bias, start, end, compute_dtype, acc_dtype)
                inside, cols = _chunk_tokens(token_ids, start, end)
                token_logits = torch.where(inside, z.gather(1, cols), token_logits)
                new_max = torch.maximum(run_max, z.amax(dim=1))
                # in place: one [B, chunk] buffer per chunk
                run_sum = run_sum * torch.exp(run_max - new_max) + z.sub_(new_max[:, None]).exp_().sum(dim=1)
                run_max = new_max
            lse = run_max + torch.log(run_sum)
        ctx.chunk_size = chunk_size
        ctx.compute_dtype = compute_dtype
        ctx.save_for_backward(x, weight, bias, token_ids, lse)
        return lse, token_logits

    @staticmethod
    def backward(ctx, grad_lse, grad_tokens):
        x, weight, bias, token_ids, lse = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        compute_dtype, chunk_size = ctx.compute_dtype, ctx.chunk_size
        acc_dtype = _accumulate_dtype(compute_dtype)
        vocab = weight.shape[0]
        grad_x = torch.zeros(x.shape, dtype=acc_dtype, device=x.device) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(compute_dtype)
            grad_lse = grad_lse.to(acc_dtype)[:, None]
            grad_tokens = grad_tokens.to(acc_dtype)
            for start in range(0, vocab, chunk_size):
                end = min(start + chunk_size, vocab)
                z = _chunk_logits(xc, weight, bias, start, end, compute_dtype, acc_dtype)
                g = z.sub_(lse[:, None]).exp_().mul_(grad_lse)  # softmax * grad, in z's buffer
                inside, cols = _chunk_tokens(token_ids, start, end)
                g.scatter_add_(1, cols, torch.where(inside, grad_tokens, 0.0))
                if need_b:
                    grad_b[start:end] = g.sum(dim=0)
                gc = g.to(compute_dtype)
                if need_x:
                    grad_x += gc @ weight[start:end].to(compute_dtype)
                if need_w:
                    grad_w[start:end] = gc.t() @ xc
        if need_x:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def fused_head_logsumexp(features: Tensor, weight: Tensor, bias: Tensor, token_ids: Tensor,
                         chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Return ``(lse [B], token_logits [B, L])`` of ``z = features @ weight.T + bias`` without building ``z``.

    ``lse[i] = logsumexp_v z[i, v]`` and ``token_logits[i, l] = z[i, token_ids[i, l]]``. Under autocast the
    chunk matmuls run in the autocast dtype (as a dense ``nn.Linear`` would; fp64 inputs are left alone, as
    autocast does), the reductions in fp32. Outputs are fp64 for fp64 compute, fp32 otherwise.
    """
    if features.dim() != 2 or weight.dim() != 2 or bias.dim() != 1 or token_ids.dim() != 2:
        raise ValueError("expected features [B, W], weight [V, W], bias [V], token_ids [B, L]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device_type = features.device.type
    compute_dtype = torch.promote_types(torch.promote_types(features.dtype, weight.dtype), bias.dtype)
    if compute_dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    return _FusedHeadLogSumExp.apply(features, weight, bias, token_ids, chunk_size, compute_dtype)


def dense_head_logsumexp(features: Tensor, weight: Tensor, bias: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Same outputs the straightforward way, materialising the ``[B, V]`` logits (the benchmark baseline)."""
    z = F.linear(features, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return torch.logsumexp(z, dim=1), z.gather(1, token_ids)
