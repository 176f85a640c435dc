"""The layers (docs/design.md): tools -> train -> core, no import against that order, no cycle, function-local
imports included; and the imports each layer's entry points cost."""
import json
import os
import subprocess
import sys

import pytest

from open_clip_superclip.tools.cli import SUBCOMMANDS

from conftest import REPO, run_python

HEAVY = ("torch", "open_clip", "open_clip_train", "numpy", "webdataset", "matplotlib", "clip_benchmark", "PIL")


def test_import_linter_contracts_hold():
    """lint-imports (pyproject.toml's contracts; grimp sees imports inside functions too)."""
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src")}
    done = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.stdout.count(" KEPT") == 3 and "BROKEN" not in done.stdout


def _modules_after(code: str) -> set:
    result = run_python(code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))")
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("command", ["", *SUBCOMMANDS])
def test_help_imports_nothing_heavy(command):
    """`superclip --help` and `superclip COMMAND --help` answer without torch or open_clip (numpy is allowed: a
    tenth of a second; the times are in make bench)."""
    argv = [command, "--help"] if command else ["--help"]
    code = ("import contextlib, io\nfrom open_clip_superclip.tools.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    try:\n        main({argv!r})\n"
            "    except SystemExit:\n        pass")
    loaded = _modules_after(code)
    assert not [m for m in HEAVY if m in loaded and m != "numpy"], sorted(m for m in HEAVY if m in loaded)


def test_the_loss_does_not_import_the_trainer():
    loaded = _modules_after("import open_clip_superclip.loss")
    assert "open_clip_train" not in loaded and not any(m.startswith("open_clip_superclip.train") for m in loaded)


def test_importing_the_package_imports_nothing_heavy():
    loaded = _modules_after("import open_clip_superclip")
    assert not [m for m in HEAVY if m in loaded]
