"""Patches of host libraries, declared as data: one table per host, one installer, one contract test.

A `Patch` names the upstream object it replaces, the versions it was checked against, why, how to build the
replacement from the stock object, and the upstream source it relies on (`assumes`). `install` applies a table
once per module object and records the stock objects; tests/test_upstream_contract.py walks every table and fails
loudly, naming the patch, when upstream moves. Every replacement delegates unchanged when no SuperCLIP model or
flag is involved, so stock runs stay bit-identical.
"""
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

CHECKED_OPEN_CLIP = "open_clip_torch >=3.0,<4 (checked on 3.0-3.3)"


class UpstreamMoved(RuntimeError):
    """A host library no longer has what a patch relies on."""


@dataclass(frozen=True)
class Patch:
    target: str  # "package.module.name"
    checked: str  # the upstream versions this was checked against
    why: str  # one line: what changes, and for which runs
    replace: Callable  # stock object -> replacement
    aliases: Tuple[str, ...] = ()  # other public names of the same object, rebound to the replacement
    assumes: Tuple[Tuple[str, str], ...] = ()  # (upstream callable "module.qualname", source it must contain)
    modules: Optional[Callable] = None  # -> the module objects to patch (default: import the target's module)

    @property
    def module_name(self) -> str:
        return self.target.rsplit(".", 1)[0]

    @property
    def attribute(self) -> str:
        return self.target.rsplit(".", 1)[1]

    def target_modules(self) -> list:
        return list(self.modules()) if self.modules else [importlib.import_module(self.module_name)]


_stock = {}  # target -> the stock object it replaced (first module patched)
_patched = set()  # (target, id(module)) already patched


def require(module, name: str, target: str = None):
    """module.name, or UpstreamMoved saying which patch needs it and what was checked."""
    if not hasattr(module, name):
        raise UpstreamMoved(f"{target or module.__name__ + '.' + name} no longer exists: open_clip_superclip was "
                            f"checked against {CHECKED_OPEN_CLIP}; pin open_clip_torch to that range")
    return getattr(module, name)


def install(patches) -> None:
    """Applies each patch to each of its target modules that does not have it yet. Idempotent."""
    for patch in patches:
        for module in patch.target_modules():
            if (patch.target, id(module)) in _patched:
                continue
            stock = require(module, patch.attribute, patch.target)
            replacement = patch.replace(stock)
            setattr(module, patch.attribute, replacement)
            for alias in patch.aliases:
                alias_module = importlib.import_module(alias.rsplit(".", 1)[0])
                if require(alias_module, alias.rsplit(".", 1)[1], alias) is stock:
                    setattr(alias_module, alias.rsplit(".", 1)[1], replacement)
            _stock.setdefault(patch.target, stock)
            _patched.add((patch.target, id(module)))


def stock(target: str):
    """The upstream object a patch replaced (KeyError if that patch is not installed)."""
    return _stock[target]


def resolve(path: str):
    """The object at "package.module.qualname": the stock one if a patch replaced it."""
    if path in _stock:
        return _stock[path]
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"cannot resolve {path}")


def broken_assumptions(patch: Patch) -> list:
    """The `assumes` entries of a patch that upstream's source no longer satisfies."""
    broken = []
    for where, snippet in patch.assumes:
        source = inspect.getsource(resolve(where))
        if snippet not in source:
            broken.append(f"{where} no longer contains {snippet!r}")
    return broken
