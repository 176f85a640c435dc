"""`python -m open_clip_superclip.tools.demo` is `superclip demo` (what `make demo` runs)."""
import sys

from .app import main

sys.exit(main())
