"""SuperCLIP (arXiv 2512.14480) for stock open_clip.

Installing the package makes ``import open_clip`` know the SuperCLIP models (a start-up hook loads the
``open_clip.plugins`` entry points). Importing this package activates it explicitly, e.g. under ``python -S``
or with ``OPEN_CLIP_DISABLE_PLUGINS=1``.
"""
import _open_clip_superclip_bootstrap

_open_clip_superclip_bootstrap.install()
import open_clip  # noqa: E402,F401  (loads the plugins: registers configs, patches the factory)

from .idf import IDFStatistics, idf_weights  # noqa: E402
from .loss import ClassificationAugmentedLoss  # noqa: E402
from .model import SuperCLIP, to_stock_state_dict  # noqa: E402
from .registry import list_superclip_models, register  # noqa: E402

register()

__all__ = ["SuperCLIP", "ClassificationAugmentedLoss", "IDFStatistics", "idf_weights", "to_stock_state_dict",
           "list_superclip_models", "register"]
__version__ = "0.1.0"
