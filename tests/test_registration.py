"""Auto-activation through the start-up hook and the ``open_clip.plugins`` entry points, in fresh interpreters."""
import os
import sysconfig

from conftest import REPO, run_python

SRC = os.path.join(REPO, "src")

PRINT_CLASS = "import open_clip; print(type(open_clip.create_model('SuperCLIP-ViT-Tiny')).__name__)"


def test_import_open_clip_alone_makes_models_available():
    result = run_python(PRINT_CLASS + "; import sys; print('open_clip_superclip.model' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SuperCLIP", "True"]


def test_opt_out_variable_makes_them_absent_and_explicit_import_brings_them_back():
    absent = run_python("import open_clip; print('SuperCLIP-ViT-Tiny' in open_clip.list_models())",
                        {"OPEN_CLIP_DISABLE_PLUGINS": "1"})
    assert absent.stdout.strip() == "False", absent.stderr
    back = run_python("import open_clip, open_clip_superclip; " + PRINT_CLASS.split("; ", 1)[1],
                      {"OPEN_CLIP_DISABLE_PLUGINS": "1"})
    assert back.stdout.strip() == "SuperCLIP", back.stderr


def test_explicit_import_works_without_site_hooks():
    # -S skips site-packages .pth files: the explicit import is the way in
    # (the editable install's own path hook is a .pth too, so the source folder is added by hand)
    paths = [sysconfig.get_paths()["purelib"], SRC]
    result = run_python(f"import sys; sys.path[:0] = {paths!r}; "
                        "import open_clip_superclip, open_clip; print(open_clip.get_model_config('SuperCLIP-L-14') "
                        "is not None)", args=("-S",))
    assert result.stdout.strip() == "True", result.stderr


def test_unrelated_interpreter_start_imports_nothing_heavy():
    result = run_python("import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
                        "('torch', 'open_clip', 'open_clip_superclip', 'numpy', 'importlib_metadata')))")
    assert result.stdout.strip() == "[]", result.stderr
    assert "_open_clip_superclip_bootstrap" in run_python("import sys; print(list(sys.modules))").stdout


def test_training_patches_load_with_open_clip_train():
    result = run_python("import open_clip_train.params as p; print(p.argparse.ArgumentParser.__module__, "
                        "'--superclip-lambda' in p.argparse.ArgumentParser()._option_string_actions)")
    assert result.stdout.split() == ["open_clip_superclip.train.plugin", "True"], result.stderr
