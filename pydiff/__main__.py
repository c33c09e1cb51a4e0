"""``python -m pydiff ...``: the ``pydiff`` command (:mod:`pydiff.cli`)."""
import sys

from pydiff.cli import main

sys.exit(main())
