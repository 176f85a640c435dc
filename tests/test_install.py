"""`pip install .` and `pip install -e .` into fresh virtual environments both carry the start-up hook."""
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

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


def _setup_kwargs():
    """The keyword arguments setup.py passes to setuptools.setup (read by running it with setup() captured)."""
    import runpy
    from unittest import mock
    captured = {}
    with mock.patch("setuptools.setup", lambda **kwargs: captured.update(kwargs)):
        runpy.run_path(os.path.join(REPO, "setup.py"), run_name="__main__")
    return captured


def _imported_distributions_missing(requirements):
    """Top-level modules the test files import (pytest.importorskip included) that no distribution in the
    dependency closure of `requirements` provides, judged by the installed distributions' metadata."""
    import ast
    import sys
    from importlib import metadata

    from packaging.requirements import Requirement

    def norm(name):
        return name.lower().replace("_", "-").replace(".", "-")

    closure, todo = {}, [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name, extras = norm(requirement.name), set(requirement.extras)
        if name in closure and extras <= closure[name]:
            continue
        closure[name] = closure.get(name, set()) | extras
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # not installed here: nothing below it can be judged, and nothing is provided by it
        for text in requires:
            dependency = Requirement(text)
            environments = [{"extra": e} for e in closure[name]] or [{"extra": ""}]
            if dependency.marker is None or any(dependency.marker.evaluate(env) for env in environments):
                todo.append(dependency)
    providers = metadata.packages_distributions()
    local = {path.stem for folder in ("tests", "bench", "src") for path in Path(REPO, folder).glob("*.py")}
    local |= {path.parent.name for path in Path(REPO, "src").glob("*/__init__.py")}
    modules = set()
    for path in Path(REPO, "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip":
                modules.add(node.args[0].value.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - local
    return sorted(m for m in third_party if not {norm(d) for d in providers.get(m, ())} & set(closure))


def test_the_test_extra_brings_every_module_the_tests_import():
    """`pip install .[test]` alone runs the whole suite: no test file skips for want of a module."""
    kwargs = _setup_kwargs()
    assert _imported_distributions_missing(kwargs["install_requires"] + kwargs["extras_require"]["test"]) == []


def test_fail_on_skip_fails_a_run_with_a_skipped_test(tmp_path):
    """`make test` passes --fail-on-skip (tests/skip_guard.py): one skipped test makes the run fail, naming it."""
    (tmp_path / "conftest.py").write_text("from skip_guard import *  # noqa: F401,F403\n")
    (tmp_path / "test_skips.py").write_text("import pytest\n\n\ndef test_skipped():\n    pytest.skip('no x')\n\n\n"
                                            "def test_passes():\n    pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--fail-on-skip",
                          str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.path.join(REPO, "tests")})
    assert run.returncode == 1, run.stdout[-2000:]
    assert "--fail-on-skip: 1 skipped, which fails the run: test_skips.py::test_skipped" in run.stdout
