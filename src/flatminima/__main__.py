"""``python -m flatminima`` = the ``flatminima`` command (``python -m flatminima.experiments`` too)."""

import sys

from .experiments.cli import main

sys.exit(main())
