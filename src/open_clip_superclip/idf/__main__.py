"""`python -m open_clip_superclip.idf` is `superclip idf`.

A package __main__ rather than a main block in idf/__init__.py: the package __init__ imports the IDF
statistics, and runpy warns when the module it is asked to run was imported first.
"""
import sys

from ..idf_build import main

sys.exit(main())
