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
    if not _once("trainer_process"):
        return
    import torch

    # torch DDP as called by open_clip_train.main.main (device_ids=[device]); see the class docstring.
    # Checked on open_clip_torch 3.3.0 with torch 2.14.
    torch.nn.parallel.DistributedDataParallel = _ddp_accepting_cpu_device_ids(
        _require(torch.nn.parallel, "DistributedDataParallel"))
