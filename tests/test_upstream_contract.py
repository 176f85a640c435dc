"""Fails loudly when open_clip moves under the patches in upstream_patches.py (checked on 3.0-3.3)."""
import inspect
from importlib.metadata import version

import open_clip
import pytest
from open_clip import factory
from open_clip_train import main as train_main
from open_clip_train import params, train

from open_clip_superclip import upstream_patches


def _source(obj):
    return inspect.getsource(obj)


def test_open_clip_version_in_checked_range():
    major = int(version("open_clip_torch").split(".")[0])
    assert major == 3, f"open_clip_torch {version('open_clip_torch')}: patches checked on {upstream_patches.CHECKED_OPEN_CLIP}"


def test_factory_builds_the_model_class_through_the_module_global_clip():
    src = _source(factory.create_model)
    assert "model_class = CLIP" in src and "model_class(**final_model_cfg, cast_dtype=cast_dtype)" in src
    assert factory.CLIP is upstream_patches.superclip_model_class


def test_get_tokenizer_siglip_name_trap_is_still_there():
    src = _source(upstream_patches._require(factory, "get_tokenizer").__wrapped__)
    assert "'siglip' in identifier.lower()" in src
    assert open_clip.get_tokenizer is factory.get_tokenizer


def test_params_builds_its_parser_through_module_global_argparse():
    src = _source(params.parse_args.__wrapped__ if hasattr(params.parse_args, "__wrapped__") else params.parse_args)
    assert "parser = argparse.ArgumentParser()" in src
    assert "get_default_params(args.model)" in src
    assert params.argparse.ArgumentParser.__module__ == upstream_patches.__name__


def test_trainer_main_binds_factory_functions_and_wraps_ddp_as_expected():
    src = _source(train_main)
    assert "from open_clip import create_model_and_transforms, trace_model, get_tokenizer, create_loss" in src
    assert "DistributedDataParallel(model, device_ids=[device]" in src
    assert "loss = create_loss(args)" in src and "model.load_state_dict(sd)" in src


def test_train_loop_calls_the_loss_with_model_outputs_and_concatenates_for_accumulation():
    src = _source(train.train_one_epoch)
    assert "losses = loss(**model_out, output_dict=True)" in src
    assert "inputs[key] = torch.cat(accumulated[:j] + [model_out[key]] + accumulated[j + 1:])" in src
    assert 'for f in ("logit_scale", "logit_bias"):' in src


@pytest.mark.parametrize("name", ["create_model_and_transforms", "create_loss"])
def test_wrapped_factory_functions_are_ours_and_keep_the_signature(name):
    ours = getattr(open_clip, name)
    assert ours is getattr(factory, name)
    assert inspect.signature(ours.__wrapped__) == inspect.signature(ours)
