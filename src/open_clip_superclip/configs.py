"""The SuperCLIP model configs (model_configs/*.json, data) and how to tell a SuperCLIP config from a stock one."""
import json
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def list_superclip_models():
    return sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))


def superclip_config(model_name: str):
    """The model config if ``model_name`` (a built-in name or ``local-dir:``) is a SuperCLIP one, else None."""
    from open_clip import get_model_config
    try:
        config = get_model_config(model_name) if model_name else None
    except (OSError, ValueError):
        return None
    return config if config and config.get("superclip_cfg") is not None else None


def load_config_file(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
