"""The ``open_clip_train.plugins`` entry point and every patch of open_clip_train (and the trainer's torch DDP).

Two tables, installed by `patching.install`:
- ON_IMPORT, when open_clip_train is first imported: our flags join the stock parser; the run's model, loss,
  training data and step are routed through our code, which delegates unchanged unless the run asks for SuperCLIP.
- ON_TRAINER_START, when open_clip_train.main.main parses its arguments (the first point at which its globals
  exist both for ``-m training.main`` and for ``-m open_clip_train.main``, where the module runs as __main__):
  checkpoint writing and ``--resume latest`` in that module, and the process-wide DDP shim, which only a
  trainer process should get.
"""
import functools
import sys
import types

import torch

from ..patching import CHECKED_OPEN_CLIP, Patch, UpstreamMoved, install, require
from . import fault_tolerance, run

# dual_caption and flags import open_clip_train, whose import runs register(): they load inside the replacements,
# which run once open_clip_train is whole.

CHECKED = "open_clip_torch 3.0-3.3"


def register():
    """The ``open_clip_train.plugins`` entry point."""
    install(ON_IMPORT)


def start_trainer(args) -> None:
    """The trainer parsed its arguments: this process is a training run."""
    run.start_run(args)
    install(ON_TRAINER_START)


# ------------------------------------------------------------------------------------------------- replacements
def _argparse_with_superclip_flags(argparse_module):
    """A stand-in for the ``argparse`` name inside open_clip_train.params whose ArgumentParser carries our flags:
    --help lists them, and their errors exit 2 like open_clip's own."""

    from . import flags

    class ArgumentParser(argparse_module.ArgumentParser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            flags.add_superclip_args(self)

        def parse_args(self, args=None, namespace=None):
            return flags.finalize_superclip_args(self, super().parse_args(args, namespace))

    shim = types.ModuleType(argparse_module.__name__)
    shim.__dict__.update(vars(argparse_module))
    shim.ArgumentParser = ArgumentParser
    return shim


def _parse_args_starting_the_trainer(stock_parse_args):
    @functools.wraps(stock_parse_args)
    def parse_args(args):
        parsed = stock_parse_args(args)
        start_trainer(parsed)
        return parsed

    return parse_args


def _vit_defaults_for_short_aliases(stock_default_params):
    """Names without "vit" get ResNet Adam defaults; our short aliases (SuperCLIP-L-14) are ViTs."""
    @functools.wraps(stock_default_params)
    def get_default_params(model_name):
        from ..configs import superclip_config
        if superclip_config(model_name) is not None and "vit" not in model_name.lower():
            return stock_default_params(f"ViT-{model_name}")
        return stock_default_params(model_name)

    return get_default_params


def _model_of_the_run(stock_create):
    @functools.wraps(stock_create)
    def create_model_and_transforms(model_name, *args, **kwargs):
        result = stock_create(model_name, *args, **{**kwargs, **run.model_overrides(model_name)})
        run.on_model_created(model_name, result[0])
        return result

    return create_model_and_transforms


def _loss_of_the_run(stock_create_loss):
    @functools.wraps(stock_create_loss)
    def create_loss(args):
        return run.wrap_loss(args, stock_create_loss(args))

    return create_loss


def _dual_caption_data(kind: str):
    def replace(stock_dataset_fn):
        from . import dual_caption
        if kind == "webdataset":
            stock_dataset_fn = fault_tolerance.stop_if_no_shard_exists(stock_dataset_fn)
        insert = insert_wds_sample_stage if kind == "webdataset" else None
        return dual_caption.train_dataset_fn(stock_dataset_fn, kind, insert)

    return replace


def _dual_caption_csv_dataset(stock_csv_dataset):
    from . import dual_caption
    if stock_csv_dataset is not dual_caption.DualCaptionCsvDataset.__base__:
        raise UpstreamMoved("open_clip_train.data.CsvDataset was replaced by someone else")
    return dual_caption.DualCaptionCsvDataset


def insert_wds_sample_stage(data_info, stage):
    """Runs ``stage`` over the raw samples of a training DataInfo built by open_clip_train's get_wds_dataset.

    There ``data_info.dataloader`` is a wds.WebLoader (a DataPipeline whose first stage is a torch DataLoader)
    over a wds.DataPipeline whose ``pipeline`` list holds the module-level ``tarfile_to_samples_nothrow``
    (samples as dicts of raw bytes, before shuffle / select / decode / rename / tokenize); the stage goes right
    after it. Checked on open_clip_torch 3.0-3.3 with webdataset 0.2.
    """
    from open_clip_train import data
    reader = require(data, "tarfile_to_samples_nothrow")
    loader = (getattr(data_info.dataloader, "pipeline", None) or [None])[0]
    stages = getattr(getattr(loader, "dataset", None), "pipeline", None)
    index = next((i for i, s in enumerate(stages or ()) if s is reader), None)
    if not isinstance(stages, list) or index is None:
        raise UpstreamMoved("open_clip_train.data.get_wds_dataset no longer builds a wds.DataPipeline with "
                            f"tarfile_to_samples_nothrow as a stage; open_clip_superclip was checked against "
                            f"{CHECKED_OPEN_CLIP}")
    stages.insert(index + 1, stage)


def _latest_loadable_checkpoint(stock_latest):
    """Keeps the stock order (natural_key) and loader (pt_load) of the module it replaces the function in."""
    main = types.SimpleNamespace(**{**stock_latest.__globals__, "__name__": "open_clip_train.main"})
    natural_key, pt_load = require(main, "natural_key"), require(main, "pt_load")

    @functools.wraps(stock_latest)
    def get_latest_checkpoint(path, remote):
        return fault_tolerance.latest_loadable_checkpoint(
            path, remote, sort_key=natural_key, load=lambda p: pt_load(p, map_location="cpu"))

    return get_latest_checkpoint


def _torch_with_atomic_save(stock_torch):
    from ..atomic import atomic_save
    if stock_torch is not torch:
        raise UpstreamMoved("open_clip_train.main.torch is not torch: someone else replaced it")
    with_atomic_save = types.ModuleType(torch.__name__, torch.__doc__)
    with_atomic_save.__getattr__ = functools.partial(getattr, torch)
    with_atomic_save.save = atomic_save
    return with_atomic_save


def _ddp_accepting_cpu_device_ids(ddp_class):
    class DistributedDataParallel(ddp_class):
        """open_clip_train.main passes device_ids=[device] even for CPU (gloo) runs, which DDP rejects;
        CPU modules take device_ids=None. CUDA runs are passed through unchanged."""

        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    DistributedDataParallel.__qualname__ = ddp_class.__qualname__
    return DistributedDataParallel


def trainer_main_modules():
    """open_clip_train.main as imported (``-m training.main``), or running as ``__main__``
    (``-m open_clip_train.main``: then its globals exist only in that module)."""
    modules = (sys.modules.get(key) for key in ("open_clip_train.main", "__main__"))
    return [m for m in modules if getattr(getattr(m, "__spec__", None), "name", None) == "open_clip_train.main"]


# ------------------------------------------------------------------------------------------------------- tables
_MAIN = "open_clip_train.main.main"
_TRAIN = "open_clip_train.train.train_one_epoch"
ON_IMPORT = (
    Patch("open_clip_train.params.argparse", CHECKED, "our flag group joins the stock parser (--help, exit code 2)",
          replace=_argparse_with_superclip_flags,
          assumes=(("open_clip_train.params.parse_args", "parser = argparse.ArgumentParser()"),)),
    Patch("open_clip_train.params.get_default_params", CHECKED,
          "short aliases (no 'vit' in the name) get the ViT Adam defaults", replace=_vit_defaults_for_short_aliases,
          assumes=(("open_clip_train.params.parse_args", "get_default_params(args.model)"),)),
    Patch("open_clip_train.params.parse_args", CHECKED,
          "the trainer's first call: the run is recorded and the trainer-process patches go in",
          replace=_parse_args_starting_the_trainer,
          assumes=((_MAIN, "args = parse_args(args)"),
                   ("open_clip_train.main", "from open_clip_train.params import parse_args"))),
    Patch("open_clip.factory.create_model_and_transforms", CHECKED,
          "the run's model gains the class head (--superclip-lambda on a stock ViT) or loses it (lambda 0)",
          replace=_model_of_the_run, aliases=("open_clip.create_model_and_transforms",),
          assumes=(("open_clip_train.main", "from open_clip import create_model_and_transforms"),
                   (_MAIN, "model.load_state_dict(sd)"))),
    Patch("open_clip.factory.create_loss", CHECKED, "a SuperCLIP run's loss is wrapped in ClassificationAugmentedLoss",
          replace=_loss_of_the_run, aliases=("open_clip.create_loss",),
          assumes=((_MAIN, "loss = create_loss(args)"),
                   # the loss sees the model's batch-major outputs, concatenated over micro-batches for accumulation
                   (_TRAIN, "losses = loss(**model_out, output_dict=True)"),
                   (_TRAIN, "inputs[key] = torch.cat(accumulated[:j] + [model_out[key]] + accumulated[j + 1:])"),
                   (_TRAIN, 'for f in ("logit_scale", "logit_bias"):'))),
    Patch("open_clip_train.data.get_wds_dataset", CHECKED,
          "DualCaption / caption mixing on webdataset training data; a shard list none of which exists stops the "
          "run (stock waits for samples forever)",
          replace=_dual_caption_data("webdataset"),
          assumes=(("open_clip_train.data.get_dataset_fn", "return get_wds_dataset"),
                   ("open_clip_train.data.get_wds_dataset", "input_shards = args.train_data if is_train else args.val_data"))),
    Patch("open_clip_train.data.get_csv_dataset", CHECKED, "DualCaption / caption mixing on CSV training data",
          replace=_dual_caption_data("csv"),
          assumes=(("open_clip_train.data.get_dataset_fn", "return get_csv_dataset"),)),
    Patch("open_clip_train.data.CsvDataset", CHECKED, "a CSV dataset that also reads the long-caption column",
          replace=_dual_caption_csv_dataset,
          assumes=(("open_clip_train.data.get_csv_dataset", "dataset = CsvDataset("),)),
    Patch("open_clip_train.train.backward", CHECKED, "SuperCLIP runs skip a step whose loss is NaN/inf",
          replace=fault_tolerance.guarded_backward,
          assumes=((_TRAIN, "backward(total_loss, scaler)"),)),
)
ON_TRAINER_START = (
    Patch("open_clip_train.main.get_latest_checkpoint", CHECKED,
          "--resume latest resumes the newest checkpoint that loads, never a temporary file",
          replace=_latest_loadable_checkpoint, modules=trainer_main_modules,
          assumes=((_MAIN, "resume_from = get_latest_checkpoint(checkpoint_path, remote=args.remote_sync is not None)"),)),
    Patch("open_clip_train.main.train_one_epoch", CHECKED,
          "SuperCLIP runs train under the non-finite loss guard", replace=fault_tolerance.guarded_train_one_epoch,
          modules=trainer_main_modules,
          assumes=(("open_clip_train.main", "from open_clip_train.train import train_one_epoch"),
                   (_MAIN, "train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, "
                           "args, tb_writer=writer)"))),
    Patch("open_clip_train.main.torch", CHECKED, "checkpoints are written atomically (torch.save through this name)",
          replace=_torch_with_atomic_save, modules=trainer_main_modules,
          assumes=((_MAIN, "torch.save(checkpoint_dict, tmp_save_path)"),)),
    Patch("torch.nn.parallel.DistributedDataParallel", "open_clip_torch 3.3 with torch 2.14",
          "stock main passes device_ids=[cpu] for gloo runs, which DDP rejects (trainer processes only)",
          replace=_ddp_accepting_cpu_device_ids,
          assumes=((_MAIN, "DistributedDataParallel(model, device_ids=[device]"),)),
)
