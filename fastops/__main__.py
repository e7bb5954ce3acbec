"""``python -m fastops`` = the ``fastops`` command (see :mod:`fastops.cli`)."""
import sys

from .cli import main

sys.exit(main())
