import os
import subprocess
import sys

import pytest
import torch

import open_clip_superclip  # noqa: F401  (activates the plugin even if auto-loading is off)
from skip_guard import (pytest_addoption, pytest_collectreport, pytest_runtest_logreport,  # noqa: F401
                        pytest_sessionfinish, pytest_terminal_summary)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "SuperCLIP-ViT-Tiny"


def run_python(code: str, env_extra=None, args=()):
    """Runs code in a fresh interpreter (auto-activation is per process)."""
    env = {k: v for k, v in os.environ.items() if k != "OPEN_CLIP_DISABLE_PLUGINS"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def tiny_model():
    import open_clip
    torch.manual_seed(0)
    return open_clip.create_model(TINY, output_dict=True)
