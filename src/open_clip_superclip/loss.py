"""ClassificationAugmentedLoss: open_clip's contrastive loss plus SuperCLIP's IDF-weighted token classification.

class loss = mean over the local batch of -sum_v t_v log softmax(logits)_v, with t_v = y_v w_v / sum_u y_u w_u
(y = the set of the caption's tokens, w = IDF weights); computed in fp32 (or fp64 for fp64 inputs) even under
autocast. A caption whose weights sum to 0 adds 0.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum
from .idf import (CLIP_EOT_TOKEN_ID, CLIP_SOT_TOKEN_ID, CLIP_VOCAB_SIZE, IDFStatistics, batch_document_frequency,
                  distinct_caption_tokens, idf_weights, validate_idf_mode)

STATISTICS_UPDATES = ("per_call", "on_commit")


def validate_class_loss_weight(weight: float) -> float:
    weight = float(weight)
    if not weight >= 0.0 or weight == float("inf"):
        raise ValueError(f"the class loss weight (lambda) must be a finite number >= 0, got {weight}")
    return weight


class ClassificationAugmentedLoss(nn.Module):
    """Wraps the contrastive loss open_clip built (ClipLoss, SigLipLoss, ... with their distributed settings).

    IDF modes: ``online`` (running counts over the stream, this batch included, summed over ranks),
    ``none`` (uniform weights), or fixed weights given as ``idf_weights``.

    ``statistics_update`` says when ``online`` counts join the running statistics:
    - ``per_call`` (default): every call counts its captions. Right for a loop that calls the loss once per
      optimizer step.
    - ``on_commit``: counts wait until `commit_statistics()` (call it after each optimizer step; the trainer
      does), so a step the optimizer skips can drop them (`discard_pending_statistics()`). Several calls before
      a commit are safe: a call whose class tokens equal the previous call's is a re-run of the same batch and
      adds nothing (open_clip_train's ``--accum-freq`` re-runs the loss on the whole accumulated batch once per
      micro-batch); a call with other captions (a loop calling the loss once per micro-batch) adds its counts.
      Weights always include every caption counted so far, the pending ones too. The check runs on the device:
      no host sync.
    """

    def __init__(
            self,
            contrastive_loss: nn.Module,
            class_loss_weight: float = 1.0,
            idf: str = "online",
            statistics: Optional[IDFStatistics] = None,
            idf_weights: Optional[torch.Tensor] = None,
            vocab_size: int = CLIP_VOCAB_SIZE,
            sot_token_id: int = CLIP_SOT_TOKEN_ID,
            eot_token_id: int = CLIP_EOT_TOKEN_ID,
            statistics_update: str = "per_call",
    ):
        super().__init__()
        self.contrastive_loss = contrastive_loss
        self.class_loss_weight = validate_class_loss_weight(class_loss_weight)
        if idf_weights is not None:
            if idf_weights.shape != (vocab_size,):
                raise ValueError(f"idf_weights must have shape ({vocab_size},), got {tuple(idf_weights.shape)}")
            self.idf = "fixed"
        else:
            self.idf = validate_idf_mode(idf)
        if statistics_update not in STATISTICS_UPDATES:
            raise ValueError(f"statistics_update must be one of {STATISTICS_UPDATES}, got {statistics_update!r}")
        self.statistics = statistics if statistics is not None or self.idf != "online" else IDFStatistics(vocab_size)
        self.fixed_idf_weights = None if idf_weights is None else idf_weights.to(torch.float64)
        self.vocab_size = vocab_size
        self.sot_token_id = sot_token_id
        self.eot_token_id = eot_token_id
        self.statistics_update = statistics_update
        self._pending = None  # on_commit: (doc freq [V], captions [1]) summed over ranks, not yet committed
        self._pending_tokens = None  # this rank's class tokens of the last call since the last commit

    def commit_statistics(self) -> None:
        """Adds the counts held since the last commit to the running statistics (``on_commit`` mode)."""
        if self._pending is not None:
            self.statistics.add_(*self._pending)
        self.discard_pending_statistics()

    def discard_pending_statistics(self) -> None:
        self._pending = self._pending_tokens = None

    def _new_on_this_rank(self, tokens: torch.Tensor) -> torch.Tensor:
        """0 if ``tokens`` repeat the last call's since the last commit (a re-run of that batch), else 1."""
        last, self._pending_tokens = self._pending_tokens, tokens.detach()
        if last is None or last.shape != tokens.shape or last.device != tokens.device:
            return torch.ones((), dtype=torch.float64, device=tokens.device)
        return (last != tokens).any().to(torch.float64)

    def _token_weights(self, ids: torch.Tensor, present: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.idf == "none":
            return torch.ones_like(ids, dtype=torch.float64)
        if self.idf == "fixed":
            if self.fixed_idf_weights.device != ids.device:  # moved once, not copied every step
                self.fixed_idf_weights = self.fixed_idf_weights.to(ids.device)
            return self.fixed_idf_weights[ids]
        batch_df = batch_document_frequency(ids, present, self.vocab_size)
        batch_n = torch.full((1,), float(ids.shape[0]), dtype=torch.float64, device=ids.device)  # no H2D copy
        counts = torch.cat([batch_df, batch_n])
        if self.statistics_update == "on_commit":
            counts = counts * self._new_on_this_rank(tokens)  # before the all-reduce: each rank decides for itself
        counts = all_reduce_sum(counts)
        batch_df, batch_n = counts[:-1], counts[-1]
        stats = self.statistics
        if self.statistics_update == "per_call":
            stats.add_(batch_df, batch_n)
            weights = idf_weights(stats.doc_freq, stats.num_captions)
        else:
            if self._pending is not None:
                batch_df, batch_n = self._pending[0] + batch_df, self._pending[1] + batch_n
            self._pending = (batch_df, batch_n)
            weights = idf_weights(stats.doc_freq.to(batch_df) + batch_df, stats.num_captions.to(batch_n) + batch_n)
        return weights[ids]

    def class_targets(self, class_tokens: torch.Tensor):
        """Sorted distinct token ids [B, L], their target probabilities [B, L] (float64), the sort order."""
        ids, present, order = distinct_caption_tokens(
            class_tokens, self.sot_token_id, self.eot_token_id, self.vocab_size)
        weights = self._token_weights(ids, present, class_tokens) * present
        total = weights.sum(dim=1, keepdim=True)
        targets = torch.where(total > 0, weights / total.clamp_min(torch.finfo(total.dtype).tiny),
                              torch.zeros_like(weights))
        return ids, targets, order

    def class_loss(self, class_tokens, class_logits=None, class_logsumexp=None, class_token_logits=None):
        with torch.autocast(device_type=class_tokens.device.type, enabled=False):
            ids, targets, order = self.class_targets(class_tokens)
            if class_logits is not None:
                compute_dtype = torch.promote_types(class_logits.dtype, torch.float32)
                log_probs = F.log_softmax(class_logits.to(compute_dtype), dim=-1)
                dense_targets = torch.zeros_like(log_probs).scatter_add_(1, ids, targets.to(compute_dtype))
                per_caption = -(dense_targets * log_probs).sum(dim=-1)
            else:
                compute_dtype = torch.promote_types(class_logsumexp.dtype, torch.float32)
                targets = targets.to(compute_dtype)
                token_logits = class_token_logits.to(compute_dtype).gather(1, order)
                has_target = (targets.sum(dim=1) > 0).to(compute_dtype)
                per_caption = has_target * class_logsumexp.to(compute_dtype) - (targets * token_logits).sum(dim=1)
            return per_caption.mean()

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, class_tokens=None,
                class_logits=None, class_logsumexp=None, class_token_logits=None, output_dict=False,
                **contrastive_inputs):
        if logit_bias is not None:
            contrastive_inputs["logit_bias"] = logit_bias
        losses = self.contrastive_loss(image_features=image_features, text_features=text_features,
                                       logit_scale=logit_scale, output_dict=True, **contrastive_inputs)
        if class_tokens is None or (class_logits is None and class_logsumexp is None):
            raise ValueError("ClassificationAugmentedLoss needs the class outputs of a SuperCLIP model in training "
                             "mode with output_dict=True (class_tokens and class_logits or class_logsumexp)")
        class_loss = self.class_loss(class_tokens, class_logits, class_logsumexp, class_token_logits)
        losses["class_loss"] = self.class_loss_weight * class_loss
        return losses if output_dict else sum(losses.values())
