"""SuperCLIP: a stock open_clip CLIP whose image tower also feeds a token-classification head.

The head reads the mean of the patch tokens after ``ln_post`` (CLS excluded), taken from the same visual pass
as the contrastive features. It is used in training only; ``encode_image``/``encode_text`` are the stock ones.
"""
import logging
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPVisionCfg
from open_clip.transformer import LayerNorm, LayerNormFp32
from torch import nn

from .idf import CLIP_EOT_TOKEN_ID, CLIP_SOT_TOKEN_ID, CLIP_VOCAB_SIZE, IDFStatistics

_logger = logging.getLogger(__name__)

CLASS_LOSS_IMPLS = ("dense", "chunked")
# Below this many rows under 16-bit autocast, dense is the faster class loss on CPU; see auto_class_loss_impl.
CPU_AUTOCAST_CHUNKED_MIN_ROWS = 256


def auto_class_loss_impl(device: torch.device, rows: int) -> str:
    """The faster implementation as measured by `make bench` (docs/benchmarks.md, 2-core CPU). CPU: chunked takes
    0.81-0.95x dense's time in fp32 at every batch measured (16-1024 rows), and under bf16 autocast 0.76-0.90x from
    256 rows up, but 0.99x at 128 and 1.09-1.16x at 16-64 (dense's 16-bit matmuls win while [B, V] is small).
    CUDA: dense, until the row-chunked kernel is measured on a GPU (the earlier vocabulary-chunked one lost there:
    H100 6.3 ms dense vs 10.5 ms)."""
    if device.type != "cpu":
        return "dense"
    if torch.is_autocast_enabled("cpu") and rows < CPU_AUTOCAST_CHUNKED_MIN_ROWS:
        return "dense"
    return "chunked"


@dataclass
class SuperCLIPCfg:
    vocab_size: int = CLIP_VOCAB_SIZE
    sot_token_id: int = CLIP_SOT_TOKEN_ID
    eot_token_id: int = CLIP_EOT_TOKEN_ID


class _FreshIfAbsent(nn.Module):
    """Loads normally, but a checkpoint without any of this module's keys (a stock CLIP one) leaves it as
    initialised instead of failing the strict load; a partial set of keys still fails."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._absent_prefix = None
        self.register_load_state_dict_post_hook(_forgive_absent_keys)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._absent_prefix = None if any(key.startswith(prefix) for key in state_dict) else prefix
        if self._absent_prefix is None:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _forgive_absent_keys(module, incompatible_keys):
    prefix = module._absent_prefix
    if prefix is not None:
        _logger.info(f"{prefix.rstrip('.')} is not in the checkpoint: keeping its fresh initialisation.")
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(prefix)]
        module._absent_prefix = None


class ClassHead(_FreshIfAbsent):
    """LayerNorm(width) -> Linear(width, vocab): one logit per vocabulary token."""

    def __init__(self, width: int, vocab_size: int, norm_layer=LayerNorm):
        super().__init__()
        self.norm = norm_layer(width)
        self.proj = nn.Linear(width, vocab_size)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class ClassIDFStatistics(_FreshIfAbsent, IDFStatistics):
    pass


def check_head_attachable(vision_cfg: dict) -> None:
    """The head needs a native open_clip ViT whose patch tokens come out after ``ln_post``."""
    cfg = CLIPVisionCfg(**vision_cfg) if isinstance(vision_cfg, dict) else vision_cfg
    problem = None
    if cfg.timm_model_name:
        problem = f"a timm image tower ({cfg.timm_model_name})"
    elif isinstance(cfg.layers, (list, tuple)):
        problem = "a ResNet image tower"
    elif cfg.attentional_pool:
        problem = "an attentional-pool image tower"
    elif cfg.final_ln_after_pool:
        problem = "final_ln_after_pool (patch tokens would skip ln_post)"
    elif cfg.pool_type != "tok":
        problem = f"pool_type={cfg.pool_type!r} (only 'tok' has a separate CLS token)"
    if problem:
        raise ValueError(f"the SuperCLIP class head cannot attach to {problem}: use a native open_clip ViT "
                         f"(e.g. ViT-B-16, ViT-L-14) or a SuperCLIP-* model")


class SuperCLIP(CLIP):
    """open_clip's CLIP plus the SuperCLIP class head and its IDF statistics.

    With ``output_dict=True`` in training mode, ``forward`` adds batch-major class outputs for
    `ClassificationAugmentedLoss`: ``class_tokens`` and either ``class_logits`` (dense) or
    ``class_logsumexp`` + ``class_token_logits`` (chunked, never materialising [B, vocab]).
    Text longer than ``context_length`` carries the class-target tokens after the first ``context_length``
    columns (DualCaption).
    """

    def __init__(self, embed_dim: int, vision_cfg, text_cfg, superclip_cfg: Optional[dict] = None,
                 cast_dtype: Optional[torch.dtype] = None, **clip_kwargs):
        vision_cfg = asdict(vision_cfg) if isinstance(vision_cfg, CLIPVisionCfg) else dict(vision_cfg)
        check_head_attachable(vision_cfg)
        vision_cfg["output_tokens"] = True
        super().__init__(embed_dim, vision_cfg, text_cfg, cast_dtype=cast_dtype, **clip_kwargs)
        self.superclip_cfg = SuperCLIPCfg(**(superclip_cfg or {}))
        norm_layer = LayerNormFp32 if cast_dtype in (torch.float16, torch.bfloat16) else LayerNorm
        self.class_head = ClassHead(vision_cfg["width"], self.superclip_cfg.vocab_size, norm_layer)
        self.class_idf = ClassIDFStatistics(self.superclip_cfg.vocab_size)
        self.class_loss_impl = "auto"

    def encode_image(self, image, normalize: bool = False):
        features, _ = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def _resolve_loss_impl(self, device: torch.device, rows: int) -> str:
        if self.class_loss_impl == "auto":
            return auto_class_loss_impl(device, rows)
        if self.class_loss_impl not in CLASS_LOSS_IMPLS:
            raise ValueError(f"class_loss_impl must be 'auto' or one of {CLASS_LOSS_IMPLS}, "
                             f"got {self.class_loss_impl!r}")
        return self.class_loss_impl

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None):
        class_tokens = None
        if text is not None and text.shape[-1] > self.context_length:
            text, class_tokens = text[:, :self.context_length], text[:, self.context_length:]
        if not (self.training and self.output_dict and image is not None and text is not None):
            return super().forward(image, text)

        pooled, patch_tokens = self.visual(image)
        out = {
            "image_features": F.normalize(pooled, dim=-1),
            "text_features": self.encode_text(text, normalize=True),
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        class_tokens = text if class_tokens is None else class_tokens
        out["class_tokens"] = class_tokens
        patch_mean = patch_tokens.mean(dim=1)
        if self._resolve_loss_impl(patch_mean.device, patch_mean.shape[0]) == "dense":
            out["class_logits"] = self.class_head(patch_mean)
        else:
            from .fused_head import fused_head_logsumexp
            head = self.class_head
            out["class_logsumexp"], out["class_token_logits"] = fused_head_logsumexp(
                head.norm(patch_mean), head.proj.weight, head.proj.bias, class_tokens)
        return out
