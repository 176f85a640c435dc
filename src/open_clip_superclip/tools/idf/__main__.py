"""`python -m open_clip_superclip.tools.idf ...` (and `torchrun ... -m open_clip_superclip.tools.idf ...`) is `superclip idf ...`."""
import sys

from .command import main

sys.exit(main())
