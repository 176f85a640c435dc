"""The ``--superclip-*`` flags, added to open_clip_train's own parser, and their validation (exit code 2)."""
import argparse
import math
import os
import re

from ..idf import IDF_MODES
from . import dual_caption, run

SUPERCLIP_DEFAULTS = {
    "superclip_lambda": 1.0,
    "superclip_idf": "online",
    "superclip_loss_impl": "auto",
    "superclip_max_bad_steps": 20,
}


def add_superclip_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "SuperCLIP (open_clip_superclip)",
        "Token-classification supervision for CLIP (arXiv 2512.14480). Active with a SuperCLIP/SuperSigLIP/"
        "SuperFLIP model or with --superclip-lambda on a stock ViT model.")
    group.add_argument("--superclip-lambda", type=float, default=None, metavar="FLOAT",
                       help="Weight of the class loss (>= 0; default 1.0 with Super* models). On a stock ViT model "
                            "it adds the SuperCLIP head; 0 trains the plain contrastive baseline without a head.")
    group.add_argument("--superclip-idf", default=None, metavar="{online,none,PATH}",
                       help="Class-target weights: online running IDF (default), none (uniform), or a counts file "
                            "written by `superclip idf` (fixed weights).")
    group.add_argument("--logs-dir", dest="logs", default=argparse.SUPPRESS, metavar="DIR",
                       help="Same as --logs; torchrun rejects --logs as an ambiguous abbreviation of its own "
                            "--logs-specs, so use this spelling under torchrun.")
    group.add_argument("--superclip-loss-impl", choices=["auto", "dense", "chunked"], default=None,
                       help="Class loss implementation: chunked never materialises [batch, vocab]; auto picks the "
                            "faster one for the device (default).")
    group.add_argument("--superclip-max-bad-steps", type=int, default=None, metavar="N",
                       help="Optimizer steps with a NaN/inf loss are skipped; more than N consecutive ones stop the "
                            "run (exit 1) after saving the last good state (default 20; 0 stops at the first; "
                            "-1 turns the guard and its per-step host sync off).")
    dual_caption.add_dual_caption_args(parser)


def _given(args, name):
    return getattr(args, name, None) is not None


def finalize_superclip_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Validates our flags and sets ``args.superclip`` (whether the class head trains in this run)."""
    from ..configs import superclip_config

    _check_resume_file(parser, getattr(args, "resume", None))
    lam = args.superclip_lambda
    if lam is not None and not (math.isfinite(lam) and lam >= 0):
        parser.error(f"--superclip-lambda must be a finite number >= 0, got {lam}")
    idf = args.superclip_idf
    if idf is not None and idf not in IDF_MODES and not os.path.exists(idf):
        parser.error(f"--superclip-idf must be one of {', '.join(IDF_MODES)} or an existing IDF counts file "
                     f"(written by `superclip idf`), got {idf!r}")
    if idf is not None and idf not in IDF_MODES:
        try:
            run.load_fixed_idf_weights(idf, args.model)
        except ValueError as error:
            parser.error(f"--superclip-idf: {error}")
    if args.superclip_max_bad_steps is not None and args.superclip_max_bad_steps < -1:
        parser.error(f"--superclip-max-bad-steps must be >= -1 (-1: guard off), got {args.superclip_max_bad_steps}")

    super_model = superclip_config(args.model) is not None
    args.superclip = super_model and lam != 0 or bool(lam)
    given = [f"--{name.replace('_', '-')}" for name in SUPERCLIP_DEFAULTS if _given(args, name)
             and name != "superclip_lambda"]
    if given and not args.superclip:
        reason = "--superclip-lambda is 0" if lam == 0 else f"--model {args.model} is not a SuperCLIP model " \
                                                               f"and --superclip-lambda is not set"
        parser.error(f"{', '.join(given)} has no effect: {reason}")
    if args.superclip and not super_model:
        _check_stock_model_can_take_head(parser, args.model)
    if args.superclip and "siglip" in args.model.lower() and super_model and not args.siglip:
        args.siglip = True  # SuperSigLIP models train with the sigmoid loss their logit bias is initialised for
    for name, default in SUPERCLIP_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default if args.superclip or name != "superclip_lambda" else lam)
    dual_caption.finalize_dual_caption_args(parser, args)
    return args


def _check_resume_file(parser, resume) -> None:
    """``--resume PATH`` on this machine must be a file: open_clip_train would only find out after building the
    model, with a traceback. ``latest`` and remote URLs (s3://, ...) are left to the trainer."""
    if not resume or resume == "latest":
        return
    local = resume[len("file://"):] if resume.startswith("file://") else resume
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", local):
        return
    if os.path.isdir(local):
        parser.error(f"--resume {resume} is a folder: give a checkpoint file, or `latest` for the run's newest")
    if not os.path.isfile(local):
        parser.error(f"--resume {resume}: no such file")


def _check_stock_model_can_take_head(parser, model_name):
    from open_clip import get_model_config
    from ..model import check_head_attachable

    config = get_model_config(model_name)
    if config is None:
        return  # the stock trainer reports unknown models itself
    try:
        if config.get("custom_text") or "hf_model_name" in config.get("text_cfg", {}):
            raise ValueError("a custom text tower (CustomTextCLIP)")
        check_head_attachable(config["vision_cfg"])
    except ValueError as error:
        parser.error(f"--superclip-lambda cannot be used with --model {model_name}: {error}")
