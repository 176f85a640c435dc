"""`pip install .` and `pip install -e .` into fresh virtual environments both carry the start-up hook."""
import os
import shutil
import subprocess
import sysconfig
import venv

import pytest

from conftest import REPO

CHECK = ("import sys, open_clip; m = open_clip.create_model('SuperCLIP-L-14'); "
         "print(type(m).__name__, sum(p.numel() for p in m.class_head.parameters()), "
         "'open_clip_superclip' in sys.modules)")


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_fresh_venv_install_makes_open_clip_know_superclip(tmp_path, editable):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the heavy dependencies come from this interpreter's site-packages as a plain path: none of its .pth
    # files (our own editable install among them) run in the fresh environment
    with open(os.path.join(site, "zz_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    copy = tmp_path / "src_copy"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "demo_*",
                                                              "experiment_*", ".whl", "__pycache__"))
    install = [python, "-m", "pip", "install", "-q", "--no-deps", *(["-e"] if editable else []), str(copy)]
    result = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("OPEN_CLIP_DISABLE_PLUGINS", "PYTHONPATH")}
    run = subprocess.run([python, "-c", CHECK], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.stdout.split() == ["SuperCLIP", "50645248", "True"], run.stderr[-3000:]
    bare = subprocess.run([python, "-c", "import sys; print('torch' in sys.modules, 'open_clip' in sys.modules)"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bare.stdout.split() == ["False", "False"]
