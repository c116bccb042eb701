"""Several methods x seeds on one set-up: the ``compare`` command as a function.

``compare(cfg, out="runs/x")`` trains every (method, seed) pair of ``cfg``
with :func:`~flatminima.experiments.train.train_run`, writes the results
folder and returns a :class:`Comparison`. Layout of ``out``::

    config.json          the settings (replay: ExperimentConfig(**json["config"]))
    results.json         settings, methods, every run's per-epoch history, summary
    epochs.csv           one row per method, seed and epoch
    summary.csv          mean and std over seeds per method
    summary.md           the table, as Markdown
    curves.png           learning curves with bands over seeds
    final_accuracy.png   final accuracies with error bars
    runs/NN_<method>_seed<k>.json     each finished run (resume skips these)
    checkpoints/NN_<method>_seed<k>.pt  the latest epoch of unfinished runs

With ``resume=True`` finished runs are read back and unfinished ones
continue from their checkpoints; the other settings must be those the
folder was written with (``methods`` and ``seeds`` may change: add a seed
or a method to a finished comparison).
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import flatminima

from .checkpoint import atomic_write_text, write_json
from .config import ExperimentConfig, build_config, config_differences, noise_text
from .data import Dataset
from .distributed import barrier, dist_info
from .errors import ConfigError, ExperimentError, MethodFailed, write_error
from .lock import locked_out
from .methods import Method, describe_method, resolve_methods
from .progress import NullReporter
from .report import epochs_csv, render_markdown, summarize, summary_csv, table
from .train import Callback, MetricHook, RunResult, load_data, train_run


PROG_ERROR = "flatminima: error: "


@dataclass
class Comparison:
    config: ExperimentConfig
    methods: list[Method]
    runs: list[RunResult] = field(default_factory=list)
    completed: bool = False
    out: Path | None = None
    dataset: str = ""
    failures: dict[str, str] = field(default_factory=dict)  # label -> why the method could not run
    seconds: float = 0.0

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.methods]

    @property
    def baseline(self) -> str | None:
        """The first plain optimizer in the comparison that ran: the cost reference."""
        return next((m.label for m in self.methods if m.plain and m.label not in self.failures), None)

    def summary(self) -> list[dict[str, Any]]:
        return summarize(self.runs, self.labels, self.baseline)

    def to_dict(self) -> dict[str, Any]:
        return {
            "flatminima_version": flatminima.__version__,
            "config": self.config.to_dict(),
            "dataset": self.dataset,
            "completed": self.completed,
            "baseline": self.baseline,
            "methods": [describe_method(m, self.config) for m in self.methods],
            "summary": self.summary(),
            "failures": self.failures,
            "runs": [r.to_dict() for r in self.runs],
            "environment": environment(self.config),
        }


def environment(cfg: ExperimentConfig | None = None) -> dict[str, Any]:
    info = dist_info()
    threads = cfg.threads if cfg is not None and cfg.threads else torch.get_num_threads()
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "threads": threads, "cuda": torch.cuda.is_available(),
            "world_size": info.world_size}


def label_slug(label: str) -> str:
    """A method's label as part of a file name: ``sam:rho=0.3`` -> ``sam_rho_0.3``."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", label.replace("=", "-")).strip("_") or "method"


def run_slug(index: int, label: str, seed: int) -> str:
    """File-name stem of a run: ``03_sam_rho_0.3_seed1``."""
    return f"{index:02d}_{label_slug(label)}_seed{seed}"


def _tagged(callback: Callback, run: str) -> Callback:
    """``callback`` with each event also naming its run (its file-name stem)."""
    return lambda event: callback({**event, "run": run})


def default_out(name: str | None = None, root: str = "runs") -> Path:
    return Path(root) / (name or time.strftime("%Y%m%d-%H%M%S"))


def read_saved_config(out: Path) -> dict[str, Any] | None:
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["config"]
    except (ValueError, KeyError, OSError) as e:
        raise ExperimentError(f"cannot read {path}: {e}") from None


def read_finished_run(path: Path, epochs: int) -> RunResult:
    """The finished run saved in ``path`` (``runs/*.json``), checked: a damaged
    or edited file is refused in one line, naming it, instead of failing later."""
    try:
        d = json.loads(path.read_text())
        run = RunResult.from_dict(d)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise ExperimentError(f"--resume: {path} is not a finished run's record ({type(e).__name__}: {e}); "
                              "delete it to train that run again") from None
    if not (isinstance(run.completed, bool) and isinstance(run.label, str) and type(run.seed) is int
            and isinstance(run.history, list) and (len(run.history) == epochs or not run.completed)
            and all(_is_row(row, i) for i, row in enumerate(run.history, 1))
            and all(_is_number(v) for v in run.extras.values())):
        raise ExperimentError(f"--resume: {path} is not a finished run's record of {epochs} epochs (a label, a "
                              "seed, one row of numbers per epoch); delete it to train that run again")
    return run


def _is_row(row: Any, epoch: int) -> bool:
    """Whether ``row`` is epoch ``epoch``'s row of results: numbers (None for NaN), with its step count and time."""
    return (isinstance(row, dict) and row.get("epoch") == epoch
            and all(isinstance(row.get(k), (int, float)) for k in ("steps", "epoch_seconds"))
            and all(_is_number(v) for v in row.values()))


def _is_number(v: Any) -> bool:
    return v is None or isinstance(v, (int, float)) and not isinstance(v, bool)  # JSON writes NaN as null


def config_for_resume(out: str | os.PathLike[str], overrides: dict[str, Any]) -> ExperimentConfig:
    """The settings saved in ``out``, with ``overrides`` applied (the flags the
    user gave again); an override that changes the numbers is an error."""
    saved = read_saved_config(Path(out))
    if saved is None:
        raise ExperimentError(f"--resume: {Path(out) / 'config.json'} does not exist; nothing to resume in {out}")
    cfg = build_config(saved, overrides, sources=(str(Path(out) / "config.json"), "the command line"))
    check_resume_config(saved, cfg, out)
    return cfg


def check_resume_config(saved: dict[str, Any], cfg: ExperimentConfig, out: str | os.PathLike[str]) -> None:
    diffs = [d for d in config_differences(saved, cfg) if not d.startswith(("methods:", "seeds:"))]
    if diffs:
        raise ConfigError(f"--resume: these settings differ from {Path(out) / 'config.json'}: " + "; ".join(diffs)
                          + " (start a new --out folder to change them)")


@locked_out  # one run at a time in `out` (see lock.py)
def compare(
    cfg: ExperimentConfig,
    *,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    reporter: NullReporter | None = None,
    metric_hooks: Sequence[MetricHook] = (),
    plots: bool = True,
    keep_checkpoints: bool = False,
    command: Sequence[str] | None = None,
    data: Dataset | None = None,
    callback: Callback | None = None,
) -> Comparison:
    """Train every method x seed of ``cfg``; write the results folder when ``out`` is given.

    ``callback`` gets every run's events as :func:`~.train.train_run` gives
    them (a dict per step, per epoch and at the end), each with ``run``, the
    run's file-name stem (``01_sam_seed0``); runs read back by ``resume``
    give none."""
    t_start = time.perf_counter()
    methods = resolve_methods(cfg)
    reporter = reporter or NullReporter()
    info = dist_info()
    main = info.is_main
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        saved = read_saved_config(out_path)
        if saved is not None and not resume:
            raise ConfigError(f"{out_path} already holds results; use --resume to continue them, or another --out")
        if saved is not None:
            check_resume_config(saved, cfg, out_path)
        barrier()  # every process has looked before rank 0 writes
        if main:
            try:
                (out_path / "runs").mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_error(e, out_path / "runs") from None
            write_json(out_path / "config.json", {"config": cfg.to_dict(), "command": list(command or []),
                                                  "flatminima_version": flatminima.__version__})
    if data is None:
        data = load_data(cfg)
    result = Comparison(cfg, methods, out=out_path, dataset=data.describe())
    reporter.begin(len(methods) * len(cfg.seeds), cfg.epochs)
    all_done = True
    for i, method in enumerate(methods):
        for seed in cfg.seeds:
            slug = run_slug(i, method.label, seed)
            run_file = out_path / "runs" / f"{slug}.json" if out_path else None
            ckpt = out_path / "checkpoints" / f"{slug}.pt" if out_path else None
            if resume and run_file is not None and run_file.is_file():
                run = read_finished_run(run_file, cfg.epochs)
                if run.completed and run.label == method.label and run.seed == seed:
                    result.runs.append(run)
                    reporter.skip(run)
                    continue
            try:
                run = train_run(cfg, method, seed, data=data, checkpoint=ckpt, resume=resume,
                                stop_after=stop_after, reporter=reporter, metric_hooks=metric_hooks,
                                callback=None if callback is None else _tagged(callback, slug))
            except MethodFailed as e:
                if len(methods) == 1:
                    raise
                result.failures[method.label] = str(e)  # the others still run
                reporter.message(f"{PROG_ERROR}{e}; going on without {method.label}")
                break
            result.runs.append(run)
            if not run.completed:
                all_done = False
                continue
            if run_file is not None and main:
                write_json(run_file, run.to_dict())
                if ckpt is not None and not keep_checkpoints and ckpt.exists():
                    ckpt.unlink()
    result.completed = all_done
    result.seconds = time.perf_counter() - t_start
    if out_path is not None and main:
        write_outputs(result, plots=plots)
    return result


def _count(n: int, what: str) -> str:
    return f"{n or 'no'} {what}{'' if n == 1 else 's'}"


def describe_interrupted(out: Path, command: str) -> str:
    """What an interrupted comparison left in ``out`` (counted on disk, not
    assumed: finished runs delete their checkpoints) and how to go on."""
    finished = list((out / "runs").glob("*.json")) if (out / "runs").is_dir() else []
    ckpts = list((out / "checkpoints").glob("*.pt")) if (out / "checkpoints").is_dir() else []
    tables = [n for n in ("results.json", "epochs.csv", "summary.csv", "summary.md") if (out / n).is_file()]
    if not (out / "config.json").is_file():
        return f"interrupted before anything was saved in {out}.\nStart again with: {command} --out {out}"
    return (f"interrupted; {out} holds {_count(len(finished), 'finished run')} (runs/), "
            f"{_count(len(ckpts), 'checkpoint')} (checkpoints/) and "
            + (", ".join(tables) if tables else "no results.json yet")
            + f".\nContinue with: {command} --out {out} --resume")


def write_outputs(result: Comparison, plots: bool = True) -> list[Path]:
    """results.json, epochs.csv, summary.csv, summary.md and the plots."""
    out = result.out
    assert out is not None
    written = []
    write_json(out / "results.json", result.to_dict())
    atomic_write_text(out / "epochs.csv", epochs_csv(result.runs))
    summary = result.summary()
    atomic_write_text(out / "summary.csv", summary_csv(summary))
    headers, rows = table(summary, pm=" ± ")
    atomic_write_text(out / "summary.md", render_markdown(headers, rows) + "\n")
    written += [out / n for n in ("results.json", "epochs.csv", "summary.csv", "summary.md")]
    if plots and any(r.history for r in result.runs):
        try:
            from .plots import plot_all
        except ImportError as e:  # matplotlib missing
            print(f"flatminima: no plots ({e}); install the extra: pip install 'flatminima[cli]'", file=sys.stderr)
        else:
            title = f"{result.dataset}; {noise_text(result.config)}"
            try:
                written += plot_all(result.runs, result.labels, out, title)
            except OSError as e:  # matplotlib writes the PNGs itself
                raise write_error(e, out) from None
    return written
