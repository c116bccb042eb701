"""Command-line part: the ``sharpness`` and ``landscape`` subcommands.

The experiment tool (``flatminima``, in :mod:`flatminima.experiments`) owns
checkpoints, models and data sets; this module owns the measuring. They meet
in :func:`add_subcommands`, which registers on the tool's argparse
``subparsers`` object::

    flatminima sharpness CHECKPOINT [options]              # lambda_max, trace, ... (table / JSON)
    flatminima sharpness CHECKPOINT --density [PNG]        # ... and the Hessian spectral density picture
    flatminima landscape CHECKPOINT                         # 1-D (or --2d) filter-normalised slice
    flatminima landscape CHECKPOINT CHECKPOINT2             # interpolation from the first to the second

Checkpoint contract (``torch.load(path, weights_only=True)``, so tensors,
dicts, lists, strings and numbers only):

* ``checkpoint["model_state"]``: the model's ``state_dict()`` (required;
  ``checkpoint["model"]`` is accepted instead when it is a state dict, as in
  the experiment tool's training checkpoints);
* anything else the factories need (e.g. ``"model_config"``, ``"data_config"``).

The caller provides three functions (given to :func:`add_subcommands` and
carried on the parsed ``args``):

* ``model_factory(checkpoint) -> nn.Module``: builds the (untrained) model
  described by the checkpoint; this module then calls
  ``model.load_state_dict(checkpoint["model_state"])`` (strict) and moves it
  to ``--device``;
* ``data_factory(checkpoint, *, split, n_samples, batch_size, seed) ->
  list[(x, y)]``: the fixed measurement set, ``n_samples`` samples of
  ``split`` ("train" or "test") in batches of ``batch_size``, the same for
  a given ``seed``. Optional: without one, the checkpoint may carry its data
  as ``checkpoint["data"] = {"x": Tensor, "y": Tensor}`` (the first
  ``n_samples`` are used);
* ``loss_factory(checkpoint) -> loss_fn`` (optional; default cross-entropy).

``sharpness_main(args)`` / ``landscape_main(args)`` run a parsed command
and return the exit status; :func:`main` is a stand-alone parser for
scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _checks as check
from .density import SpectralDensity, hessian_density
from .landscape import Curve, Surface, interpolate, linspace, slice_1d, slice_2d
from .objective import Batch, LossFn
from .summary import MEASURES, report

ModelFactory = Callable[[Mapping[str, Any]], nn.Module]
DataFactory = Callable[..., Sequence[Batch]]
LossFactory = Callable[[Mapping[str, Any]], LossFn]


class CheckpointError(ValueError):
    """A checkpoint that does not follow the contract of this module."""


# ---------------------------------------------------------------- loading


def model_state(ckpt: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The state dict in a checkpoint: ``ckpt["model_state"]``, or
    ``ckpt["model"]`` when that is a state dict (the experiment tool's
    training checkpoints); ``None`` when there is neither."""
    for key in ("model_state", "model"):
        state = ckpt.get(key)
        if isinstance(state, Mapping):
            return state
    return None


def describe_load_failure(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line. Not torch's
    own text, which suggests ``weights_only=False``: that would run whatever
    code the file names."""
    if isinstance(error, OSError):
        return f"it cannot be read ({error.strerror or error})"
    for line in str(error).splitlines():  # the unpickler's own reason: "... unsupported GLOBAL posix.system ..."
        if "GLOBAL" in line or line.strip().startswith("WeightsUnpickler error:"):
            return f"it holds objects other than tensors and plain data ({line.strip()})"
    return f"it is not a file torch.save wrote ({type(error).__name__})"


def load_checkpoint(path: str | Path, model_factory: ModelFactory | None, *, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """``(model, checkpoint)``: the checkpoint dict and the model rebuilt by
    ``model_factory(checkpoint)`` with ``checkpoint["model_state"]`` loaded
    (strict) and moved to ``device``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load fails in many ways on a file that is not a checkpoint
        raise CheckpointError(f"{str(path)!r} is not a checkpoint this command reads: {describe_load_failure(e)}. Give a "
                              "file written by torch.save({'model_state': model.state_dict(), ...}) holding tensors, "
                              "dicts, lists, strings and numbers only (as `flatminima train --keep-checkpoints` "
                              "writes)") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, expected a dict with 'model_state'")
    state = model_state(ckpt)
    if state is None:
        raise CheckpointError(f"checkpoint {str(path)!r} has no 'model_state' (keys: {sorted(map(str, ckpt))})")
    if model_factory is None:
        raise CheckpointError("no model_factory was given to add_subcommands(): cannot rebuild the model")
    model = model_factory(ckpt)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"model_factory returned a {type(model).__name__}, expected an nn.Module")
    model.load_state_dict(state)
    return model.to(device), ckpt


def _data_from_checkpoint(ckpt: Mapping[str, Any], n_samples: int, batch_size: int) -> list[Batch]:
    data = ckpt.get("data")
    if not isinstance(data, Mapping) or "x" not in data or "y" not in data:
        raise CheckpointError("no data_factory was given and the checkpoint has no 'data': {'x': Tensor, 'y': Tensor}")
    x, y = data["x"][:n_samples], data["y"][:n_samples]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, int(y.shape[0]), batch_size)]


def measurement_data(args: argparse.Namespace, ckpt: Mapping[str, Any]) -> list[Batch]:
    """The fixed data set for ``args`` (see the module docstring)."""
    factory: DataFactory | None = getattr(args, "data_factory", None)
    if factory is None:
        batches = _data_from_checkpoint(ckpt, args.samples, args.batch_size)
    else:
        batches = list(factory(ckpt, split=args.split, n_samples=args.samples, batch_size=args.batch_size, seed=args.seed))
    if not batches:
        raise CheckpointError(f"the data for split {args.split!r} is empty")
    return batches


def _loss_fn(args: argparse.Namespace, ckpt: Mapping[str, Any]) -> LossFn | None:
    factory: LossFactory | None = getattr(args, "loss_factory", None)
    return None if factory is None else factory(ckpt)


def _progress(args: argparse.Namespace) -> bool:
    choice = getattr(args, "progress", None)
    return sys.stderr.isatty() if choice is None else choice


# ---------------------------------------------------------------- parsers


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and device")
    g.add_argument("--split", default="train", choices=("train", "test"), help="data split to measure on (default: train)")
    g.add_argument("--samples", type=_positive_int, default=1024, help="size of the fixed measurement set (default: 1024)")
    g.add_argument("--batch-size", type=_positive_int, default=256, help="batch size for the measurement set (default: 256)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data subset and every random draw (default: 0)")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    g.add_argument("--json", metavar="FILE", default=None, help="also write the numbers as JSON")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")


def _sharpness_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file (a dict with 'model_state', see the docs)")
    p.add_argument("--measures", default="lambda_max,trace,gap",
                   help=f"comma-separated, from {', '.join(MEASURES)} (default: lambda_max,trace,gap)")
    p.add_argument("--method", default="lanczos", choices=("lanczos", "power"),
                   help="top eigenvalues by Lanczos (default) or power iteration (PyHessian's)")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="Lanczos: relative residual of each eigenvalue; power iteration / trace: relative change "
                        "of the estimate (default and PyHessian: 1e-3)")
    p.add_argument("--max-iter", type=_positive_int, default=100,
                   help="Lanczos: products in all; power iteration: products per eigenvalue (default: 100)")
    p.add_argument("--top-k", type=_positive_int, default=1, help="number of top eigenvalues (default: 1)")
    p.add_argument("--trace-method", default="hutch++", choices=("hutch++", "hutchinson"),
                   help="trace estimator (default: hutch++)")
    p.add_argument("--sketch", type=_positive_int, default=10, help="Hutch++: sketch size (default: 10)")
    p.add_argument("--min-samples", type=_positive_int, default=10, help="trace: least samples (default: 10)")
    p.add_argument("--max-samples", type=_positive_int, default=100,
                   help="trace: most samples (Hutch++: after its sketch; default: 100)")
    d = p.add_argument_group("spectral density (stochastic Lanczos quadrature)")
    d.add_argument("--density", nargs="?", const="", default=None, metavar="PNG",
                   help="also draw the Hessian eigenvalue spectral density to PNG "
                        "(default name: <checkpoint>_density.png)")
    d.add_argument("--density-iter", type=_positive_int, default=100, help="Lanczos steps per run (PyHessian: 100)")
    d.add_argument("--density-runs", type=_positive_int, default=1, help="probe vectors averaged (PyHessian: 1)")
    d.add_argument("--probe", default="rademacher", choices=("rademacher", "gaussian"),
                   help="probe distribution (default: rademacher)")
    d.add_argument("--sigma-squared", type=float, default=1e-5,
                   help="Gaussian broadening: variance per unit of spectrum width (PyHessian: 1e-5)")
    p.add_argument("--rho", type=float, default=0.05, help="radius of gap / m-sharpness / worst / average case (default: 0.05)")
    p.add_argument("--m", type=_positive_int, default=None, help="chunk size of m-sharpness (needed for m_sharpness)")
    p.add_argument("--steps", type=_positive_int, default=10, help="ascent steps of worst_case (default: 10)")
    p.add_argument("--p", default="2", choices=("2", "inf"), help="norm of the worst_case ball (default: 2)")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="worst/average case: ball scaled by |w| + eta (default: on)")
    p.add_argument("--eta", type=float, default=0.01, help="adaptive scale offset (default: 0.01)")
    p.add_argument("--noise-samples", type=_positive_int, default=10, help="average_case Monte Carlo draws (default: 10)")
    _common(p)


def _landscape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file (a dict with 'model_state', see the docs)")
    p.add_argument("checkpoint2", nargs="?", default=None,
                   help="second checkpoint: plot the interpolation from the first to it")
    p.add_argument("--2d", dest="two_d", action="store_true", help="a 2-D slice (contour plot) instead of a 1-D slice")
    p.add_argument("--points", type=_positive_int, default=None,
                   help="points per axis (default: 41 for 1-D, 21 for 2-D)")
    p.add_argument("--range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="coordinate range (default: -0.5 1.5 for interpolation, -1 1 for slices)")
    p.add_argument("--normalization", default="filter", choices=("filter", "layer", "none"),
                   help="direction normalisation (default: filter, Li et al. 2018)")
    p.add_argument("--bias-bn", default="zero", choices=("zero", "copy", "normalize"),
                   help="direction of 0-/1-D parameters (default: zero)")
    p.add_argument("--log", action="store_true", help="log scale for the loss axis")
    p.add_argument("--out", default=None, metavar="PNG", help="picture file (default: <checkpoint>_<kind>.png here)")
    _common(p)


def add_subcommands(
    subparsers: Any,
    *,
    model_factory: ModelFactory | None = None,
    data_factory: DataFactory | None = None,
    loss_factory: LossFactory | None = None,
) -> dict[str, argparse.ArgumentParser]:
    """Register ``sharpness`` and ``landscape`` on an argparse ``subparsers``
    object (from ``parser.add_subparsers()``) and return the two parsers.

    Each sets ``func`` (:func:`sharpness_main` / :func:`landscape_main`) and
    the three factories as defaults on the parsed namespace, so the caller
    dispatches with ``args.func(args)``.
    """
    factories = {"model_factory": model_factory, "data_factory": data_factory, "loss_factory": loss_factory}
    sp = subparsers.add_parser(
        "sharpness", help="sharpness measures of a checkpoint (lambda_max, trace, ...)",
        description="Sharpness measures of a trained model on a fixed data subset; see docs/sharpness.md.",
    )
    _sharpness_args(sp)
    sp.set_defaults(func=sharpness_main, **factories)
    lp = subparsers.add_parser(
        "landscape", help="loss-landscape picture: slice of one checkpoint, or interpolation between two",
        description="Loss-landscape PNG: a filter-normalised 1-D/2-D slice around CHECKPOINT, or the "
                    "interpolation from CHECKPOINT to CHECKPOINT2; see docs/sharpness.md.",
    )
    _landscape_args(lp)
    lp.set_defaults(func=landscape_main, **factories)
    return {"sharpness": sp, "landscape": lp}


# ---------------------------------------------------------------- commands


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return str(v)


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {path}")


def _fail(args: argparse.Namespace, e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _count(data: Sequence[Batch]) -> int:
    """The samples in the measurement batches."""
    return sum(int(y.shape[0]) if isinstance(y, torch.Tensor) and y.dim() else 1 for _, y in data)


def sharpness_main(args: argparse.Namespace) -> int:
    """Run ``sharpness CHECKPOINT``: print a table (and ``--json``); return the exit status."""
    try:
        model, ckpt = load_checkpoint(args.checkpoint, getattr(args, "model_factory", None), device=args.device)
        data = measurement_data(args, ckpt)
        measures = [m.strip() for m in args.measures.split(",") if m.strip()]
        options = {
            "worst_case": {"p": args.p, "adaptive": args.adaptive, "eta": args.eta, "steps": args.steps},
            "average_case": {"adaptive": args.adaptive, "eta": args.eta, "samples": args.noise_samples},
        }
        row = report(
            model, data, measures=measures, loss_fn=_loss_fn(args, ckpt), seed=args.seed, method=args.method,
            tol=args.tol, max_iter=args.max_iter, top_k=args.top_k, trace_method=args.trace_method,
            sketch=args.sketch, min_samples=args.min_samples, max_samples=args.max_samples,
            rho=args.rho, m=args.m, options={k: v for k, v in options.items() if k in measures},
            progress=_progress(args),
        )
        n = _count(data)
        density = None if args.density is None else _density(args, model, ckpt, data, n)
    except (CheckpointError, ValueError, TypeError) as e:
        return _fail(args, e)
    print(f"{args.checkpoint}: {n} {args.split} samples, seed {args.seed}")
    width = max(len(k) for k in row)
    for k, v in row.items():
        print(f"  {k:<{width}}  {_fmt(v)}")
    extra: dict[str, Any] = {}
    if density is not None:
        sd, out = density
        print(f"wrote {out}  (spectral density: {sd.runs} x {sd.n_products // sd.runs} Lanczos steps, "
              f"eigenvalues {min(min(t) for t in sd.nodes):.6g} .. {max(max(t) for t in sd.nodes):.6g})")
        extra["density"] = {"png": str(out), "sigma_squared": args.sigma_squared, **sd.to_dict()}
    _write_json(args.json, {"checkpoint": str(args.checkpoint), "split": args.split, "samples": n,
                            "seed": args.seed, "measures": measures, "rho": args.rho, **row, **extra})
    return 0


def _describe(model: nn.Module, ckpt: Mapping[str, Any], stem: str) -> str:
    """``model on dataset`` from the experiment tool's ``model_info``, else the
    model's class and the checkpoint's name."""
    info = ckpt.get("model_info")
    info = info if isinstance(info, Mapping) else {}
    name = info.get("model") or type(model).__name__
    dataset = info.get("dataset")
    return f"{name} on {dataset} ({stem})" if dataset else f"{name} ({stem})"


def _density(args: argparse.Namespace, model: nn.Module, ckpt: Mapping[str, Any], data: list[Batch],
             n: int) -> tuple[SpectralDensity, Path]:
    """``--density``: the SLQ density of ``model`` on ``data``, drawn to a PNG."""
    from . import plot

    check.positive("sigma_squared", args.sigma_squared)
    sd = hessian_density(model, data, loss_fn=_loss_fn(args, ckpt), iterations=args.density_iter,
                         runs=args.density_runs, probe=args.probe, seed=args.seed, progress=_progress(args))
    stem = Path(args.checkpoint).stem
    out = Path(args.density or f"{stem}_density.png")
    title = (f"{_describe(model, ckpt, stem)}\nHessian spectral density, {n} {args.split} samples, "
             f"SLQ {sd.runs} x {args.density_iter} steps")
    plot.plot_density(sd, out, title=title, sigma_squared=args.sigma_squared)
    return sd, out


def landscape_main(args: argparse.Namespace) -> int:
    """Run ``landscape CHECKPOINT [CHECKPOINT2]``: write the PNG (and ``--json``); return the exit status."""
    from . import plot

    try:
        model, ckpt = load_checkpoint(args.checkpoint, getattr(args, "model_factory", None), device=args.device)
        data = measurement_data(args, ckpt)
        loss_fn = _loss_fn(args, ckpt)
        progress = _progress(args)
        stem = Path(args.checkpoint).stem
        result: Curve | Surface
        if args.checkpoint2 is not None:
            if args.two_d:
                raise ValueError("--2d does not apply to an interpolation between two checkpoints")
            other, _ = load_checkpoint(args.checkpoint2, getattr(args, "model_factory", None), device=args.device)
            lo, hi = args.range or (-0.5, 1.5)
            result = interpolate(model, other, data, linspace(lo, hi, args.points or 41), loss_fn=loss_fn, progress=progress)
            kind = "interp"
        else:
            lo, hi = args.range or (-1.0, 1.0)
            kw: dict[str, Any] = {"seed": args.seed, "normalization": args.normalization, "bias_bn": args.bias_bn,
                                  "loss_fn": loss_fn, "progress": progress}
            if args.two_d:
                grid = linspace(lo, hi, args.points or 21)
                result = slice_2d(model, data, alphas=grid, betas=grid, **kw)
                kind = "slice2d"
            else:
                result = slice_1d(model, data, alphas=linspace(lo, hi, args.points or 41), **kw)
                kind = "slice1d"
        out = Path(args.out or f"{stem}_{kind}.png")
        # the loss drawn, named: which split and how many samples (the picture may travel without its command)
        loss_name = f"{args.split} loss ({_count(data)} {args.split} samples)"
        if isinstance(result, Surface):
            plot.plot_surface(result, out, log=args.log, zlabel=loss_name,
                              title=f"{stem}: 2-D slice ({args.normalization})")
            flat = [v for row in result.losses for v in row]
        else:
            title = f"{stem} -> {Path(args.checkpoint2).stem}" if args.checkpoint2 else f"{stem}: 1-D slice ({args.normalization})"
            plot.plot_curve(result, out, logy=args.log, title=title, ylabel=loss_name)
            flat = result.losses
    except (CheckpointError, ValueError, TypeError) as e:
        return _fail(args, e)
    print(f"wrote {out}  ({kind}, {len(flat)} points, loss {min(flat):.6g} .. {max(flat):.6g})")
    _write_json(args.json, {"checkpoint": str(args.checkpoint), "checkpoint2": args.checkpoint2, "kind": kind,
                            "split": args.split, "seed": args.seed, **result.to_dict()})
    return 0


def main(
    argv: Sequence[str] | None = None,
    *,
    model_factory: ModelFactory | None = None,
    data_factory: DataFactory | None = None,
    loss_factory: LossFactory | None = None,
) -> int:
    """A stand-alone parser with the two subcommands (for scripts and tests)."""
    parser = argparse.ArgumentParser(prog="flatminima", description="Sharpness measures and loss landscapes.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub, model_factory=model_factory, data_factory=data_factory, loss_factory=loss_factory)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
