"""``python -m training.main ...`` / ``torchrun -m training.main ...``: open_clip_train.main with SuperCLIP flags."""
import sys

from open_clip_train.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
