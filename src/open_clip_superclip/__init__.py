"""SuperCLIP (arXiv 2512.14480) for stock open_clip.

Installing the package makes ``import open_clip`` know the SuperCLIP models (a start-up hook loads the
``open_clip.plugins`` entry points). Importing this package activates that hook explicitly, e.g. under
``python -S`` or with ``OPEN_CLIP_DISABLE_PLUGINS=1``: the plugins load when open_clip is imported, or at once if
it already is. The package itself imports nothing heavy: the names below load their modules on first use, so
``superclip --help`` answers without torch.

Layers (docs/design.md): this package's own modules are the core (torch + open_clip); ``.train`` extends
open_clip_train; ``.tools`` holds the ``superclip`` commands and the demo.
"""
import importlib

import _open_clip_superclip_bootstrap

_open_clip_superclip_bootstrap.install()

_PUBLIC = {
    "SuperCLIP": "model",
    "ClassificationAugmentedLoss": "loss",
    "IDFStatistics": "idf",
    "idf_weights": "idf",
    "to_stock_state_dict": "state_dicts",
    "list_superclip_models": "configs",
    "register": "registry",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
