"""``python -m training.main``: the pre-2.26 open_clip entry name, running today's open_clip_train trainer."""
