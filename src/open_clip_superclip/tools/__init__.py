"""The tools layer: the `superclip` commands, the demo and the experiment.

Tools import the core (`open_clip_superclip`) and the trainer extension (`open_clip_superclip.train`); nothing
imports tools. docs/design.md has the layers.
"""
