"""Registration into open_clip (the ``open_clip.plugins`` entry point): our model configs and open_clip's patches."""


def register():
    """Makes stock open_clip know the SuperCLIP models. Idempotent."""
    import open_clip
    from open_clip import factory

    from .configs import MODEL_CONFIG_DIR
    from .open_clip_patches import OPEN_CLIP_PATCHES
    from .patching import install
    if MODEL_CONFIG_DIR not in factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    install(OPEN_CLIP_PATCHES)
