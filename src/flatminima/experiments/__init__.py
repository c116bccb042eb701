"""The experiment tool behind the ``flatminima`` command (needs the ``cli`` extra).

A thin layer over importable functions: every number the command prints can
be reproduced from Python::

    from flatminima.experiments import ExperimentConfig, compare, train_run

    cfg = ExperimentConfig(epochs=10, seeds=[0, 1])            # the defaults of `flatminima compare`
    result = compare(cfg, out="runs/mine")                     # = flatminima compare --epochs 10 --seeds 2 --out runs/mine
    result.summary()                                           # the rows of the table

    run = train_run(cfg, "sam:rho=0.3", seed=0)               # one run
    run.history[-1]["test_acc"]

Modules: ``data`` (MNIST-1D generated locally, scikit-learn digits, CIFAR from
a folder), ``noise`` (label noise), ``augment``, ``models`` (MLP, 1-D ResNet,
small CNN, WideResNet), ``methods`` (names -> optimizers, from the registry),
``train`` (one run, checkpoints, resume), ``runner`` (methods x seeds, the
results folder), ``report`` (summaries, table, CSV), ``plots``, ``progress``,
``tensorboard_log`` (``--log tensorboard``; ``compare(cfg, callback=fn)`` gives
Python callers every step's metrics),
``distributed`` (torchrun), ``config`` (settings, TOML), ``cli``; ``study``
(the results study, ``flatminima study``), ``stats`` (t intervals, paired
differences), ``study_report``/``study_plots`` (its tables and plots),
``study_cli``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The names below are imported on first use (PEP 562), not with the package:
# the ``flatminima`` command (``flatminima.experiments.cli``) must start, and
# say which extra to install, where numpy and the rest of the ``cli`` extra
# are missing.
_EXPORTS = {
    "DEFAULT_METHODS": "config", "ExperimentConfig": "config", "build_config": "config", "load_toml": "config",
    "Dataset": "data", "load_dataset": "data",
    "ConfigError": "errors", "DataError": "errors", "ExperimentError": "errors",
    "Method": "methods", "build_optimizer": "methods", "resolve_methods": "methods",
    "build_model": "models",
    "corrupt_labels": "noise",
    "Column": "report", "register_column": "report", "summarize": "report",
    "Comparison": "runner", "compare": "runner",
    "RunContext": "train", "RunResult": "train", "load_data": "train", "train_run": "train",
}

if TYPE_CHECKING:
    from .config import DEFAULT_METHODS, ExperimentConfig, build_config, load_toml
    from .data import Dataset, load_dataset
    from .errors import ConfigError, DataError, ExperimentError
    from .methods import Method, build_optimizer, resolve_methods
    from .models import build_model
    from .noise import corrupt_labels
    from .report import Column, register_column, summarize
    from .runner import Comparison, compare
    from .train import RunContext, RunResult, load_data, train_run


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "DEFAULT_METHODS",
    "Column",
    "Comparison",
    "ConfigError",
    "DataError",
    "Dataset",
    "ExperimentConfig",
    "ExperimentError",
    "Method",
    "RunContext",
    "RunResult",
    "build_config",
    "build_model",
    "build_optimizer",
    "compare",
    "corrupt_labels",
    "load_data",
    "load_dataset",
    "load_toml",
    "register_column",
    "resolve_methods",
    "summarize",
    "train_run",
]
