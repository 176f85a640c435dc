"""Fails loudly, naming the patch, when open_clip or open_clip_train moves under a patch (open_clip_superclip.patching).

One walk over every declared patch table: the upstream name still exists, the installed object is ours, the
upstream source still does what the patch relies on, and docs/design.md lists the patch.
"""
import importlib
import inspect
import re
from importlib.metadata import version
from pathlib import Path

import open_clip
import pytest
from open_clip import factory

from open_clip_superclip import patching
from open_clip_superclip.open_clip_patches import OPEN_CLIP_PATCHES
from open_clip_superclip.train import plugin

TABLES = {"open_clip": OPEN_CLIP_PATCHES, "open_clip_train (on import)": plugin.ON_IMPORT,
          "open_clip_train (trainer start)": plugin.ON_TRAINER_START}
PATCHES = [patch for table in TABLES.values() for patch in table]
DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"


@pytest.fixture(scope="module", autouse=True)
def installed():
    import open_clip_train.main  # noqa: F401  (the module the trainer-start patches go into)
    patching.install(plugin.ON_TRAINER_START)


def test_open_clip_version_in_checked_range():
    major = int(version("open_clip_torch").split(".")[0])
    assert major == 3, f"open_clip_torch {version('open_clip_torch')}: patches checked on {patching.CHECKED_OPEN_CLIP}"


def test_targets_are_unique_and_every_patch_says_what_and_where_checked():
    assert len({p.target for p in PATCHES}) == len(PATCHES)
    for patch in PATCHES:
        assert patch.checked and patch.why and patch.assumes, patch.target


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.target)
def test_each_patch_is_installed_over_the_upstream_object(patch):
    for module in patch.target_modules():
        current = getattr(module, patch.attribute)
        stock = patching.stock(patch.target)
        assert current is not stock, f"{patch.target} is still the stock object"
        for alias in patch.aliases:
            module_name, name = alias.rsplit(".", 1)
            assert getattr(importlib.import_module(module_name), name) is current, alias
        if callable(stock) and hasattr(current, "__wrapped__"):  # wrappers keep the stock signature
            assert inspect.signature(current) == inspect.signature(stock), patch.target


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.target)
def test_upstream_still_does_what_each_patch_relies_on(patch):
    assert patching.broken_assumptions(patch) == []


def test_a_broken_assumption_or_a_vanished_name_is_named():
    moved = patching.Patch("open_clip.factory.no_such_name", "x", "y", replace=lambda stock: stock)
    with pytest.raises(patching.UpstreamMoved, match="open_clip.factory.no_such_name no longer exists"):
        patching.install([moved])
    changed = patching.Patch("open_clip.factory.CLIP", "x", "y", replace=lambda stock: stock,
                             assumes=(("open_clip.factory.create_model", "model_class = SomethingElse"),))
    assert patching.broken_assumptions(changed) == [
        "open_clip.factory.create_model no longer contains 'model_class = SomethingElse'"]


def test_design_doc_lists_every_patch():
    listed = set(re.findall(r"^\| `([\w.]+)`", DESIGN.read_text(encoding="utf-8"), flags=re.MULTILINE))
    assert {p.target for p in PATCHES} <= listed, sorted({p.target for p in PATCHES} - listed)


def test_factory_builds_superclip_only_for_superclip_configs():
    assert factory.CLIP is not open_clip.model.CLIP
    assert type(factory.create_model("SuperCLIP-ViT-Tiny")).__name__ == "SuperCLIP"
    assert type(factory.create_model("ViT-B-32")) is open_clip.model.CLIP
