"""The ``flatminima`` command.

    flatminima compare [options]   several methods x seeds on one set-up: table, JSON/CSV, plots
    flatminima train [options]     one method, one seed
    flatminima list                the registered methods and their defaults
    flatminima study [options]     the results study: tuned radii, seeds, CIs (see study_cli.py)

With no options ``compare`` runs the default comparison (sgd, SAM, ASAM,
WSAM on MNIST-1D, clean labels, 3 seeds; about two minutes on two CPU
cores); ``make demo`` adds ``--noise 0.3``, 30% noisy training labels. Options come from flags and from a TOML file
(``--config``); flags win. See docs/cli.md.

This module only parses arguments and prints: every number comes from
:func:`flatminima.experiments.compare` / :func:`~flatminima.experiments.train_run`.

``flatminima sharpness`` and ``flatminima landscape`` come from
``flatminima.sharpness.cli.add_subcommands(subparsers, model_factory=...,
data_factory=..., loss_factory=...)`` when that module is present; the
factories (in :mod:`.measure`) let them read this tool's checkpoints. Each
subcommand's parser sets ``func``, which takes the parsed arguments and
returns the exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import (DEFAULT_METHODS, FIELDS, ExperimentConfig, build_config, load_toml, noise_text, parse_assignment,
                     parse_hparam_flags)
from .errors import ConfigError, ExperimentError

if TYPE_CHECKING:
    from .measure import SolutionLandscape
    from .runner import Comparison

PROG = "flatminima"
EXIT_ERROR = 2
# Top-level modules of the `cli` extra (pyproject.toml): the commands import them when they run.
CLI_EXTRA = {"numpy", "matplotlib", "rich", "sklearn", "mnist1d", "tomli"}
EXIT_INTERRUPTED = 130

# Config fields that get hand-made flags (or none) instead of the generic ones.
_SPECIAL = {"methods", "seeds", "hparams", "optimizer_args"}
_TYPES = {"str": str, "int": int, "float": float}
_METAVARS = {"dataset": "NAME", "data_dir": "DIR", "model": "NAME", "optimizer": "NAME", "noise_type": "KIND",
             "schedule": "KIND", "device": "DEVICE", "noise": "RATE", "lr": "LR", "epochs": "N", "threads": "N"}


# --------------------------------------------------------------------------- parser
def _add_config_flags(p: argparse.ArgumentParser, command: str) -> None:
    groups = {
        "data": p.add_argument_group("data"),
        "model": p.add_argument_group("model"),
        "optimization": p.add_argument_group("methods and optimization"),
        "runs": p.add_argument_group("runs"),
    }
    section = {"dataset": "data", "data_dir": "data", "num_samples": "data", "train_size": "data", "test_size": "data",
               "noise": "data", "noise_type": "data", "augment": "data", "model": "model", "width": "model",
               "depth": "model", "dropout": "model", "device": "runs", "threads": "runs", "deterministic": "runs",
               "eval_batch_size": "runs"}
    opt = groups["optimization"]
    if command == "compare":
        opt.add_argument("--methods", nargs="+", metavar="METHOD", default=None,
                         help=f"{FIELDS['methods'].metadata['help']} (default: {' '.join(DEFAULT_METHODS)})")
        groups["runs"].add_argument("--seeds", default=None, metavar="N|LIST",
                                    help=FIELDS["seeds"].metadata["help"] + " (default: 3)")
    else:
        opt.add_argument("--method", default=None, metavar="METHOD",
                         help="the method: a registry name (see `flatminima list`), 'sgd', 'adamw', ... or 'base'; "
                              "NAME:key=value,... sets options inline (default: sam)")
        groups["runs"].add_argument("--seed", type=int, default=None, help="the seed (default: 0)")
    opt.add_argument("-H", "--hparam", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                     help=FIELDS["hparams"].metadata["help"] + "; repeatable")
    opt.add_argument("--opt-arg", action="append", default=[], metavar="KEY=VALUE",
                     help=FIELDS["optimizer_args"].metadata["help"] + "; repeatable")
    for name, f in FIELDS.items():
        if name in _SPECIAL:
            continue
        kind = f.metadata["kind"]
        base = kind.removeprefix("optional_")
        flag = "--" + name.replace("_", "-")
        default = f.default
        help_text = f.metadata["help"] + ("" if default is None or base == "bool" else f" (default: {default})")
        group = groups[section.get(name, "optimization")]
        if base == "bool":
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text + f" (default: {'on' if default else 'off'})")
        else:
            group.add_argument(flag, dest=name, type=_TYPES[base], default=None,
                               metavar=_METAVARS.get(name, base.upper()), help=help_text)


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--config", metavar="FILE", help="TOML file of settings (flags override it)")
    g.add_argument("--out", metavar="DIR", help="results folder (default: runs/<name or timestamp>)")
    g.add_argument("--name", help="name of the results folder under runs/")
    g.add_argument("--resume", action="store_true",
                   help="continue the runs in --out from their checkpoints (finished runs are kept)")
    g.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="stop every run once it has this many epochs (as if interrupted); continue with --resume")
    g.add_argument("--progress", choices=("auto", "rich", "plain", "none"), default="auto",
                   help="progress display on stderr (default: auto = bars on a terminal, lines otherwise)")
    g.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep each run's last checkpoint after it finishes")
    g.add_argument("--log", choices=("tensorboard",), default=None,
                   help="also write every epoch's metrics and the figures as TensorBoard runs in --out/tensorboard "
                        "(needs the 'tensorboard' extra)")
    g.add_argument("--sharpness", type=int, metavar="N", default=None,
                   help="add sharpness columns (lambda_max, trace) measured on N training examples at the end of "
                        "each run, with flatminima.sharpness.report (when that module is installed)")


def build_parser() -> argparse.ArgumentParser:
    import flatminima

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compare sharpness-aware optimizers on real data (tables, JSON/CSV, plots).",
        epilog="Run `flatminima compare` with no options for the default comparison; see docs/cli.md. "
               "The commands need the 'cli' extra: pip install 'flatminima[cli]'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {flatminima.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.HelpFormatter

    p = sub.add_parser("compare", help="several methods x seeds on one set-up", formatter_class=fmt,
                       description="Train every method with every seed on one set-up; print the table (mean ± std "
                                   "over seeds) and write JSON, CSV and plots to --out.")
    _add_config_flags(p, "compare")
    _add_run_flags(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("train", help="one method, one seed", formatter_class=fmt,
                       description="Train one method with one seed; per-epoch lines, the final metrics, and the same "
                                   "files as compare.")
    _add_config_flags(p, "train")
    _add_run_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("list", help="the methods and their defaults", description="List the registered methods "
                       "(from flatminima's registry), their hyperparameters and defaults, and the plain optimizers, "
                       "data sets and models.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    from .study_cli import add_parser as add_study

    add_study(sub)
    _add_plugin_subcommands(sub)
    return parser


def _add_plugin_subcommands(sub: argparse._SubParsersAction) -> None:
    """``flatminima sharpness`` / ``landscape`` from flatminima.sharpness, when present."""
    try:
        from flatminima.sharpness.cli import add_subcommands
    except ModuleNotFoundError as e:
        if e.name in ("flatminima.sharpness", "flatminima.sharpness.cli"):
            return  # not part of this installation
        _broken_subcommands(sub, e)
        return
    except Exception as e:  # a broken plug-in must not take the other commands down
        _broken_subcommands(sub, e)
        return
    try:
        from . import measure  # reads this tool's checkpoints for them
    except ModuleNotFoundError as e:
        if missing_extra(e) is None:
            raise
        _broken_subcommands(sub, e)
        return
    parsers = add_subcommands(sub, model_factory=measure.model_factory, data_factory=measure.data_factory,
                              loss_factory=measure.loss_factory)
    measure.add_data_dir_flag(parsers.values())


def missing_extra(error: BaseException) -> str | None:
    """The one-line error for a module of the ``cli`` extra that is not
    installed (None when ``error`` is something else)."""
    if not isinstance(error, ModuleNotFoundError) or (error.name or "").partition(".")[0] not in CLI_EXTRA:
        return None
    return (f"the {PROG} command needs the 'cli' extra, and {error.name} is not installed: "
            "pip install 'flatminima[cli]'")


def _broken_subcommands(sub: argparse._SubParsersAction, error: BaseException) -> None:
    def fail(args: argparse.Namespace) -> int:
        why = missing_extra(error) or (f"the {args.command} command could not be loaded: "
                                       f"{type(error).__name__}: {error}")
        print(f"{PROG}: error: {why}", file=sys.stderr)
        return EXIT_ERROR

    for name in ("sharpness", "landscape"):
        p = sub.add_parser(name, help=f"(unavailable: {type(error).__name__})", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=fail)


# --------------------------------------------------------------------------- settings
def overrides_from_args(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The settings the user gave as flags (absent flags are not included)."""
    out: dict[str, Any] = {}
    for name in FIELDS:
        if name not in _SPECIAL and getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    if command == "compare":
        if args.methods is not None:
            out["methods"] = args.methods
        if args.seeds is not None:
            out["seeds"] = args.seeds
    else:
        if args.method is not None:
            out["methods"] = [args.method]
        if args.seed is not None:
            if args.seed < 0:
                raise ConfigError(f"--seed must be >= 0, got {args.seed}")
            out["seeds"] = [args.seed]
    if args.hparam:
        out["hparams"] = parse_hparam_flags(args.hparam)
    if args.opt_arg:
        out["optimizer_args"] = dict(parse_assignment(a, "--opt-arg") for a in args.opt_arg)
    return out


def config_from_args(args: argparse.Namespace, command: str) -> ExperimentConfig:
    from .runner import config_for_resume

    layers: list[dict[str, Any]] = []
    sources: list[str] = []
    if command == "train":  # train's own defaults: one method, one seed
        layers.append({"methods": ["sam"], "seeds": [0]})
        sources.append("train's defaults")
    if args.config:
        toml = load_toml(args.config)
        if command == "train" and "methods" in toml and len(toml["methods"] if isinstance(toml["methods"], list) else [1]) != 1:
            raise ConfigError(f"{args.config}: `flatminima train` runs one method; use `flatminima compare` for several")
        layers.append(toml)
        sources.append(str(args.config))
    layers.append(overrides_from_args(args, command))
    sources.append("the command line")
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out, the results folder to continue")
        merged: dict[str, Any] = {}
        for layer in layers[1 if command == "train" else 0:]:
            merged.update({k.replace("-", "_"): v for k, v in layer.items()})
        return config_for_resume(args.out, merged)
    cfg = build_config(*layers, sources=tuple(sources))
    if command == "train" and len(cfg.methods) != 1:
        raise ConfigError("`flatminima train` runs one method; use `flatminima compare` for several")
    if command == "train" and len(cfg.seeds) != 1:
        raise ConfigError("`flatminima train` runs one seed; use `flatminima compare --seeds` for several")
    return cfg


def _out_dir(args: argparse.Namespace, command: str) -> Path:
    from .runner import default_out

    if args.out:
        return Path(args.out)
    base = default_out(args.name or (None if command == "compare" else f"train-{time.strftime('%Y%m%d-%H%M%S')}"))
    out, k = base, 1
    while out.exists() and not args.name:
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def describe_setup(cfg: ExperimentConfig, data_text: str) -> str:
    from .methods import optimizer_settings, resolve_methods
    from .models import resolve_model_name

    model = resolve_model_name(cfg.model, cfg.dataset)
    shape = []
    if cfg.width is not None:
        shape.append(f"width {cfg.width}")
    if cfg.depth is not None:
        shape.append(f"depth {cfg.depth}")
    methods = resolve_methods(cfg)
    # Each optimizer of the run with the settings it gets (its first method's): a
    # compare of sgd and adamw shows both learning rates, each its optimizer's default.
    first: dict[str, Any] = {}
    for m in sorted(methods, key=lambda m: m.optimizer != cfg.optimizer.lower()):
        first.setdefault(m.optimizer, m)
    opts = []
    for name, m in first.items():
        _, base = optimizer_settings(m, cfg)
        opts.append(f"{name}({', '.join(f'{k}={v}' for k, v in base.items())})")
    opt = ", ".join(opts) + ("; lr: each optimizer's default" if cfg.lr is None else "; lr: --lr")
    noise = noise_text(cfg)
    sched = f"{cfg.schedule} LR" + (f" with {cfg.warmup_epochs:g} warm-up epochs" if cfg.warmup_epochs else "")
    extras = []
    if cfg.augment:
        extras.append("augmentation")
    if cfg.label_smoothing:
        extras.append(f"label smoothing {cfg.label_smoothing:g}")
    seeds = ",".join(map(str, cfg.seeds))
    return (f"{data_text}; {noise}\n"
            f"model {model}{' (' + ', '.join(shape) + ')' if shape else ''}; {opt}; {sched}; "
            f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, batch {cfg.batch_size}{'; ' + ', '.join(extras) if extras else ''}; seeds {seeds}")


# --------------------------------------------------------------------------- commands
def _run(args: argparse.Namespace, command: str) -> int:
    from .distributed import broadcast_object, init_distributed, shutdown
    from .progress import NullReporter, make_reporter
    from .runner import compare, describe_interrupted
    from .train import load_data

    cfg = config_from_args(args, command)
    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError(f"--stop-after must be >= 1, got {args.stop_after}")
    info = init_distributed(cfg.device)
    try:
        out = Path(broadcast_object(str(_out_dir(args, command))))
        hooks = []
        landscape = None
        if args.sharpness is not None:
            from .measure import SolutionLandscape, sharpness_hook

            hooks.append(sharpness_hook(args.sharpness))
            landscape = SolutionLandscape(args.sharpness)
            hooks.append(landscape)
        log = None
        if args.log == "tensorboard" and info.is_main:  # a missing extra stops the command before any run
            from .tensorboard_log import TensorBoardLog

            log = TensorBoardLog(out / "tensorboard")
        data = load_data(cfg)
        if info.is_main:
            procs = f" ({info.world_size} processes)" if info.enabled else ""
            print(describe_setup(cfg, data.describe()) + procs, flush=True)
        reporter = make_reporter(args.progress, epoch_lines=command == "train") if info.is_main else NullReporter()
        argv = [PROG, *sys.argv[1:]] if args._argv is None else [PROG, *args._argv]
        try:
            result = compare(cfg, out=out, resume=args.resume, stop_after=args.stop_after, reporter=reporter,
                             metric_hooks=hooks, plots=not args.no_plots, keep_checkpoints=args.keep_checkpoints,
                             command=argv, data=data, callback=log)
        except KeyboardInterrupt:
            reporter.close()
            if info.is_main:
                print(f"\n{PROG}: {describe_interrupted(out, f'{PROG} {command}')}", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            reporter.close()  # stops the live display (idempotent)
            if log is not None:
                log.close()  # what was written so far stays readable
        if not info.is_main:
            return 0
        if not result.completed:
            print(f"stopped after epoch {args.stop_after} (--stop-after); checkpoints are in {out}/checkpoints.\n"
                  f"Continue with: {PROG} {command} --out {out} --resume")
            return 0
        if result.runs:
            _print_results(args, cfg, result, out, landscape)
            if log is not None:
                with log:
                    log.add_figures(out / name for name in ("curves.png", "final_accuracy.png", "landscape.png"))
                print(f"TensorBoard runs in {out}/tensorboard/ (tensorboard --logdir {out}/tensorboard)")
        else:
            print(f"\nno method finished; {out}/results.json records why")
        for label, why in result.failures.items():
            print(f"{PROG}: error: {why}", file=sys.stderr)
        return 1 if result.failures else 0
    finally:
        shutdown()


def _print_results(args: argparse.Namespace, cfg: ExperimentConfig, result: Comparison, out: Path,
                   landscape: SolutionLandscape | None) -> None:
    """The table of the methods that finished, and where the files are."""
    from .report import print_table

    summary = result.summary()
    n = len(cfg.seeds)
    base = result.baseline
    notes = [f"mean ± std over {n} seeds; accuracies in %" if n > 1 else "one seed; accuracies in %",
             "gap = accuracy on the labels trained on - test accuracy"]
    if any(r.get("memorised") is not None for r in summary):
        notes.append("memorised = share of the corrupted training labels that the model predicts")
    if base:
        notes.append(f"cost = time per step relative to {base}")
    print()
    print_table(summary, caption="\n".join(notes))
    extra = ""
    if landscape is not None and not args.no_plots:
        written = landscape.write(result.labels, result.baseline, out / "landscape.png")
        extra = ", landscape.png" if written is not None else ""
    print(f"\nresults in {out}/ (results.json, epochs.csv, summary.csv, summary.md"
          f"{'' if args.no_plots else ', curves.png, final_accuracy.png'}{extra}); total {result.seconds:.0f} s")


def cmd_compare(args: argparse.Namespace) -> int:
    return _run(args, "compare")


def cmd_train(args: argparse.Namespace) -> int:
    return _run(args, "train")


def cmd_list(args: argparse.Namespace) -> int:
    import flatminima

    from .data import DATASETS
    from .methods import torch_optimizers
    from .models import MODELS

    methods: list[dict[str, Any]] = []
    for name in flatminima.list_methods():
        spec = flatminima.get_method(name)
        methods.append({"name": name, "class": spec.cls.__name__, "summary": spec.summary, "paper": spec.paper,
                        "defaults": spec.defaults(), "passes_per_step": spec.passes_per_step})
    if args.json:
        print(json.dumps({"methods": methods, "plain_optimizers": ["base", *torch_optimizers()],
                          "datasets": list(DATASETS), "models": list(MODELS)}, indent=2, default=repr))
        return 0
    print("sharpness-aware methods (use with --methods / --method; set options with NAME:key=value or -H NAME.key=value):\n")
    for m in methods:
        defaults = ", ".join(f"{k}={v}" for k, v in m["defaults"].items())
        print(f"  {m['name']:<14} {m['summary']}")
        print(f"  {'':<14} {m['class']}({defaults})")
        print(f"  {'':<14} {m['paper']}\n")
    print("plain optimizers (no perturbation): base (= --optimizer), " + ", ".join(torch_optimizers()))
    print("data sets: " + ", ".join(DATASETS))
    print("models: " + ", ".join(MODELS))
    return 0


# --------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    import os

    # This process draws into files only: Agg, unless the user chose a backend.
    # Set here, not where plots are drawn, so that Python callers keep theirs.
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    args._argv = list(argv) if argv is not None else None
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    func = getattr(args, "func", None)
    if func is None:
        parser.parse_args([args.command, "--help"])
        return EXIT_ERROR
    try:
        return int(func(args) or 0)
    except ExperimentError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_status  # 2: bad input; 1: a run that could not finish (see errors.py)
    except ModuleNotFoundError as e:  # numpy, mnist1d, ... imported when a command runs
        why = missing_extra(e)
        if why is None:
            raise
        print(f"{PROG}: error: {why}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `flatminima list | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
