"""Every patch of open_clip (the library, not its trainer), as a table `patching.install` applies.

Installed by `registry.register` when open_clip is imported; open_clip_train's patches live in the trainer layer
(open_clip_superclip.train.plugin).
"""
import functools

from .patching import Patch


def superclip_model_class(**model_cfg):
    """Stands in for CLIP in open_clip.factory: configs with ``superclip_cfg`` build SuperCLIP."""
    from open_clip.model import CLIP

    from .model import SuperCLIP
    if model_cfg.get("superclip_cfg") is None:
        model_cfg.pop("superclip_cfg", None)
        return CLIP(**model_cfg)
    return SuperCLIP(**model_cfg)


superclip_model_class.__name__ = "CLIP"


def _get_tokenizer_with_clip_bpe_for_supersiglip(stock_get_tokenizer):
    @functools.wraps(stock_get_tokenizer)
    def get_tokenizer(model_name: str = "", context_length=None, cache_dir=None, **kwargs):
        from open_clip import factory

        from .configs import superclip_config
        config = superclip_config(model_name)
        if config is None or "siglip" not in model_name.lower() or config["text_cfg"].get("hf_tokenizer_name"):
            return stock_get_tokenizer(model_name, context_length=context_length, cache_dir=cache_dir, **kwargs)
        text_cfg = config["text_cfg"]
        tokenizer_kwargs = {**text_cfg.get("tokenizer_kwargs", {}), **kwargs}
        return factory.SimpleTokenizer(context_length=context_length or text_cfg.get("context_length", 77),
                                       **tokenizer_kwargs)

    return get_tokenizer


OPEN_CLIP_PATCHES = (
    Patch("open_clip.factory.CLIP", "open_clip_torch 3.0-3.3",
          "configs with `superclip_cfg` build SuperCLIP; every other config builds the stock CLIP",
          replace=lambda stock: superclip_model_class,
          assumes=(("open_clip.factory.create_model", "model_class = CLIP"),
                   ("open_clip.factory.create_model", "model_class(**final_model_cfg, cast_dtype=cast_dtype)"))),
    Patch("open_clip.factory.get_tokenizer", "open_clip_torch 3.0-3.3",
          "a name with 'siglip' selects the SigLIP T5 tokenizer (a hub download); SuperSigLIP models classify "
          "CLIP BPE tokens, so they get open_clip's SimpleTokenizer",
          replace=_get_tokenizer_with_clip_bpe_for_supersiglip, aliases=("open_clip.get_tokenizer",),
          assumes=(("open_clip.factory.get_tokenizer", "'siglip' in identifier.lower()"),)),
)
