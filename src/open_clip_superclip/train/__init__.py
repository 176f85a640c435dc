"""The trainer extension: what `python -m open_clip_train.main` (and `training.main`) needs for SuperCLIP.

plugin: the ``open_clip_train.plugins`` entry point and every patch of open_clip_train; flags: the
``--superclip-*`` flags; run: the run's model and loss; dual_caption: DualCaption data; fault_tolerance: atomic
checkpoints, ``--resume latest``, the non-finite loss guard. Imports the core, never the tools.
"""
