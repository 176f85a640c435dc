"""IDF statistics of caption tokens: the weights SuperCLIP puts on each class target.

Only the tokens strictly between SOT and the first EOT count: SOT/EOT appear in every caption, and padding
id 0 is also the real token "!" (SPEC.md section 1).
"""
import torch
from torch import nn

CLIP_VOCAB_SIZE = 49408
CLIP_SOT_TOKEN_ID = 49406
CLIP_EOT_TOKEN_ID = 49407

IDF_MODES = ("online", "none")


def caption_token_mask(tokens: torch.Tensor, sot_token_id: int, eot_token_id: int) -> torch.Tensor:
    """Bool [B, L]: True for the caption's own tokens (after the first SOT, before the first EOT)."""
    seen_sot = (tokens == sot_token_id).cumsum(dim=1) > 0
    seen_eot = (tokens == eot_token_id).cumsum(dim=1) > 0
    is_sot_itself = (tokens == sot_token_id) & ((tokens == sot_token_id).cumsum(dim=1) == 1)
    return seen_sot & ~seen_eot & ~is_sot_itself


def distinct_caption_tokens(tokens: torch.Tensor, sot_token_id: int, eot_token_id: int, vocab_size: int):
    """The SET of token ids of each caption, as sorted ids [B, L] and a bool [B, L] marking one slot per id.

    Also returns the permutation that sorted each row, so per-position values (e.g. gathered logits) can
    follow the same order.
    """
    mask = caption_token_mask(tokens, sot_token_id, eot_token_id)
    keyed = torch.where(mask, tokens, torch.full_like(tokens, vocab_size))
    sorted_ids, order = keyed.sort(dim=1)
    first = torch.ones_like(mask)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    present = first & (sorted_ids < vocab_size)
    return sorted_ids.clamp_max(vocab_size - 1), present, order


def batch_document_frequency(token_ids: torch.Tensor, present: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float64 [V]: in how many captions of the batch each token occurs (once per caption)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64, device=token_ids.device)
    # weighted by `present` rather than boolean-indexed: no device-to-host sync on CUDA
    return counts.index_add_(0, token_ids.flatten(), present.flatten().to(torch.float64))


def idf_weights(doc_freq: torch.Tensor, num_captions: torch.Tensor) -> torch.Tensor:
    """w_v = log((N + 1) / (df_v + 1)), in float64."""
    doc_freq = doc_freq.to(torch.float64)
    return torch.log((num_captions.to(torch.float64) + 1.0) / (doc_freq + 1.0))


def validate_idf_mode(mode: str) -> str:
    if mode in IDF_MODES:
        return mode
    raise ValueError(
        f"unknown IDF mode {mode!r}: use 'online' (running counts over the training stream), "
        f"'none' (uniform weights) or a path to a file written by `superclip idf`")


class IDFStatistics(nn.Module):
    """Running document frequencies, kept as float64 buffers so that checkpoints carry them.

    The buffers never change dtype (``model.half()`` or ``.to(bfloat16)`` would destroy counts above 2**11).
    """

    def __init__(self, vocab_size: int = CLIP_VOCAB_SIZE):
        super().__init__()
        self.register_buffer("doc_freq", torch.zeros(vocab_size, dtype=torch.float64))
        self.register_buffer("num_captions", torch.zeros((), dtype=torch.float64))

    def _apply(self, fn, recurse=True):
        for name, buf in self._buffers.items():
            moved = fn(buf)
            self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(device=moved.device)
        return self

    def add_(self, doc_freq: torch.Tensor, num_captions: float) -> None:
        self.doc_freq.add_(doc_freq.to(self.doc_freq))
        self.num_captions.add_(num_captions)

    def extra_repr(self) -> str:
        return f"vocab_size={self.doc_freq.numel()}"
