"""A test-only launcher: ``python tests/trainer_probe.py ARGS`` runs ``python -m training.main ARGS`` in this
process and records what the trainer built, for tests that need more than its logs and checkpoints.

Environment:
- SUPERCLIP_PROBE_DIR (required): where the records go:
  ``patch_dropout.jsonl``: one line per PatchDropout call (training flag, prob, tokens in and out);
  ``loss_call_0.pt``: the first ClassificationAugmentedLoss call: the contrastive loss's class, the IDF counts
  before the call, every input and the returned losses (detached, on CPU).
- SUPERCLIP_PROBE_MODEL_CONFIGS (optional): a folder of extra model configs (open_clip.add_model_config).
"""
import json
import os
import runpy
import sys

import torch


def _detached(value):
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def install(record_dir):
    import open_clip
    from open_clip.transformer import PatchDropout

    from open_clip_superclip.loss import ClassificationAugmentedLoss

    stock_dropout, stock_loss = PatchDropout.forward, ClassificationAugmentedLoss.forward

    def dropout_forward(self, x):
        out = stock_dropout(self, x)
        with open(os.path.join(record_dir, "patch_dropout.jsonl"), "a") as f:
            f.write(json.dumps({"training": self.training, "prob": self.prob, "tokens_in": x.shape[1],
                                "tokens_out": out.shape[1]}) + "\n")
        return out

    calls = []

    def loss_forward(self, *args, **kwargs):
        prior = None if self.statistics is None else (_detached(self.statistics.doc_freq),
                                                       _detached(self.statistics.num_captions))
        losses = stock_loss(self, *args, **kwargs)
        if not calls:
            kind = type(self.contrastive_loss)
            torch.save({"contrastive_type": f"{kind.__module__}.{kind.__qualname__}", "prior": prior,
                        "class_loss_weight": self.class_loss_weight, "idf": self.idf,
                        "args": [_detached(a) for a in args],
                        "kwargs": {k: _detached(v) for k, v in kwargs.items()},
                        "losses": {k: _detached(v) for k, v in losses.items()}},
                       os.path.join(record_dir, "loss_call_0.pt"))
        calls.append(1)
        return losses

    PatchDropout.forward = dropout_forward
    ClassificationAugmentedLoss.forward = loss_forward
    if os.environ.get("SUPERCLIP_PROBE_MODEL_CONFIGS"):
        open_clip.add_model_config(os.environ["SUPERCLIP_PROBE_MODEL_CONFIGS"])


if __name__ == "__main__":
    install(os.environ["SUPERCLIP_PROBE_DIR"])
    sys.argv = ["training.main", *sys.argv[1:]]
    runpy.run_module("training.main", run_name="__main__", alter_sys=True)
