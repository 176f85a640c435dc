"""Fault tolerance of trainer runs: atomic checkpoints, a ``--resume latest`` that only picks a file that loads,
and a guard that skips optimizer steps whose loss is not finite.

Stock open_clip_train writes ``epoch_N.pt`` in place (a kill mid-save leaves a truncated newest file) and its
``--resume latest`` resumes the last ``*.pt`` in natural order, temporary files included. The functions here are
installed into open_clip_train by open_clip_superclip.train.plugin; healthy runs write byte-identical checkpoints
and take bit-identical steps. See docs/fault_tolerance.md.
"""
import contextlib
import functools
import glob
import logging
import os
import re
import shutil
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..atomic import PARTIAL_MARK, atomic_save
from ..distributed import all_reduce_sum

_logger = logging.getLogger(__name__)

STOCK_TEMP_NAME = "tmp.pt"  # open_clip_train.main's temporary file for --save-most-recent
STOP_CHECKPOINT_PREFIX = "nonfinite_stop_"
INJECT_ENV = "SUPERCLIP_TEST_NONFINITE_LOSS"  # test-only, see NonFiniteInjection


def _is_resume_candidate(below_root: str) -> bool:
    """Temporary files of interrupted writes and the stop checkpoints of the non-finite guard are not resumed.

    ``below_root`` is the path under the listed checkpoints folder: only its own components are judged, so a run
    kept under ``~/.cache`` or ``/scratch/.exp`` resumes like any other.
    """
    parts = [part for part in below_root.replace("\\", "/").split("/") if part not in ("", ".")]
    return not (parts[-1] == STOCK_TEMP_NAME or parts[-1].startswith(STOP_CHECKPOINT_PREFIX)
                or any(part.startswith(".") for part in parts))


def _list_checkpoints(path: str, remote: bool) -> List[Tuple[str, str]]:
    """(the checkpoint as the trainer will load it, its path below ``path``) for every ``*.pt`` under ``path``."""
    if remote:
        import fsspec
        fs, root = fsspec.core.url_to_fs(path)
        root = root.rstrip("/")
        found = [found[len(root):].lstrip("/") for found in fs.glob(glob.escape(root) + "/**/*.pt")]
        return [(path.rstrip("/") + "/" + below, below) for below in found]  # spelled as in path
    for leftover in glob.glob(os.path.join(glob.escape(path), f".*{PARTIAL_MARK}*")):
        _logger.info(f"--resume latest: removing {leftover}, left by a checkpoint write that was interrupted")
        shutil.rmtree(leftover, ignore_errors=True)
    found = glob.glob(os.path.join(glob.escape(path), "**", "*.pt"), recursive=True)
    return [(candidate, os.path.relpath(candidate, path)) for candidate in found]


def latest_loadable_checkpoint(path: str, remote: bool, sort_key: Callable, load: Callable) -> Optional[str]:
    """The last checkpoint under ``path`` in ``sort_key`` order (the stock order) that ``load`` can read.

    Skips temporary files and, with a warning naming it, every newer checkpoint that does not load (truncated,
    unreadable). ``load`` is the trainer's own loader, so "loads" means what resuming will need.
    """
    candidates = sorted((found for found, below in _list_checkpoints(path, remote) if _is_resume_candidate(below)),
                        key=sort_key, reverse=True)
    for candidate in candidates:
        try:
            load(candidate)
        except Exception as error:  # noqa: BLE001 - any reason it cannot be read makes it unusable for resuming
            _logger.warning(f"--resume latest: skipping {candidate}: it does not load "
                            f"({type(error).__name__}: {str(error).strip()[:300]})")
            continue
        _logger.info(f"--resume latest: resuming from {candidate}")
        return candidate
    _logger.info(f"--resume latest: no loadable checkpoint in {path}")
    return None


_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # s3://, gs://, https://, pipe:, file://


def stop_if_no_shard_exists(stock_get_wds_dataset):
    """open_clip_train's webdataset reader skips a shard it cannot open with a warning; when none opens, its
    training loader waits for samples forever (hundreds of thousands of warnings a minute, no exit). A shard list
    of local files none of which exists stops the run at once instead, naming the pattern. Lists with a missing
    shard among existing ones, and remote lists, behave as in stock open_clip."""
    @functools.wraps(stock_get_wds_dataset)
    def get_wds_dataset(args, preprocess_img, is_train, *more, **kwargs):
        from open_clip_train.data import expand_urls
        flag, pattern = ("--train-data", args.train_data) if is_train else ("--val-data", args.val_data)
        urls, _ = expand_urls(pattern) if isinstance(pattern, str) else ([], None)
        local = [url[len("file://"):] if url.startswith("file://") else url for url in urls
                 if url.startswith("file://") or not _URL_SCHEME.match(url)]
        if urls and len(local) == len(urls) and not any(os.path.exists(path) for path in local):
            raise FileNotFoundError(f"{flag} {pattern}: none of its {len(urls)} shard(s) exists (the first: "
                                    f"{local[0]}); check the path and the brace pattern")
        return stock_get_wds_dataset(args, preprocess_img, is_train, *more, **kwargs)

    return get_wds_dataset


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss."""


class NonFiniteInjection:
    """Test-only: ``SUPERCLIP_TEST_NONFINITE_LOSS=NAME:STEPS[:RANK][;...]`` makes loss component NAME NaN at the
    given global optimizer steps (the trainer's step numbers: ``3``, ``1,4-6``), on every rank or only on RANK."""

    def __init__(self, spec: str):
        self.rules = []
        for rule in spec.split(";"):
            try:
                name, steps, *rank = rule.split(":")
                if len(rank) > 1 or not name:
                    raise ValueError
                numbers = set()
                for part in steps.split(","):
                    first, _, last = part.partition("-")
                    numbers.update(range(int(first), int(last or first) + 1))
                self.rules.append((name, numbers, int(rank[0]) if rank else None))
            except ValueError:
                raise ValueError(f"{INJECT_ENV}={spec!r}: expected NAME:STEPS[:RANK][;...], e.g. "
                                 f"class_loss:1,4-6:1") from None

    def apply(self, losses: Dict[str, torch.Tensor], step: int, rank: int) -> None:
        for name, steps, only_rank in self.rules:
            if step in steps and only_rank in (None, rank):
                if name not in losses:
                    raise KeyError(f"{INJECT_ENV}: the loss has no component {name!r} (it has {sorted(losses)})")
                losses[name] = losses[name] + float("nan")


class _GatedOptimizer:
    """The optimizer as train_one_epoch sees it: ``step()`` does nothing in a step the guard skips."""

    def __init__(self, optimizer, guard):
        self._optimizer, self._guard = optimizer, guard

    def __getattr__(self, name):
        return getattr(self._optimizer, name)

    def step(self, *args, **kwargs):
        if not self._guard.step_bad:
            return self._optimizer.step(*args, **kwargs)


class _GatedScaler:
    """The GradScaler as train_one_epoch sees it: in a skipped step there is no backward, so unscale_, step and
    update must not run either (GradScaler asserts that inf checks were recorded, and the scale stays)."""

    def __init__(self, scaler, guard):
        self._scaler, self._guard = scaler, guard

    def __getattr__(self, name):
        return getattr(self._scaler, name)

    @staticmethod
    def _real(optimizer):
        return optimizer._optimizer if isinstance(optimizer, _GatedOptimizer) else optimizer

    def unscale_(self, optimizer):
        if not self._guard.step_bad:
            self._scaler.unscale_(self._real(optimizer))

    def step(self, optimizer, *args, **kwargs):
        if not self._guard.step_bad:
            return self._scaler.step(self._real(optimizer), *args, **kwargs)

    def update(self, *args, **kwargs):
        if not self._guard.step_bad:
            self._scaler.update(*args, **kwargs)


class NonFiniteLossGuard:
    """Skips every optimizer step whose loss (any component, on any rank) is NaN or inf, and stops the run after
    more than ``max_bad_steps`` consecutive ones.

    The decision is taken before backward and all-reduced, so all ranks skip together. A skipped step still
    runs a plain backward (it frees the step's autograd graph, which would otherwise stay alive through the next
    forward, and keeps DDP's gradient all-reduces matched across ranks), then drops the gradients: no optimizer
    or scaler step, and the batch's pending IDF counts are discarded. Healthy steps run the stock code unchanged
    (bit-identical); the price is one all-reduce of a few flags and one host sync per micro-batch.
    """

    def __init__(self, args):
        self.args = args
        self.max_bad_steps = args.superclip_max_bad_steps
        spec = os.environ.get(INJECT_ENV)
        self.injection = NonFiniteInjection(spec) if spec else None
        self.consecutive = 0
        self.total = 0
        self.step_bad = False
        self._bad = {}
        self._micro = 0
        self._losses = None

    @contextlib.contextmanager
    def epoch(self, model, data, loss, epoch, optimizer, scaler):
        """Watches one train_one_epoch call; yields the optimizer and scaler to hand to it."""
        self.model, self.loss, self.epoch_index, self.optimizer, self.scaler = model, loss, epoch, optimizer, scaler
        self.steps_per_epoch = data["train"].dataloader.num_batches // self.args.accum_freq
        self.epoch_step, self._micro, self.step_bad = 0, 0, False
        skipped_before = self.total
        hook = loss.register_forward_hook(self._on_losses)
        try:
            yield _GatedOptimizer(optimizer, self), scaler if scaler is None else _GatedScaler(scaler, self)
        finally:
            hook.remove()
            self.optimizer = self.scaler = self.model = self.loss = self._losses = None
        if self.total > skipped_before and self.args.rank == 0:
            _logger.warning(f"Epoch {epoch}: {self.total - skipped_before} optimizer steps skipped for a "
                            f"non-finite loss ({self.total} in this run)")

    @property
    def global_step(self) -> int:
        return self.steps_per_epoch * self.epoch_index + self.epoch_step

    def _on_losses(self, module, inputs, losses):
        if not isinstance(losses, dict):
            return
        if self.injection is not None:
            self.injection.apply(losses, self.global_step, self.args.rank)
        self._losses = losses

    def _non_finite_on_any_rank(self, total_loss: torch.Tensor) -> Dict[str, int]:
        """{loss name: number of ranks where it is not finite}, the same on every rank."""
        values = {name: value for name, value in (self._losses or {}).items() if name != "loss"}
        values["loss"] = total_loss
        flags = torch.stack([~torch.isfinite(v.detach()).all() for v in values.values()]).to(torch.float32)
        counts = all_reduce_sum(flags).tolist()
        bad = {name: int(n) for name, n in zip(values, counts) if n}
        if len(bad) > 1:
            bad.pop("loss")  # the total is named only when no component is to blame (the sum overflowed)
        return bad

    def backward(self, total_loss: torch.Tensor, scaler, stock_backward) -> None:
        """Stands in for open_clip_train.train.backward: called once per micro-batch, accum_freq per step."""
        if self._micro == 0:
            self.step_bad, self._bad = False, {}
        if not self.step_bad:
            self._bad = self._non_finite_on_any_rank(total_loss)
            self.step_bad = bool(self._bad)
        if self.step_bad:
            total_loss.backward()  # its gradients are dropped in _end_step; the scaler is not involved
        else:
            stock_backward(total_loss, scaler)
        self._micro += 1
        if self._micro == self.args.accum_freq:
            self._end_step()

    def _end_step(self) -> None:
        if self.step_bad:
            # The gated optimizer and scaler skip the update; the batch's IDF counts are dropped, not committed.
            self.optimizer.zero_grad(set_to_none=True)
            self.loss.discard_pending_statistics()
            self.consecutive += 1
            self.total += 1
            if self.args.rank == 0:
                world = getattr(self.args, "world_size", 1)
                which = ", ".join(f"{name} (on {n} of {world} ranks)" if world > 1 else name
                                  for name, n in self._bad.items())
                _logger.warning(f"Non-finite loss at epoch {self.epoch_index} step {self.global_step}: {which}; "
                                f"step skipped (no optimizer update, IDF statistics unchanged). "
                                f"{self.consecutive} consecutive, {self.total} in this run")
            if self.consecutive > self.max_bad_steps:
                self._stop()
        else:
            self.consecutive = 0
        # step_bad stays set until the next step's first backward: the stock loop steps after the last backward.
        self._micro = 0
        self.epoch_step += 1

    def _stop(self) -> None:
        args = self.args
        path = os.path.join(args.checkpoint_path,
                            f"{STOP_CHECKPOINT_PREFIX}epoch_{self.epoch_index}_step_{self.global_step}.pt")
        if args.save_logs:
            checkpoint = {
                "epoch": self.epoch_index,  # resuming from it replays this epoch from its start
                "name": args.name,
                "state_dict": getattr(self.model, "_orig_mod", self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.global_step,
            }
            if self.scaler is not None:
                checkpoint["scaler"] = self.scaler.state_dict()
            atomic_save(checkpoint, path)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank exits (and gets its peers killed by torchrun) before the checkpoint is written
        message = (f"SuperCLIP: {self.consecutive} consecutive optimizer steps had a non-finite loss "
                   f"({', '.join(self._bad)}; last at epoch {self.epoch_index} step {self.global_step}), more than "
                   f"--superclip-max-bad-steps {self.max_bad_steps} allows: stopping. The model and optimizer are "
                   f"those of the last good step" + (f", saved to {path}" if args.save_logs else "") +
                   ". Lower --lr, check the data, or raise --superclip-max-bad-steps.")
        _logger.error(message)
        raise NonFiniteLossError(message)


_guard: Optional[NonFiniteLossGuard] = None
_active: Optional[NonFiniteLossGuard] = None


def guarded_backward(stock_backward):
    """open_clip_train.train.backward, routed through the guard while a guarded epoch runs."""
    def backward(total_loss, scaler):
        if _active is None:
            return stock_backward(total_loss, scaler)
        return _active.backward(total_loss, scaler, stock_backward)

    backward.__wrapped__ = stock_backward
    return backward


def guarded_train_one_epoch(stock_train_one_epoch):
    """open_clip_train.train.train_one_epoch with the non-finite loss guard, for SuperCLIP runs."""
    def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        global _guard, _active
        if not getattr(args, "superclip", False) or args.superclip_max_bad_steps < 0:
            return stock_train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                                         tb_writer=tb_writer)
        if _guard is None or _guard.args is not args:
            _guard = NonFiniteLossGuard(args)
        with _guard.epoch(model, data, loss, epoch, optimizer, scaler) as (gated_optimizer, gated_scaler):
            _active = _guard
            try:
                return stock_train_one_epoch(model, data, loss, epoch, gated_optimizer, gated_scaler, scheduler,
                                             dist_model, args, tb_writer=tb_writer)
            finally:
                _active = None

    train_one_epoch.__wrapped__ = stock_train_one_epoch
    return train_one_epoch
