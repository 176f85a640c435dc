"""What the demo and the experiment train: methods, schedules and cells (one trainer run each), and the grids.

A cell's identity is its fields plus its trainer command: a finished cell with the same identity is reused, a
cell whose identity changed starts over (runner.CellRun).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Optional

MODEL = "SuperCLIP-ViT-Tiny"


@dataclass(frozen=True)
class Schedule:
    """What the trainer is told besides the method under test."""
    batch_size: int
    epochs: int
    lr: float = 1e-3
    wd: float = 0.1
    warmup: float = 0.05  # share of the total steps
    samples_per_epoch: Optional[int] = None  # None: all training samples; N: the first N of them
    save_every: int = 0  # also evaluate every N epochs (0: the last epoch only)


@dataclass(frozen=True)
class Method:
    label: str
    lam: float
    idf: Optional[str] = None
    flags: tuple = ()  # further trainer flags (which caption goes where)


LONG = ("--csv-long-caption-key", "long")
METHODS = {
    "clip": Method("CLIP", 0.0),
    "superclip": Method("SuperCLIP", 1.0),
    "superclip-lam0.4": Method("SuperCLIP λ=0.4", 0.4),
    "superclip-lam1.6": Method("SuperCLIP λ=1.6", 1.6),
    "superclip-idfnone": Method("SuperCLIP without IDF", 1.0, "none"),
    # the paper's DualCaption table: where the long caption goes
    "clip-long": Method("CLIP, long captions", 0.0, flags=("--csv-caption-key", "long")),
    "clip-mix": Method("CLIP, 0.8/0.2 short/long mix", 0.0, flags=(*LONG, "--caption-mix-long-ratio", "0.2")),
    "superclip-dual": Method("SuperCLIP DualCaption", 1.0, flags=(*LONG, "--superclip-class-caption", "long")),
}
ABLATIONS = ("superclip-lam0.4", "superclip-lam1.6", "superclip-idfnone")
DUAL_ARMS = ("clip", "clip-long", "clip-mix", "superclip", "superclip-dual")
STUDIES = {"demo": "the demo", "batch": "small-batch study (OpenMoji)",
           "dual": "DualCaption study (Open Clip Art)", "finetune": "fine-tuning (OpenMoji CLIP -> Open Clip Art)"}


@dataclass(frozen=True)
class Cell:
    name: str
    method: str  # a METHODS key
    seed: int
    schedule: Schedule
    dataset: str = "emoji"  # a data.DATASETS key
    study: str = "demo"  # a STUDIES key
    init: Optional[str] = None  # the cell whose final weights this one starts from (fine-tuning)

    @property
    def group(self) -> str:
        """Cells that differ only in the seed."""
        return f"{self.study}:{self.method}-b{self.schedule.batch_size}"


@dataclass(frozen=True)
class Mode:
    """One way to run: the data sets it builds (data.DATASETS key -> build settings), its cells, its folders."""
    name: str
    data: dict
    data_dirs: dict
    runs: str
    report: str
    cells: tuple

    @property
    def smoke(self) -> bool:
        return "smoke" in self.name


def batch_lr(batch: int) -> float:
    """1e-3 at batch 64 (tuned for the demo), scaled with the square root of the batch (AdamW's usual rule), so
    that each batch size in the small-batch study trains at a comparable rate."""
    return 1e-3 * math.sqrt(batch / 64)


def demo_cells(schedule: Schedule) -> tuple:
    return tuple(Cell(method, method, 0, schedule) for method in ("clip", "superclip"))


@dataclass(frozen=True)
class Grid:
    """The experiment's sizes; the full grid and the smoke grid differ only here."""
    seeds: tuple
    batches: tuple  # the small-batch study, largest first
    ablation_batch: int
    emoji_epochs: int
    clipart_epochs: int  # also fine-tuning's: it differs from the from-scratch arms only in its start
    ablations: tuple = ABLATIONS
    dual_arms: tuple = DUAL_ARMS
    finetune_methods: tuple = ("clip", "superclip")
    clipart_batch: int = 64
    samples_per_epoch: Optional[int] = None
    emoji_eval_every: int = 1  # epochs between evaluations (OpenMoji's 720 classes make each one dear)


def experiment_cells(grid: Grid) -> tuple:
    """Seed-major, so a partial experiment has every group at one seed before any at two; each seed's
    fine-tuning cells come after the OpenMoji CLIP cell they start from."""
    cells = []
    for seed in grid.seeds:
        for batch in grid.batches:
            schedule = Schedule(batch, grid.emoji_epochs, lr=batch_lr(batch), save_every=grid.emoji_eval_every,
                                samples_per_epoch=grid.samples_per_epoch)
            methods = ("clip", "superclip") + (grid.ablations if batch == grid.ablation_batch else ())
            cells += [Cell(f"emoji-{m}-b{batch}-s{seed}", m, seed, schedule, "emoji", "batch") for m in methods]
        schedule = Schedule(grid.clipart_batch, grid.clipart_epochs, lr=batch_lr(grid.clipart_batch),
                            save_every=1, samples_per_epoch=grid.samples_per_epoch)
        cells += [Cell(f"clipart-{m}-s{seed}", m, seed, schedule, "clipart", "dual") for m in grid.dual_arms]
        source = f"emoji-clip-b{grid.ablation_batch}-s{seed}"
        cells += [Cell(f"finetune-{m}-s{seed}", m, seed, schedule, "clipart", "finetune", init=source)
                  for m in grid.finetune_methods]
    return tuple(cells)


def select_cells(cells, patterns: list) -> list:
    """The cells matching any of the glob patterns (all without patterns); ValueError names unmatched ones."""
    if not patterns:
        return list(cells)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(cell.name, p) for cell in cells)]
    if unmatched:
        raise ValueError(f"--cell {', '.join(unmatched)} matches no cell; the cells: "
                         f"{', '.join(cell.name for cell in cells)}")
    return [cell for cell in cells if any(fnmatch.fnmatchcase(cell.name, p) for p in patterns)]
