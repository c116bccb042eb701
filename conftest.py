"""Collection rules for the doctests of src/flatminima (``--doctest-modules``,
see ``[tool.pytest.ini_options]`` in pyproject.toml).

Doctest collection imports every module of the package, so a module that
does something when imported is left out, and so is one whose optional
dependency is missing (the dev extra installs them all).
"""

import importlib.util

collect_ignore = [
    "src/flatminima/experiments/__main__.py",  # runs the command line on import
]

if importlib.util.find_spec("lightning") is None:
    collect_ignore.append("src/flatminima/lightning.py")
if importlib.util.find_spec("numpy") is None:  # the experiments import numpy (the cli extra)
    collect_ignore.append("src/flatminima/experiments")
