"""Checkpoints in and out: `superclip export` (to a stock open_clip folder) and `superclip convert-official`
(from the official hustvl/SuperCLIP implementation), plus the run settings a trainer checkpoint was made with.

Trainer checkpoints (``epoch_N.pt``: ``state_dict`` + optimizer state) and bare state dicts both load through
open_clip's own ``load_state_dict`` (``weights_only=True``, ``state_dict`` nesting and ``module.`` stripped), the
same path ``clip_benchmark eval --pretrained CKPT`` takes.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from open_clip_superclip.atomic import is_nonempty_dir, local_output_path, staging_dir, write_atomically
from open_clip_superclip.configs import list_superclip_models
from open_clip_superclip.state_dicts import (OFFICIAL_GLOBAL_BATCH_SIZE, CheckpointError, convert_official_state_dict,
                                             to_stock_state_dict)

EXPORT_CONFIG_NAME = "open_clip_config.json"
SCHEMA_PREFIXES = ("local-dir:", "hf-hub:")  # open_clip model names whose weights come with the name


@contextlib.contextmanager
def _readable_checkpoint(path):
    """Turns the ways torch/open_clip fail to read a checkpoint file into CheckpointErrors that say what to do."""
    import pickle
    _check_checkpoint_file(path)
    path = os.fspath(path)
    try:
        yield path
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers, so it cannot be read with "
            f"torch.load(weights_only=True). If you trust the file, re-save its weights: "
            f"torch.save(torch.load(path, weights_only=False)['state_dict'], new_path). ({error})") from error


def _check_checkpoint_file(path) -> None:
    """A CheckpointError naming the path as given (a URL or a folder is not a checkpoint file)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{os.fspath(path)} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        hint = " (checkpoints are read from local paths; give the path without file://)" \
            if os.fspath(path).startswith("file://") else ""
        raise CheckpointError(f"{os.fspath(path)}: no such file{hint}")


def _output_path(path, flag: str) -> Path:
    """The output as a local Path; a symlink stands for its target, so a replaced output lands where it points."""
    try:
        out = Path(local_output_path(path, flag))
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def load_checkpoint_state_dict(path) -> dict:
    """The model weights of a trainer checkpoint or a bare state dict (torch pickle or .safetensors).

    Uses open_clip's loader, so it accepts exactly what ``create_model(name, pretrained=path)`` accepts.
    """
    from open_clip.factory import load_state_dict
    with _readable_checkpoint(path) as path:
        try:
            state_dict = load_state_dict(path, device="cpu", weights_only=True)
        except (StopIteration, AttributeError):  # open_clip peeks at the first key of what it expects is a dict
            state_dict = None
        except (RuntimeError, EOFError, OSError) as error:
            raise CheckpointError(f"cannot read {path}: {error}") from error
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(f"{path} holds no state dict (a dict of tensors, or one under 'state_dict')")
    return state_dict


# --------------------------------------------------------------------------------------------- run settings
# Trainer flags that change the model or its preprocessing without being visible in the weights.
_PREPROCESS_FLAGS = {"image_mean": "mean", "image_std": "std", "image_interpolation": "interpolation",
                     "image_resize_mode": "resize_mode"}
_ARCHITECTURE_FLAGS = ("force_quick_gelu", "force_image_size", "force_context_length")


@dataclass
class RunSettings:
    """What a training run's params.txt says about how to rebuild its model."""
    params_path: Optional[Path] = None
    model: Optional[str] = None
    superclip: bool = False
    architecture: dict = field(default_factory=dict)  # force_* flags that were set
    preprocess: dict = field(default_factory=dict)  # PreprocessCfg keys that were set

    def non_default_flags(self) -> list[str]:
        names = list(self.architecture) + [k for k, v in _PREPROCESS_FLAGS.items() if v in self.preprocess]
        return [f"--{name.replace('_', '-')}" for name in names]


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read_run_settings(checkpoint) -> RunSettings:
    """Reads ``LOGS/NAME/params.txt`` for a checkpoint at ``LOGS/NAME/checkpoints/epoch_N.pt`` (open_clip_train's
    layout); empty settings for a checkpoint elsewhere."""
    checkpoint = Path(checkpoint).absolute()
    params_path = checkpoint.parent.parent / "params.txt"
    if checkpoint.parent.name != "checkpoints" or not params_path.is_file():
        return RunSettings()
    params = {}
    for line in params_path.read_text(encoding="utf-8").splitlines():
        name, sep, value = line.partition(": ")
        if sep:
            params[name.strip()] = _literal(value.strip())
    settings = RunSettings(params_path=params_path, model=params.get("model") or None,
                           superclip=params.get("superclip") is True)
    for name in _ARCHITECTURE_FLAGS:
        if params.get(name) not in (None, False, ""):
            settings.architecture[name] = params[name]
    for name, key in _PREPROCESS_FLAGS.items():
        if params.get(name) not in (None, ""):
            value = params[name]
            settings.preprocess[key] = tuple(value) if isinstance(value, list) else value
    return settings


def apply_architecture_flags(model_cfg: dict, architecture: dict) -> dict:
    """The model config as open_clip's factory builds it under the trainer's force_* flags."""
    if architecture.get("force_quick_gelu"):
        model_cfg["quick_gelu"] = True
    if "force_image_size" in architecture:
        model_cfg["vision_cfg"]["image_size"] = architecture["force_image_size"]
    if "force_context_length" in architecture:
        model_cfg["text_cfg"]["context_length"] = architecture["force_context_length"]
    return model_cfg


def superclip_counterpart(model_name: str) -> Optional[str]:
    """The SuperCLIP model whose towers are exactly those of stock ``model_name`` (ViT-B-16 -> SuperCLIP-ViT-B-16):
    a stock ViT trained with ``--superclip-lambda`` has a head its stock config cannot load."""
    import open_clip
    stock = open_clip.get_model_config(model_name)
    if stock is None:
        return None
    for name in sorted(list_superclip_models(), key=lambda n: "-ViT-" not in n):  # canonical names before aliases
        config = open_clip.get_model_config(name)
        config.pop("superclip_cfg")
        if config == stock:
            return name
    return None


# --------------------------------------------------------------------------------------------------- export
def export_stock(checkpoint, out_dir, model_name: Optional[str] = None, force: bool = False) -> Path:
    """Writes a folder that vanilla open_clip loads with ``local-dir:OUT_DIR``: the towers of the checkpoint's
    model, without the class head and IDF statistics, and the preprocessing the model was trained with."""
    import open_clip
    import torch
    from open_clip.model import CLIP

    _check_checkpoint_file(checkpoint)
    given, out_dir = os.fspath(out_dir), _output_path(out_dir, "OUT_DIR")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{given} exists and is not a folder: remove it or choose another output folder")
    if is_nonempty_dir(out_dir) and not force:
        raise CheckpointError(f"{given} exists and is not empty (use --force to replace it)")
    settings = read_run_settings(checkpoint)
    model_name = model_name or settings.model
    if not model_name:
        raise CheckpointError(f"{checkpoint} is not in a training run folder with a params.txt: pass --model NAME")
    if model_name.startswith(SCHEMA_PREFIXES):
        raise CheckpointError(f"--model must name a model config, not {model_name!r} (open_clip ignores a "
                              f"checkpoint for local-dir:/hf-hub: models, and their folders are stock already)")
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise CheckpointError(f"unknown model {model_name!r}: see `python -c 'import open_clip; "
                              f"print(open_clip.list_models())'`")
    if model_cfg.get("custom_text") or "hf_model_name" in model_cfg.get("text_cfg", {}):
        raise CheckpointError(f"{model_name} has a custom text tower: export writes open_clip CLIP models only")
    model_cfg = apply_architecture_flags(model_cfg, settings.architecture)
    superclip_cfg = model_cfg.pop("superclip_cfg", None) or {}
    # Built from the very config that is written out, plus the head (kept fresh if the weights have none), and
    # loaded strictly by open_clip's own checkpoint loader: what clip_benchmark does with --pretrained.
    with _readable_checkpoint(checkpoint) as path:
        try:
            model = open_clip.create_model(model_name, pretrained=path, **model_cfg, superclip_cfg=superclip_cfg,
                                           force_preprocess_cfg=settings.preprocess)
        except (RuntimeError, ValueError, AssertionError) as error:  # open_clip asserts on some size mismatches
            raise CheckpointError(f"{checkpoint} does not load into {model_name}: {error or type(error).__name__}"
                                  ) from error

    stock_state = {k: v.detach().contiguous() for k, v in to_stock_state_dict(model.state_dict()).items()}
    with torch.device("meta"):
        expected = CLIP(**model_cfg).state_dict()
    mismatched = sorted(set(expected) ^ set(stock_state)) + sorted(
        k for k in set(expected) & set(stock_state) if expected[k].shape != stock_state[k].shape)
    if mismatched:
        raise CheckpointError(f"the stock CLIP of {model_name}'s config does not match these weights: {mismatched}")

    config = {"model_cfg": model_cfg, "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    try:
        with staging_dir(out_dir) as staging:
            (staging / EXPORT_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            _save_state_dict(stock_state, staging / _weights_file_name())
    except OSError as error:
        raise CheckpointError(f"cannot write {given}: {error}") from error
    return out_dir


def _weights_file_name() -> str:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return "open_clip_pytorch_model.bin"
    return "open_clip_model.safetensors"


def _save_state_dict(state_dict: dict, path: Path) -> None:
    """Atomically; safetensors for a .safetensors name, else a torch pickle (both read by open_clip)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save
        data = save(state_dict)
        write_atomically(path, lambda f: f.write(data))
    else:
        import torch
        write_atomically(path, lambda f: torch.save(state_dict, f))


def export_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="superclip export",
        description="Write a SuperCLIP checkpoint as a stock open_clip model folder (class head and IDF statistics "
                    "dropped): load it with open_clip.create_model_and_transforms('local-dir:OUT_DIR'), no plugin "
                    "needed. Image and text embeddings are those of the SuperCLIP model.")
    parser.add_argument("checkpoint", help="trainer checkpoint (epoch_N.pt) or bare state dict (.pt/.safetensors)")
    parser.add_argument("out_dir", help="output folder (written atomically)")
    parser.add_argument("--model", help="model config name (default: from the run's params.txt next to "
                                        "checkpoints/; required for files outside a training run folder)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        out = export_stock(args.checkpoint, args.out_dir, args.model, args.force)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}: load it with open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


def convert_official(checkpoint, out, model_name: Optional[str] = None,
                     global_batch_size: int = OFFICIAL_GLOBAL_BATCH_SIZE, force: bool = False,
                     keep_token_0: bool = False) -> str:
    """Writes our state dict for an official checkpoint to ``out`` (bare state dict; .safetensors by suffix)."""
    given, out = os.fspath(out), _output_path(out, "OUT")
    if out.is_dir():
        raise CheckpointError(f"{given} is a folder: give the converted checkpoint a file name")
    if out.exists() and not force:
        raise CheckpointError(f"{given} exists (use --force to replace it)")
    model_name, state_dict = convert_official_state_dict(load_checkpoint_state_dict(checkpoint), model_name,
                                                         global_batch_size, keep_token_0)
    try:
        _save_state_dict(state_dict, out)
    except OSError as error:
        raise CheckpointError(f"cannot write {given}: {error}") from error
    return model_name


def convert_official_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="superclip convert-official",
        description="Import a checkpoint of the official SuperCLIP implementation (hustvl/SuperCLIP). Writes a "
                    "bare state dict: open_clip.create_model(MODEL, pretrained=OUT), clip_benchmark "
                    "--pretrained OUT and the trainer's --pretrained all read it (and --resume, for a torch pickle).")
    parser.add_argument("checkpoint", help="official checkpoint: torch pickle (state dict, or a trainer "
                                           "checkpoint with one under 'state_dict') or .safetensors")
    parser.add_argument("out", help="output file; .safetensors writes safetensors, anything else a torch pickle")
    parser.add_argument("--model", help="our model config (default: from the vision width: 768 -> "
                                        "SuperCLIP-ViT-B-16, 1024 -> SuperCLIP-ViT-L-16)")
    parser.add_argument("--global-batch-size", type=int, default=OFFICIAL_GLOBAL_BATCH_SIZE,
                        help="global batch size the official run trained with: its IDF statistics are per-step "
                             f"fractions of it (default {OFFICIAL_GLOBAL_BATCH_SIZE}, the official recipe)")
    parser.add_argument("--keep-token-0-count", action="store_true",
                        help="keep the official IDF count of token id 0 ('!'), which counts padding: by default it "
                             "is reset to 0 (unseen), since kept it gives '!' a weight of ~0 forever")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        model_name = convert_official(args.checkpoint, args.out, args.model, args.global_batch_size, args.force,
                                      args.keep_token_0_count)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({model_name}): open_clip.create_model('{model_name}', pretrained='{args.out}')")
    return 0
