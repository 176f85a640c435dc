"""What the patched open_clip_train calls for a run: its model form, its loss, and the statistics commit.

The trainer's parse_args, model factory and create_loss are separate upstream calls that share only ``args``;
the parsed run is kept here (one per process) so the model built for it and its loss can be tied together.
"""
import logging
from typing import Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_logger = logging.getLogger(__name__)

_run: Optional[object] = None
_model = None


def start_run(args) -> None:
    global _run, _model
    _run, _model = args, None


def model_overrides(model_name: str) -> dict:
    """Extra create_model kwargs for the run's model: add the head to a stock ViT, or drop it for lambda 0."""
    from ..configs import superclip_config
    if _run is None or model_name != _run.model:
        return {}
    super_model = superclip_config(model_name) is not None
    if _run.superclip and not super_model:
        return {"superclip_cfg": {}}
    if super_model and not _run.superclip:
        return {"superclip_cfg": None}
    return {}


def on_model_created(model_name: str, model) -> None:
    global _model
    if _run is None or model_name != _run.model or not _run.superclip:
        return
    model.class_loss_impl = _run.superclip_loss_impl
    _model = model
    head = sum(p.numel() for p in model.class_head.parameters())
    _logger.info(f"SuperCLIP: class head of {head / 1e6:.1f}M parameters, lambda={_run.superclip_lambda}, "
                 f"idf={_run.superclip_idf}, class loss impl={_run.superclip_loss_impl}")


def wrap_loss(args, contrastive_loss):
    """The stock loss, or for a SuperCLIP run the stock loss inside ClassificationAugmentedLoss."""
    if not getattr(args, "superclip", False):
        return contrastive_loss
    from ..loss import ClassificationAugmentedLoss
    if _model is None:
        raise RuntimeError("SuperCLIP: create_loss was called before the run's model was created")
    cfg = _model.superclip_cfg
    loss = ClassificationAugmentedLoss(
        contrastive_loss,
        class_loss_weight=args.superclip_lambda,
        idf=args.superclip_idf if args.superclip_idf in ("online", "none") else "online",
        statistics=_model.class_idf,
        idf_weights=None if args.superclip_idf in ("online", "none") else load_fixed_idf_weights(
            args.superclip_idf, args.model),
        vocab_size=cfg.vocab_size,
        sot_token_id=cfg.sot_token_id,
        eot_token_id=cfg.eot_token_id,
        statistics_update="on_commit",
    )
    # Statistics advance with the model: once per optimizer step, however many micro-batches it accumulated,
    # and not at all for a step the optimizer skips.
    register_optimizer_step_post_hook(lambda *_: loss.commit_statistics())
    return loss


def load_fixed_idf_weights(path: str, model_name: str) -> torch.Tensor:
    """float64 [V] weights log((N+1)/(df+1)) from a `superclip idf` file; ValueError if it does not fit the
    model's vocabulary or tokenizer (checked when arguments are parsed, before anything is built)."""
    import open_clip
    from ..configs import superclip_config
    from ..idf_counts import load_idf_counts, tokenizer_identity
    from ..model import SuperCLIPCfg
    config = superclip_config(model_name) or {}
    vocab_size = SuperCLIPCfg(**(config.get("superclip_cfg") or {})).vocab_size
    counts = load_idf_counts(path, vocab_size=vocab_size,
                             tokenizer=tokenizer_identity(open_clip.get_tokenizer(model_name)))
    return torch.as_tensor(counts.weights(), dtype=torch.float64)
