"""State-dict maps: SuperCLIP -> stock CLIP (drop the head), and the official hustvl/SuperCLIP layout -> ours.

The maps are core so that loading, `superclip export` / `convert-official` and users' own code share one path.
"""
import sys
from typing import Optional

from .configs import list_superclip_models, superclip_config

CLASS_HEAD_PREFIXES = ("class_head.", "class_idf.")
OFFICIAL_GLOBAL_BATCH_SIZE = 16384  # the official recipe (SPEC.md section 1)
PADDING_TOKEN_ID = 0  # open_clip's padding id, also the real token "!"
OFFICIAL_MODEL_BY_VISUAL_WIDTH = {768: "SuperCLIP-ViT-B-16", 1024: "SuperCLIP-ViT-L-16"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says what to change."""


def is_class_head_key(key: str) -> bool:
    key = key[len("module."):] if key.startswith("module.") else key
    return key.startswith(CLASS_HEAD_PREFIXES)


def to_stock_state_dict(state_dict: dict) -> dict:
    """A SuperCLIP state dict without the head and statistics: loads into the stock CLIP of the same towers."""
    return {k: v for k, v in state_dict.items() if not is_class_head_key(k)}


# Official hustvl/SuperCLIP names -> ours. The vision tower, logit_scale and logit_bias keep their names.
_OFFICIAL_PREFIXES = (
    ("text.token_embedding.", "token_embedding."),
    ("text.transformer.", "transformer."),
    ("text.ln_final.", "ln_final."),
    ("text_decoder.ln_mlp.", "class_head.norm."),
    ("text_decoder.text_projection.", "class_head.proj."),
)
_OFFICIAL_NAMES = {
    "text.positional_embedding": "positional_embedding",
    "text.text_projection": "text_projection",
    # the running IDF statistics (float64 buffers), at the top level or in the head module
    "cap_fq": "class_idf.doc_freq",
    "text_decoder.cap_fq": "class_idf.doc_freq",
    "num_samples": "class_idf.num_captions",
    "text_decoder.num_samples": "class_idf.num_captions",
}
_KEPT_PREFIXES = ("visual.",)
_KEPT_NAMES = ("logit_scale", "logit_bias")


def our_key(official_key: str) -> Optional[str]:
    """Our name for an official key, None for a key the official layout does not have."""
    if official_key.startswith(_KEPT_PREFIXES) or official_key in _KEPT_NAMES:
        return official_key
    if official_key in _OFFICIAL_NAMES:
        return _OFFICIAL_NAMES[official_key]
    for official, ours in _OFFICIAL_PREFIXES:
        if official_key.startswith(official):
            return ours + official_key[len(official):]
    return None


def official_key(key: str) -> str:
    """The official name of one of our keys (for error messages)."""
    for official, ours in _OFFICIAL_PREFIXES:
        if key.startswith(ours):
            return official + key[len(ours):]
    names = [official for official, ours in _OFFICIAL_NAMES.items() if ours == key]
    return names[0] if names else key


def infer_official_model(state_dict: dict) -> str:
    conv = state_dict.get("visual.conv1.weight")
    width = None if conv is None else conv.shape[0]
    if width not in OFFICIAL_MODEL_BY_VISUAL_WIDTH:
        raise CheckpointError(
            f"cannot infer the model from the vision width {width} (official models: "
            f"{', '.join(f'{w} -> {n}' for w, n in OFFICIAL_MODEL_BY_VISUAL_WIDTH.items())}): pass --model NAME")
    return OFFICIAL_MODEL_BY_VISUAL_WIDTH[width]


def _unseen_token_0(doc_freq, num_captions) -> str:
    """Resets the count of token id 0 and says so.

    The official code counts every id of the padded 77-token caption, so its count for id 0 is the captions
    with padding (nearly all) or a real "!": kept, "!" would get weight log((N+1)/(N+1)) ~ 0 forever, a token
    our statistics never learn again. No count of the real "!" can be recovered from it. The least wrong estimate
    is what the official run itself had for every token it never saw: unseen (0); online training counts real
    "!" from then on. SOT/EOT, also counted in every caption there, never enter our targets.
    """
    official = float(doc_freq[PADDING_TOKEN_ID])
    doc_freq[PADDING_TOKEN_ID] = 0.0
    share = official / float(num_captions) if float(num_captions) > 0 else 0.0
    return (f"note: token id 0 ('!'): the official cap_fq counts padding there ({official:.0f} of "
            f"{float(num_captions):.0f} captions, {100 * share:.1f}%); set to 0, i.e. unseen: its IDF weight starts "
            f"at log(N + 1) and online training counts real '!' from here on (--keep-token-0-count keeps it)")


def _convert_statistics(converted: dict, global_batch_size: int, keep_token_0: bool) -> None:
    """Official statistics are per-step FRACTIONS of the global batch; ours are caption counts."""
    import torch
    doc_freq = converted["class_idf.doc_freq"].to(torch.float64) * global_batch_size
    num_captions = converted["class_idf.num_captions"].to(torch.float64) * global_batch_size
    if not (torch.isfinite(doc_freq).all() and torch.isfinite(num_captions)):
        raise CheckpointError("the IDF statistics (cap_fq / num_samples) hold NaN or infinite values")
    if doc_freq.min() < 0 or num_captions < 0 or doc_freq.max() > num_captions * (1 + 1e-9):
        raise CheckpointError(
            f"the IDF statistics are inconsistent: cap_fq must lie in [0, num_samples] (cap_fq in "
            f"[{doc_freq.min() / global_batch_size:g}, {doc_freq.max() / global_batch_size:g}], "
            f"num_samples {float(num_captions) / global_batch_size:g})")
    off_integer = max(float((doc_freq - doc_freq.round()).abs().max()),
                      float((num_captions - num_captions.round()).abs()))
    if off_integer > 1e-3:
        print(f"warning: cap_fq * {global_batch_size} is not a whole number of captions (off by up to "
              f"{off_integer:.3g}): was the model trained with another global batch size? "
              f"(--global-batch-size)", file=sys.stderr)
    if not keep_token_0:
        print(_unseen_token_0(doc_freq, num_captions), file=sys.stderr)
    converted["class_idf.doc_freq"] = doc_freq
    converted["class_idf.num_captions"] = num_captions


def convert_official_state_dict(state_dict: dict, model_name: Optional[str] = None,
                                global_batch_size: int = OFFICIAL_GLOBAL_BATCH_SIZE,
                                keep_token_0: bool = False) -> tuple[str, dict]:
    """(model name, our state dict) from an official state dict; every key accounted for or a CheckpointError.

    The IDF count of token id 0 is reset to 0 (see _unseen_token_0) unless ``keep_token_0``.
    """
    import torch

    if not (isinstance(global_batch_size, int) and global_batch_size > 0):
        raise CheckpointError(f"the global batch size must be a positive integer, got {global_batch_size!r}")
    converted, unknown, duplicated = {}, [], []
    for key, value in state_dict.items():
        ours = our_key(key)
        if ours is None:
            unknown.append(key)
        elif ours in converted:
            duplicated.append(key)
        else:
            converted[ours] = value
    if unknown:
        hint = (" (this looks like an open_clip or open_clip_superclip checkpoint already: use it directly)"
                if any(k.startswith(("class_head.", "class_idf.", "transformer.")) for k in unknown) else "")
        raise CheckpointError(f"{len(unknown)} key(s) not in the official SuperCLIP layout{hint}: {sorted(unknown)}")
    if duplicated:
        raise CheckpointError(f"key(s) given twice (top level and under text_decoder.): {sorted(duplicated)}")

    model_name = model_name or infer_official_model(converted)
    config = superclip_config(model_name)
    if config is None:
        raise CheckpointError(f"--model {model_name} is not a SuperCLIP model (choose from "
                              f"{', '.join(list_superclip_models())})")
    from .model import SuperCLIP
    with torch.device("meta"):
        expected = SuperCLIP(**config).state_dict()
    missing = sorted(official_key(k) for k in expected if k not in converted)
    extra = sorted(official_key(k) for k in converted if k not in expected)
    if missing or extra:
        parts = [f"missing {missing}"] if missing else []
        parts += [f"not in {model_name}: {extra}"] if extra else []
        raise CheckpointError(f"the checkpoint does not fit {model_name}: {'; '.join(parts)}")
    # official [1, V] / [1, 1] statistics and scalar-vs-1d logit scales differ from ours only in shape
    for name in ("logit_scale", "logit_bias", "class_idf.doc_freq", "class_idf.num_captions"):
        if name in converted and converted[name].numel() == expected[name].numel():
            converted[name] = converted[name].reshape(expected[name].shape)
    wrong_shape = [f"{official_key(k)}: {tuple(converted[k].shape)}, expected {tuple(v.shape)}"
                   for k, v in expected.items() if converted[k].shape != v.shape]
    if wrong_shape:
        raise CheckpointError(f"tensor shapes do not fit {model_name}: {wrong_shape}")
    _convert_statistics(converted, global_batch_size, keep_token_0)
    return model_name, {k: converted[k].detach().to(v.dtype).contiguous() for k, v in expected.items()}
