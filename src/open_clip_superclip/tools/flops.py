"""FLOPs per component of a (Super)CLIP model: the paper's appendix A.3 / Table 5, as `superclip flops`.

Why: the paper's cost claim (the class head adds 0.077% to CLIP-L's training FLOPs) should be checkable for
any model config. The towers and the head are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a
model built on the meta device (no memory, no compute); the two losses, whose cost depends on the batch and
not on the weights, are counted analytically.

Two conventions are reported:
- the paper's: one multiply-accumulate (MAC) = one FLOP, counting the products with weights (linear layers,
  the patch-embedding convolution, the projections). The paper's tower numbers are reproduced to <= 0.15%
  this way; they leave out the attention products QK^T and AV, as a counter that cannot see a fused
  attention kernel does;
- standard: two FLOPs per MAC, attention products included.
Elementwise work (norms, activations, softmax, residual adds) is in neither: FlopCounterMode counts matrix
products and convolutions only. The class loss is the exception, being elementwise only (B * (7C - 3)
operations, the paper's "about 7 per logit"), and is the same number in both conventions.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence


# FlopCounterMode's ops that multiply two activations (attention scores and their weighted sum); every other
# op it counts (mm, addmm, convolution, ...) multiplies by a weight.
ATTENTION_OPS = ("bmm", "baddbmm", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
                 "_efficient_attention_forward", "_flash_attention_forward", "flex_attention")
# The class loss per row of C logits: 4 elementwise passes (subtract the max, exp, subtract the log-sum-exp,
# times the target) and 3 reductions of C - 1 operations each (max, sum of exp, sum of target * log-prob):
# 7C - 3, the paper's "about 7 per logit" (scalar per-row work such as the log of the sum is left out).
CLASS_LOSS_ELEMENTWISE_PASSES = 4
CLASS_LOSS_REDUCTIONS = 3

# The paper's Table 5 (GFLOPs in its convention), keyed by the model config whose towers it describes.
PAPER_TABLE5 = {
    "SuperCLIP-ViT-B-16": {"vision tower": 16.868, "text tower": 2.911, "class head": 0.038,
                           "contrastive loss": 274.878, "class loss": 5.666},
    "SuperCLIP-ViT-L-16": {"vision tower": 59.689, "text tower": 6.547, "class head": 0.051,
                           "contrastive loss": 412.317, "class loss": 5.666},
}
PAPER_BATCH_SIZE = 16384
PAPER_HEAD_SHARE_PERCENT = {"SuperCLIP-ViT-L-16": 0.077}


@dataclass(frozen=True)
class OpCount:
    """MACs of one component, split into products with weights and attention (activation x activation)."""
    weight_macs: int
    attention_macs: int

    @property
    def macs(self) -> int:
        return self.weight_macs + self.attention_macs


@dataclass(frozen=True)
class FlopsReport:
    """Counts of one model: towers and head per sample (counted), losses per batch of `batch_size` (analytic)."""
    model: str
    batch_size: int
    embed_dim: int
    vision: OpCount          # per sample
    text: OpCount            # per sample
    head: Optional[OpCount]  # per sample; None without a class head
    vocab_size: Optional[int]
    pairwise_products: int   # B x B logit matrices of the contrastive loss: 2 for CLIP, 1 for SigLIP

    @property
    def contrastive_loss_macs(self) -> int:
        """Per batch: each B x B logit matrix is B*B dot products of length D."""
        return self.pairwise_products * self.batch_size ** 2 * self.embed_dim

    @property
    def class_loss_flops(self) -> Optional[int]:
        """Per batch: a softmax cross-entropy with soft targets over B x C logits (elementwise work only).

        Per row of C logits: 4 elementwise passes of C operations (subtract the row max, exp, subtract the
        log-sum-exp, multiply by the target) and 3 reductions of C - 1 operations (the max, the sum of the exps,
        the sum of target x log-probability): 4C + 3(C - 1) = 7C - 3; the row's one log and the batch mean are
        left out. B(7C - 3) at B = 16384, C = 49408 is 5.666 GFLOPs, the paper's Table 5 ("about 7 per logit");
        7BC would print 5.667. The printed digits admit 7C - k for any k in 1..61: the 3 is the count above."""
        if self.vocab_size is None:
            return None
        per_row = CLASS_LOSS_ELEMENTWISE_PASSES * self.vocab_size + CLASS_LOSS_REDUCTIONS * (self.vocab_size - 1)
        return self.batch_size * per_row

    def rows(self) -> List[dict]:
        """One dict per component: paper-convention and standard FLOPs (both absolute counts)."""
        rows = [_tower_row("vision tower", self.vision), _tower_row("text tower", self.text)]
        if self.head is not None:
            rows.append({**_tower_row("class head", self.head), "attention": None})
        rows.append({"component": "contrastive loss", "per": "batch", "paper": self.contrastive_loss_macs,
                     "attention": None, "standard": 2 * self.contrastive_loss_macs})
        if self.class_loss_flops is not None:
            rows.append({"component": "class loss", "per": "batch", "paper": self.class_loss_flops,
                         "attention": None, "standard": self.class_loss_flops})
        return rows

    def batch_total(self, convention: str, superclip: bool = True) -> int:
        """FLOPs of one training forward pass over a batch; `superclip=False`: without head and class loss."""
        total = 0
        for row in self.rows():
            if not superclip and row["component"] in ("class head", "class loss"):
                continue
            total += row[convention] * (self.batch_size if row["per"] == "sample" else 1)
        return total

    def head_share_percent(self, convention: str) -> Optional[float]:
        """What SuperCLIP adds (head on every sample + class loss) as a percentage of CLIP's batch total."""
        if self.head is None:
            return None
        clip_total = self.batch_total(convention, superclip=False)
        return 100.0 * (self.batch_total(convention) - clip_total) / clip_total


def _tower_row(name: str, count: OpCount) -> dict:
    return {"component": name, "per": "sample", "paper": count.weight_macs,
            "attention": count.attention_macs, "standard": 2 * count.macs}


def split_counts(flop_counts: Dict) -> OpCount:
    """FlopCounterMode's {op: FLOPs} -> MACs with weights / attention MACs (it counts 2 FLOPs per MAC)."""
    weight = attention = 0
    for op, flops in flop_counts.items():
        if str(op).rsplit(".", 1)[-1] in ATTENTION_OPS:
            attention += flops // 2
        else:
            weight += flops // 2
    return OpCount(weight, attention)


def count_macs(fn, *args) -> OpCount:
    """Counts fn(*args) with FlopCounterMode, making sure attention is visible to it.

    Grad mode disables nn.MultiheadAttention's inference fast path (one fused op the counter does not know),
    and the MATH backend of scaled_dot_product_attention decomposes into bmm, which it does know (the CPU
    flash kernel, for one, has no FLOP formula in torch 2.x).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn(*args)
    return split_counts(counter.get_flop_counts().get("Global", {}))


@contextlib.contextmanager
def _quiet_logging():
    """open_clip logs 'initialized randomly' at WARNING: true but beside the point for a count."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def build_meta_model(name: str):
    """The model with every tensor on the meta device: shapes only, so even L/16 builds in a fraction of a second."""
    import open_clip
    import torch
    with _quiet_logging(), torch.device("meta"):
        model = open_clip.create_model(name, device="meta")
    return model.eval()


def count_flops(name: str, batch_size: int = PAPER_BATCH_SIZE) -> FlopsReport:
    """Counts one sample through each tower and the head (batch 1), the losses for `batch_size`."""
    import torch
    from open_clip.transformer import to_2tuple

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    model = build_meta_model(name)
    image_size = to_2tuple(model.visual.image_size)
    image = torch.zeros(1, 3, *image_size, device="meta")
    text = torch.zeros(1, model.context_length, dtype=torch.long, device="meta")
    vision = count_macs(model.encode_image, image)
    text_count = count_macs(model.encode_text, text)
    embed_dim = model.encode_text(text).shape[-1]
    text_tower = model.text if hasattr(model, "text") else model.transformer
    for tower_name, tower, count in (("vision", model.visual, vision), ("text", text_tower, text_count)):
        if count.attention_macs == 0 and any(isinstance(m, torch.nn.MultiheadAttention) for m in tower.modules()):
            raise RuntimeError(f"FlopCounterMode saw no attention products in the {tower_name} tower of {name}: "
                               "the count would be too low")
    head = vocab = None
    if hasattr(model, "class_head"):
        proj = model.class_head.proj
        head = count_macs(model.class_head, torch.zeros(1, proj.in_features, device="meta"))
        vocab = proj.out_features
    pairwise = 1 if getattr(model, "logit_bias", None) is not None else 2
    return FlopsReport(name, batch_size, embed_dim, vision, text_count, head, vocab, pairwise)


def paper_reference(name: str) -> Optional[str]:
    """The PAPER_TABLE5 key whose towers `name` has (so SuperCLIP-B-16 or stock ViT-B-16 compare too)."""
    import open_clip

    config = open_clip.get_model_config(name) if name in open_clip.list_models() else None
    if config is None:
        return None
    towers = ("embed_dim", "vision_cfg", "text_cfg", "init_logit_bias")  # a logit bias means the SigLIP loss
    for key in PAPER_TABLE5:
        reference = open_clip.get_model_config(key)
        if all(config.get(t) == reference.get(t) for t in towers):
            return key
    return None


def format_report(report: FlopsReport) -> str:
    """The table printed by `superclip flops` (GFLOPs; per sample for towers/head, per batch for losses)."""
    reference = paper_reference(report.model)
    paper_batch = report.batch_size == PAPER_BATCH_SIZE
    paper_values = {component: value for component, value in PAPER_TABLE5.get(reference, {}).items()
                    if paper_batch or not component.endswith("loss")}
    lines = [f"{report.model}: FLOPs per component, batch size {report.batch_size} "
             f"(embed dim {report.embed_dim}" + (f", vocabulary {report.vocab_size})" if report.vocab_size else ")"),
             "",
             f"{'component':<18}{'per':<8}{'paper conv.':>13}{'attention':>12}{'standard':>12}"
             + (f"{'paper A.3':>11}" if paper_values else "")]
    for row in report.rows():
        attention = "" if row["attention"] is None else f"{row['attention'] / 1e9:.3f}"
        paper = paper_values.get(row["component"])
        lines.append(f"{row['component']:<18}{row['per']:<8}{row['paper'] / 1e9:>13.3f}{attention:>12}"
                     f"{row['standard'] / 1e9:>12.3f}" + (f"{paper:>11.3f}" if paper is not None else ""))
    for convention in ("paper", "standard"):
        lines.append(f"{'total per batch':<18}{convention:<8}{report.batch_total(convention) / 1e9:>13.3f}")
    lines += ["",
              "paper conv.: GFLOPs with one multiply-accumulate = one FLOP, products with weights only (as the",
              "             paper counts); attention: the GMACs of QK^T and AV it leaves out;",
              "standard:    GFLOPs with 2 FLOPs per multiply-accumulate, attention included."]
    if report.class_loss_flops is not None:
        lines.append("The class loss is elementwise work, B * (7C - 3) operations, in both conventions.")
    for convention in ("paper", "standard"):
        share = report.head_share_percent(convention)
        if share is not None:
            paper_share = PAPER_HEAD_SHARE_PERCENT.get(reference) if convention == "paper" and paper_batch else None
            lines.append(f"SuperCLIP's addition (class head on every sample + class loss), {convention} convention: "
                         f"{share:.3f}% of the batch total without it"
                         + (f" (paper: {paper_share:.3f}%)" if paper_share else ""))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="superclip flops",
        description="FLOPs per component of an open_clip model (SuperCLIP paper, appendix A.3 / Table 5): "
                    "towers and class head per sample, counted by torch's FlopCounterMode on the meta device; "
                    "contrastive and class loss per batch, analytically.")
    parser.add_argument("--model", action="append", required=True,
                        help="open_clip model name, e.g. SuperCLIP-ViT-B-16; repeat for several models")
    parser.add_argument("--batch-size", type=int, default=PAPER_BATCH_SIZE,
                        help=f"global batch size for the per-batch losses (default {PAPER_BATCH_SIZE}, the paper's)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    import open_clip

    import open_clip_superclip  # noqa: F401  (registers the SuperCLIP configs even with auto-loading off)
    known = set(open_clip.list_models())
    for name in args.model:
        if name not in known and not name.startswith(("hf-hub:", "local-dir:")):
            parser.error(f"unknown model {name!r}; `python -c \"import open_clip; print(open_clip.list_models())\"` "
                         "lists the known ones")
    for index, name in enumerate(args.model):
        report = count_flops(name, args.batch_size)
        sys.stdout.write(("\n" if index else "") + format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
