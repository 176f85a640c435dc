"""What the stock open_clip trainer needs for SuperCLIP: flags, DualCaption data, hooks, the training.main entry."""
