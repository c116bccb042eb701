"""Where the experiments meet :mod:`flatminima.sharpness` (experiments -> sharpness).

* :func:`sharpness_hook`: a metric hook for ``compare``/``train``
  (``--sharpness N``) that measures ``lambda_max`` and the Hessian ``trace``
  of the training loss on N training examples at the end of each run; the
  two values become columns of the table.
* :func:`model_factory`, :func:`data_factory`, :func:`loss_factory`: what
  ``flatminima sharpness CHECKPOINT`` and ``flatminima landscape CHECKPOINT``
  need to read this tool's checkpoints (``--keep-checkpoints`` keeps them):
  the model rebuilt from ``checkpoint["model_info"]``, the data set and
  label noise from ``checkpoint["config"]``, the training criterion.
  :func:`add_data_dir_flag` gives both commands ``--data-dir``, and
  :func:`data_folder` says where the data is read from.

The measured objective is the training objective: the labels trained on
(noisy, when there is label noise) and the training loss (with its label
smoothing); the model is in eval mode.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import build_config
from .errors import ExperimentError
from .report import Column, register_column
from .train import MetricHook, RunContext, load_data, model_from_info, noisy_labels

SHARPNESS_MEASURES = ("lambda_max", "trace")

register_column(Column("lambda_max", "λ_max", "{:.3g}", help="top eigenvalue of the training-loss Hessian"))
register_column(Column("trace", "Hessian trace", "{:.3g}", help="trace of the training-loss Hessian (Hutchinson)"))


def _subset(x: Tensor, y: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(seed)))[: min(n, len(y))]
    return x[idx.to(x.device)], y[idx.to(y.device)]


def sharpness_hook(n: int, measures: Iterable[str] = SHARPNESS_MEASURES, batch_size: int = 1000,
                   **options: Any) -> MetricHook:
    """Hook measuring ``measures`` on ``n`` training examples (chosen by the run's seed);
    ``options`` go to :func:`flatminima.sharpness.report` (``tol``, ``max_iter``, ``max_samples``, ...)."""
    if n < 1:
        raise ExperimentError(f"--sharpness needs a positive number of examples, got {n}")
    try:
        from flatminima.sharpness import report
    except ImportError as e:
        raise ExperimentError(f"--sharpness needs flatminima.sharpness, which could not be imported ({e})") from None
    measures = list(measures)

    def hook(model: nn.Module, ctx: RunContext) -> Mapping[str, float]:
        x, y = _subset(ctx.data.x_train, ctx.train_labels, n, ctx.seed)
        x, y = ctx.data.prepare(x.to(ctx.device)), y.to(ctx.device)
        batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
        row = report(model, batches, measures=measures, loss_fn=ctx.loss_fn, seed=ctx.seed, **options)
        return {k: float(row[k]) for k in measures if isinstance(row.get(k), (int, float))}

    return hook


# ------------------------------------------------------------------ checkpoint factories
def _config(ckpt: Mapping[str, Any]):
    if "config" not in ckpt or "model_info" not in ckpt:
        raise ExperimentError("the checkpoint was not written by `flatminima compare/train` "
                              "(no 'config' and 'model_info' entries)")
    return build_config(ckpt["config"], sources=("the checkpoint's config",))


def model_factory(ckpt: Mapping[str, Any]) -> nn.Module:
    """The untrained model of a checkpoint of this tool."""
    if "model_info" not in ckpt:
        raise ExperimentError("the checkpoint was not written by `flatminima compare/train` (no 'model_info')")
    return model_from_info(ckpt["model_info"])


def data_folder(recorded: str | None, given: str | None) -> str | None:
    """The data folder of a checkpoint's run, as an absolute path.

    A checkpoint is a file someone may hand over, so the folder it names is
    never resolved against the checkpoint's own folder: the user's
    ``--data-dir`` (``given``) wins; else the folder the run recorded, a
    relative one taken from the current directory (as when the run was
    started); else (None) the default MNIST-1D cache."""
    folder = given if given is not None else recorded
    return None if folder is None else str(Path(folder).expanduser().absolute())


def data_factory(ckpt: Mapping[str, Any], *, split: str, n_samples: int, batch_size: int,
                 seed: int, data_dir: str | None = None) -> Sequence[tuple[Tensor, Tensor]]:
    """``n_samples`` examples of ``split`` (train: with the labels trained on),
    drawn by ``seed``, from the folder :func:`data_folder` picks."""
    cfg = _config(ckpt)
    cfg = cfg.replace(data_dir=data_folder(cfg.data_dir, data_dir))
    data = load_data(cfg)
    if split == "train":
        x, y = data.x_train, noisy_labels(data, cfg, int(ckpt.get("seed", 0)))[0]
    elif split == "test":
        x, y = data.x_test, data.y_test
    else:
        raise ExperimentError(f"split must be train or test, got {split!r}")
    x, y = _subset(x, y, n_samples, seed)
    x = data.prepare(x)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def add_data_dir_flag(parsers: Iterable[argparse.ArgumentParser]) -> None:
    """``--data-dir DIR`` on the ``sharpness``/``landscape`` parsers: the
    folder to read the checkpoint's data set from, in place of the one the
    checkpoint names (see :func:`data_folder`)."""
    for parser in parsers:
        parser.add_argument("--data-dir", metavar="DIR", default=None,
                            help="folder of the checkpoint's data set (CIFAR batches, MNIST-1D cache); default: the "
                                 "folder the run recorded, a relative one taken from the current directory")
        run = parser.get_default("func")

        def func(args: argparse.Namespace, run: Any = run) -> int:
            # the sharpness module calls data_factory(ckpt, split=..., ...): the flag reaches it bound here
            args.data_factory = functools.partial(data_factory, data_dir=args.data_dir)
            return int(run(args))

        parser.set_defaults(func=func)


def loss_factory(ckpt: Mapping[str, Any]) -> nn.Module:
    """The training criterion (cross-entropy with the run's label smoothing)."""
    return nn.CrossEntropyLoss(label_smoothing=_config(ckpt).label_smoothing)


# ------------------------------------------------------------------ landscape of the solutions
class SolutionLandscape:
    """A metric hook that keeps each method's final weights for the first
    seed, and :meth:`write` draws the loss along the straight line from the
    baseline's solution (the first plain optimizer, else the first method)
    to every other method's: ``L((1 - a) w_base + a w_method)`` on ``n``
    training examples (the labels trained on, eval mode), one curve per
    method, ``a = 0`` and ``1`` being the two solutions. A flat minimum shows
    as a wide, shallow basin around ``a = 1``.

    Runs restored by ``--resume`` are not retrained, so only the runs trained
    in this invocation appear.
    """

    def __init__(self, n: int, batch_size: int = 1000) -> None:
        if n < 1:
            raise ExperimentError(f"--sharpness needs a positive number of examples, got {n}")
        self.n, self.batch_size = n, batch_size
        self.models: dict[str, nn.Module] = {}
        self.ctx: RunContext | None = None

    def __call__(self, model: nn.Module, ctx: RunContext) -> Mapping[str, float]:
        if ctx.seed == ctx.config.seeds[0]:
            import copy

            self.models[ctx.method.label] = copy.deepcopy(model).eval()
            self.ctx = ctx
        return {}

    def write(self, labels: Sequence[str], baseline: str | None, path: Any) -> Any:
        """The PNG at ``path``, or None when fewer than two solutions were kept."""
        order = [label for label in labels if label in self.models]
        if len(order) < 2 or self.ctx is None:
            return None
        from flatminima.sharpness import interpolate
        from flatminima.sharpness.plot import plot_curve

        ctx = self.ctx
        base = baseline if baseline in self.models else order[0]
        x, y = _subset(ctx.data.x_train, ctx.train_labels, self.n, ctx.seed)
        x, y = ctx.data.prepare(x.to(ctx.device)), y.to(ctx.device)
        batches = [(x[i : i + self.batch_size], y[i : i + self.batch_size]) for i in range(0, len(y), self.batch_size)]
        others = [label for label in order if label != base]
        curves = [interpolate(self.models[base], self.models[o], batches, loss_fn=ctx.loss_fn) for o in others]
        return plot_curve(
            curves,
            path,
            labels=[f"{base} → {o}" for o in others],
            title=f"from {base} (a=0) to each method (a=1), seed {ctx.seed}",
            xlabel="a  (weights (1 - a) w_base + a w_method)",
            ylabel=f"train loss ({len(y)} train samples)",
        )
