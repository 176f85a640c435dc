"""Loads open_clip plugins (entry-point groups ``open_clip.plugins`` / ``open_clip_train.plugins``) right after
``open_clip`` / ``open_clip_train`` are first imported.

Run from ``open_clip_superclip.pth`` at interpreter start-up, so it must stay cheap: it imports nothing heavy and
only installs an import hook. ``OPEN_CLIP_DISABLE_PLUGINS=1`` turns auto-loading off.
"""
import os
import sys

DISABLE_ENV = "OPEN_CLIP_DISABLE_PLUGINS"
PLUGIN_GROUPS = {"open_clip": "open_clip.plugins", "open_clip_train": "open_clip_train.plugins"}
_loaded_groups = set()


def load_plugins(module_name):
    """Calls every entry point registered for ``module_name``'s plugin group, once per process."""
    group = PLUGIN_GROUPS[module_name]
    if group in _loaded_groups:
        return
    _loaded_groups.add(group)
    if module_name == "open_clip_train":
        import open_clip  # noqa: F401  (its plugins come first: training plugins build on them)
    from importlib.metadata import entry_points
    for entry_point in entry_points(group=group):
        try:
            entry_point.load()()
        except Exception as error:  # a broken plugin must not break `import open_clip`
            import warnings
            warnings.warn(f"open_clip plugin {entry_point.name!r} ({entry_point.value}) failed to load: {error!r}; "
                          f"set {DISABLE_ENV}=1 to skip plugins", RuntimeWarning, stacklevel=2)


class _LoaderWithPlugins:
    def __init__(self, loader, module_name):
        self._loader = loader
        self._module_name = module_name

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        load_plugins(self._module_name)


class PluginFinder:
    """A meta-path finder that only wraps the loader of the watched modules; it never finds anything itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in PLUGIN_GROUPS or PLUGIN_GROUPS[fullname] in _loaded_groups:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderWithPlugins(spec.loader, fullname)
                return spec
        return None


def install():
    """Makes plugins load on first import; loads them now for watched modules that are already imported."""
    if not any(isinstance(finder, PluginFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, PluginFinder())
    for module_name in PLUGIN_GROUPS:
        if module_name in sys.modules:
            load_plugins(module_name)


def autoload():
    """The start-up entry (from the .pth file): honours the opt-out variable."""
    if os.environ.get(DISABLE_ENV, "").strip().lower() not in ("1", "true", "yes", "on"):
        install()
