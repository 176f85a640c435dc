"""Every place where open_clip / open_clip_train is patched, in one module.

Each patch names the upstream function it replaces and the versions it was checked against; all of them
delegate to the original unchanged unless a SuperCLIP model or flag is involved, so stock runs stay
bit-identical. tests/test_upstream_contract.py fails loudly when upstream moves.
"""
import functools
import logging

_logger = logging.getLogger(__name__)

CHECKED_OPEN_CLIP = ">=3.0,<4 (checked on open_clip_torch 3.3.0)"
_installed = set()


class UpstreamMoved(RuntimeError):
    pass


def _require(module, name):
    if not hasattr(module, name):
        raise UpstreamMoved(f"{module.__name__}.{name} no longer exists: open_clip_superclip was checked against "
                            f"open_clip_torch {CHECKED_OPEN_CLIP}; pin open_clip_torch to that range")
    return getattr(module, name)


def _once(key):
    if key in _installed:
        return False
    _installed.add(key)
    return True


def superclip_model_class(**model_cfg):
    """Stands in for CLIP in open_clip.factory: configs with ``superclip_cfg`` build SuperCLIP."""
    from open_clip.model import CLIP
    from .model import SuperCLIP
    if model_cfg.get("superclip_cfg") is None:
        model_cfg.pop("superclip_cfg", None)
        return CLIP(**model_cfg)
    return SuperCLIP(**model_cfg)


superclip_model_class.__name__ = "CLIP"


def install_core():
    """Patches needed by ``open_clip.create_model`` & co. Idempotent."""
    if not _once("core"):
        return
    import open_clip
    from open_clip import factory

    # open_clip.factory.create_model: `model_class = CLIP` (a module-global lookup at call time) then
    # `model_class(**final_model_cfg, cast_dtype=...)`; the name CLIP in factory's namespace is only used there.
    # Checked on open_clip_torch 3.0-3.3.
    _require(factory, "CLIP")
    factory.CLIP = superclip_model_class

    # open_clip.factory.get_tokenizer: a name containing "siglip" selects the SigLIP T5 tokenizer (a hub
    # download); SuperSigLIP models classify CLIP BPE tokens, so they get open_clip's SimpleTokenizer.
    # open_clip/__init__ re-exports it. Checked on open_clip_torch 3.0-3.3.
    stock_get_tokenizer = _require(factory, "get_tokenizer")

    @functools.wraps(stock_get_tokenizer)
    def get_tokenizer(model_name: str = "", context_length=None, cache_dir=None, **kwargs):
        from .registry import superclip_config
        config = superclip_config(model_name)
        if config is None or "siglip" not in model_name.lower() or config["text_cfg"].get("hf_tokenizer_name"):
            return stock_get_tokenizer(model_name, context_length=context_length, cache_dir=cache_dir, **kwargs)
        text_cfg = config["text_cfg"]
        tokenizer_kwargs = {**text_cfg.get("tokenizer_kwargs", {}), **kwargs}
        return factory.SimpleTokenizer(context_length=context_length or text_cfg.get("context_length", 77),
                                       **tokenizer_kwargs)

    factory.get_tokenizer = get_tokenizer
    open_clip.get_tokenizer = get_tokenizer
    _logger.debug("open_clip_superclip: core patches installed")


def _parser_module_with_superclip_flags(argparse_module):
    """A stand-in for the ``argparse`` name inside open_clip_train.params whose ArgumentParser carries our flags."""
    import types
    from training_ext.params import add_superclip_args, finalize_superclip_args

    class ArgumentParser(argparse_module.ArgumentParser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            add_superclip_args(self)

        def parse_args(self, args=None, namespace=None):
            return finalize_superclip_args(self, super().parse_args(args, namespace))

    shim = types.ModuleType(argparse_module.__name__)
    shim.__dict__.update(vars(argparse_module))
    shim.ArgumentParser = ArgumentParser
    return shim


def _ddp_accepting_cpu_device_ids(ddp_class):
    import torch

    class DistributedDataParallel(ddp_class):
        """open_clip_train.main passes device_ids=[device] even for CPU (gloo) runs, which DDP rejects;
        CPU modules take device_ids=None. CUDA runs are passed through unchanged."""

        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    DistributedDataParallel.__qualname__ = ddp_class.__qualname__
    return DistributedDataParallel


def install_training():
    """Patches of open_clip_train (installed when it is first imported). Idempotent."""
    if not _once("training"):
        return
    import open_clip
    from open_clip import factory
    from open_clip_train import params

    from training_ext import hooks

    # open_clip_train.params.parse_args builds `argparse.ArgumentParser()` inside the function (resolved through
    # the module-global name `argparse` at call time): our flags join that same parser, so --help lists them
    # and errors exit 2 like open_clip's own. Checked on open_clip_torch 3.0-3.3.
    stock_argparse = _require(params, "argparse")
    _require(params, "parse_args")
    params.argparse = _parser_module_with_superclip_flags(stock_argparse)

    # open_clip_train.params.get_default_params: names without "vit" get ResNet Adam defaults; our short aliases
    # (SuperCLIP-L-14) are ViTs. Called by parse_args through the module-global name. Checked on 3.0-3.3.
    stock_default_params = _require(params, "get_default_params")

    @functools.wraps(stock_default_params)
    def get_default_params(model_name):
        from .registry import superclip_config
        if superclip_config(model_name) is not None and "vit" not in model_name.lower():
            return stock_default_params(f"ViT-{model_name}")
        return stock_default_params(model_name)

    params.get_default_params = get_default_params

    # open_clip.factory.create_model_and_transforms, imported by name into open_clip_train.main: the run's model
    # gets (or loses, for lambda 0) the class head here. Checked on open_clip_torch 3.0-3.3.
    stock_create = _require(factory, "create_model_and_transforms")

    @functools.wraps(stock_create)
    def create_model_and_transforms(model_name, *args, **kwargs):
        result = stock_create(model_name, *args, **{**kwargs, **hooks.model_overrides(model_name)})
        hooks.on_model_created(model_name, result[0])
        return result

    factory.create_model_and_transforms = create_model_and_transforms
    open_clip.create_model_and_transforms = create_model_and_transforms

    # open_clip.factory.create_loss(args), imported by name into open_clip_train.main. Checked on 3.0-3.3.
    stock_create_loss = _require(factory, "create_loss")

    @functools.wraps(stock_create_loss)
    def create_loss(args):
        return hooks.wrap_loss(args, stock_create_loss(args))

    factory.create_loss = create_loss
    open_clip.create_loss = create_loss
    _logger.debug("open_clip_superclip: training patches installed")


def install_trainer_process():
    """Patches that only a process running open_clip_train's main needs (called when its arguments are parsed)."""
    install_fault_tolerance()  # before the once-check: open_clip_train.main may be imported after a first parse
    if not _once("trainer_process"):
        return
    import torch

    # torch DDP as called by open_clip_train.main.main (device_ids=[device]); see the class docstring.
    # Checked on open_clip_torch 3.3.0 with torch 2.14.
    torch.nn.parallel.DistributedDataParallel = _ddp_accepting_cpu_device_ids(
        _require(torch.nn.parallel, "DistributedDataParallel"))
    install_dual_caption_data()


def install_dual_caption_data():
    """DualCaption / caption mixing on the stock training data paths (training_ext.dual_caption). Without its
    flags every patched function delegates to the stock one unchanged. Idempotent."""
    if not _once("dual_caption_data"):
        return
    from open_clip_train import data
    from training_ext import dual_caption

    # open_clip_train.data.get_wds_dataset / get_csv_dataset(args, preprocess_fn, is_train, epoch=0,
    # tokenizer=None): get_data reaches them through get_dataset_fn, which resolves the module-global names at
    # call time (get_data itself is bound into open_clip_train.main by name before our flags are parsed).
    # Checked on open_clip_torch 3.0-3.3.
    data.get_wds_dataset = dual_caption.train_dataset_fn(_require(data, "get_wds_dataset"), "webdataset")
    data.get_csv_dataset = dual_caption.train_dataset_fn(_require(data, "get_csv_dataset"), "csv")
    # open_clip_train.data.CsvDataset(input_filename, transforms, img_key, caption_key, sep, tokenizer): built by
    # get_csv_dataset through the module-global name; the subclass only differs when given a DualCaption
    # tokenizer. Checked on open_clip_torch 3.0-3.3.
    if _require(data, "CsvDataset") is not dual_caption.DualCaptionCsvDataset.__base__:
        raise UpstreamMoved("open_clip_train.data.CsvDataset was replaced by someone else")
    data.CsvDataset = dual_caption.DualCaptionCsvDataset


def insert_wds_sample_stage(data_info, stage):
    """Runs ``stage`` over the raw samples of a training DataInfo built by open_clip_train's get_wds_dataset.

    open_clip_train.data.get_wds_dataset (training branch): ``data_info.dataloader`` is a wds.WebLoader (itself a
    DataPipeline whose first stage is a torch DataLoader) over a wds.DataPipeline whose ``pipeline`` list holds
    the module-level ``tarfile_to_samples_nothrow`` (samples as dicts of raw bytes, before shuffle / select /
    decode / rename / tokenize); the stage goes right after it. Checked on open_clip_torch 3.0-3.3 with
    webdataset 0.2.
    """
    from open_clip_train import data
    reader = _require(data, "tarfile_to_samples_nothrow")
    loader = (getattr(data_info.dataloader, "pipeline", None) or [None])[0]
    stages = getattr(getattr(loader, "dataset", None), "pipeline", None)
    index = next((i for i, s in enumerate(stages or ()) if s is reader), None)
    if not isinstance(stages, list) or index is None:
        raise UpstreamMoved("open_clip_train.data.get_wds_dataset no longer builds a wds.DataPipeline with "
                            f"tarfile_to_samples_nothrow as a stage; open_clip_superclip was checked against "
                            f"open_clip_torch {CHECKED_OPEN_CLIP}")
    stages.insert(index + 1, stage)


def _trainer_main_modules():
    """open_clip_train.main as imported (``-m training.main``), or running as ``__main__``
    (``-m open_clip_train.main``: then its globals exist only in that module, fully defined once main() runs)."""
    import sys
    modules = (sys.modules.get(key) for key in ("open_clip_train.main", "__main__"))
    return [m for m in modules if getattr(getattr(m, "__spec__", None), "name", None) == "open_clip_train.main"]


def install_fault_tolerance():
    """Atomic checkpoints, a ``--resume latest`` that skips broken files, the non-finite loss guard
    (training_ext.fault_tolerance, docs/fault_tolerance.md). Idempotent per trainer module."""
    import types

    import torch
    from open_clip_train import train
    from training_ext import fault_tolerance

    if _once("fault_tolerance:train"):
        # open_clip_train.train.backward(total_loss, scaler): train_one_epoch calls it through the module-global
        # name once per micro-batch. Delegates unchanged outside a guarded epoch. Checked on open_clip_torch 3.0-3.3.
        train.backward = fault_tolerance.guarded_backward(_require(train, "backward"))
    for main in _trainer_main_modules():
        if not _once(f"fault_tolerance:{main.__name__}"):
            continue
        # open_clip_train.main.get_latest_checkpoint(path, remote): main() calls it through the module-global name
        # for --resume latest (without --save-most-recent); it returned the last `*.pt` in natural_key order
        # whether or not it loads. Ours keeps that order and pt_load as the loader. Checked on 3.0-3.3.
        stock_latest = _require(main, "get_latest_checkpoint")
        natural_key, pt_load = _require(main, "natural_key"), _require(main, "pt_load")

        @functools.wraps(stock_latest)
        def get_latest_checkpoint(path, remote, natural_key=natural_key, pt_load=pt_load):
            return fault_tolerance.latest_loadable_checkpoint(
                path, remote, sort_key=natural_key, load=lambda p: pt_load(p, map_location="cpu"))

        main.get_latest_checkpoint = get_latest_checkpoint
        # open_clip_train.main.main writes every checkpoint with `torch.save(checkpoint_dict, path)` through its
        # module-global name `torch` (epoch_N.pt in place; tmp.pt then os.replace for --save-most-recent): that
        # name becomes torch with an atomic save. Checked on open_clip_torch 3.0-3.3.
        if _require(main, "torch") is not torch:
            raise UpstreamMoved("open_clip_train.main.torch is not torch: someone else replaced it")
        torch_with_atomic_save = types.ModuleType(torch.__name__, torch.__doc__)
        torch_with_atomic_save.__getattr__ = functools.partial(getattr, torch)
        torch_with_atomic_save.save = fault_tolerance.atomic_save
        main.torch = torch_with_atomic_save
        # open_clip_train.train.train_one_epoch, imported by name into open_clip_train.main and called once per
        # epoch with (model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=).
        # Checked on open_clip_torch 3.0-3.3.
        main.train_one_epoch = fault_tolerance.guarded_train_one_epoch(_require(main, "train_one_epoch"))
