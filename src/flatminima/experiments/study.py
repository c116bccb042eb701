"""The results study: every method against SGD on three set-ups and four
label-noise levels, several seeds, radii tuned on a validation split.

``run_study("full", out="runs/study")`` (= ``flatminima study --out
runs/study``) runs, for each set-up (data set and model) and noise level:

1. **the sweep**: every sharpness-aware method with each radius of its grid
   (:attr:`Preset.radii`), one seed (``sweep_seed``), trained on the first
   ``1 - val_fraction`` of the training set and scored on the rest, the
   *validation split*, against its labels as trained on (noisy, the labels a
   practitioner has); the radius with the best final validation accuracy is
   kept (ties: the smaller one). The test set is never looked at.
2. **the evaluation**: SGD and every method at its kept radius, with every
   seed of ``seeds``, on the whole training set, scored on the test set;
   ``lambda_max`` and the Hessian trace of the training loss are measured at
   the end of each run (:func:`.measure.sharpness_hook`).

Every sharpness-aware method wraps the same SGD (``common``: lr, momentum,
weight decay, batch, cosine schedule). The tables and plots are written by
:mod:`.study_report` and :mod:`.study_plots`. Each finished run is saved
under ``runs/`` at once, so ``resume=True`` (``--resume``) continues an
interrupted study where it stopped. See docs/study.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import flatminima

from .checkpoint import write_json
from .config import ExperimentConfig, build_config
from .data import Dataset
from .errors import ConfigError, ExperimentError, write_error
from .lock import locked_out
from .progress import NullReporter
from .runner import environment, read_finished_run, run_slug
from .train import RunResult, load_data, noisy_labels, train_run


@dataclass(frozen=True)
class Setup:
    """A data set and a model: ``settings`` are :class:`ExperimentConfig` fields."""

    name: str
    settings: Mapping[str, Any]


@dataclass(frozen=True)
class Noise:
    """A label-noise level: ``rate`` of the training labels, of ``kind`` (see :mod:`.noise`)."""

    name: str
    rate: float
    kind: str = "symmetric"


#: The radius grid of the sweep, by method. SAM's radius and its cheap
#: variants' (which approximate SAM's step) span the clean-data default
#: (0.05) to the noisy-label radius of RESULTS.md (0.3-0.45); ASAM's radius
#: is about ten times SAM's (its perturbation is scaled by |w|); Momentum-SAM's
#: default is 0.3.
SAM_RADII = (0.05, 0.15, 0.4)
FULL_RADII: dict[str, tuple[float, ...]] = {
    "sgd": (),
    "sam": SAM_RADII, "asam": (0.5, 1.5, 4.0), "wsam": SAM_RADII, "gsam": SAM_RADII,
    "looksam": SAM_RADII, "sam_every_k": SAM_RADII, "ae_sam": SAM_RADII, "esam": SAM_RADII,
    "momentum_sam": (0.1, 0.3, 0.9),
}

#: Settings every run of a study shares (the base SGD, its schedule, one thread).
COMMON: dict[str, Any] = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128,
                          "schedule": "cosine", "threads": 1, "deterministic": True, "device": "cpu"}


#: How precisely lambda_max and the trace are estimated at the end of each run: power iteration to a
#: relative change of 1e-3 (at most 50 Hessian-vector products), Hutchinson to a relative change of
#: its running mean of 1e-3 with 10 to 20 samples. With the defaults (100 products, up to 100
#: samples) the measurement cost more than training the study's small models; the methods' values
#: differ by far more than this precision (a factor 2-3 between SGD and SAM in a trial run).
SHARPNESS_OPTIONS: dict[str, Any] = {"tol": 1e-3, "max_iter": 50, "min_samples": 10, "max_samples": 20}


@dataclass(frozen=True)
class Preset:
    """A whole study: its set-ups, noise levels, methods with their radius grids, seeds."""

    name: str
    setups: tuple[Setup, ...]
    noises: tuple[Noise, ...]
    radii: Mapping[str, tuple[float, ...]]  # method -> radius grid; () for a plain optimizer
    seeds: tuple[int, ...]
    sweep_seed: int = 0
    val_fraction: float = 0.2
    sharpness_examples: int = 512
    common: Mapping[str, Any] = field(default_factory=lambda: dict(COMMON))

    @property
    def methods(self) -> list[str]:
        return list(self.radii)

    def config(self, setup: Setup, noise: Noise, method: str, seed: int) -> ExperimentConfig:
        return build_config(self.common, setup.settings, {"noise": noise.rate, "noise_type": noise.kind,
                                                          "methods": [method], "seeds": [seed]},
                            sources=("the study's shared settings", f"set-up {setup.name}", f"noise {noise.name}"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["radii"] = {k: list(v) for k, v in self.radii.items()}
        return d


NOISES = (Noise("clean", 0.0), Noise("sym 20%", 0.2), Noise("sym 40%", 0.4), Noise("asym 40%", 0.4, "asymmetric"))

PRESETS: dict[str, Preset] = {
    # About an hour on 2 cores with --workers 2 (docs/study.md: how the sizes were chosen).
    "full": Preset(
        "full",
        setups=(
            Setup("mnist1d-mlp", {"dataset": "mnist1d", "model": "mlp", "num_samples": 10000, "epochs": 20}),
            Setup("mnist1d-cnn", {"dataset": "mnist1d", "model": "cnn1d", "num_samples": 10000, "epochs": 20}),
            Setup("digits-cnn", {"dataset": "digits", "model": "cnn", "width": 16, "epochs": 20}),
        ),
        noises=NOISES,
        radii=FULL_RADII,
        seeds=(0, 1, 2, 3, 4),
    ),
    # Seconds: the test runs it (tiny data and models; the numbers mean nothing).
    "fast": Preset(
        "fast",
        setups=(
            Setup("mnist1d-mlp", {"dataset": "mnist1d", "model": "mlp", "num_samples": 300, "width": 16, "epochs": 2,
                                  "batch_size": 64}),
            Setup("mnist1d-cnn", {"dataset": "mnist1d", "model": "cnn1d", "num_samples": 300, "width": 4, "epochs": 2,
                                  "batch_size": 64}),
            Setup("digits-cnn", {"dataset": "digits", "model": "cnn", "width": 4, "epochs": 1, "train_size": 256,
                                 "test_size": 128, "batch_size": 64}),
        ),
        noises=(Noise("clean", 0.0), Noise("asym 40%", 0.4, "asymmetric")),
        radii={"sgd": (), "sam": (0.05, 0.2), "looksam": (0.05,)},
        seeds=(0, 1),
        sharpness_examples=64,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown study preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def method_label(method: str, rho: float | None) -> str:
    """``sam:rho=0.15``; a plain optimizer keeps its name."""
    return method if rho is None else f"{method}:rho={rho:g}"


# --------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One training run of the study."""

    phase: str  # "sweep" (validation split) or "eval" (test set)
    setup: str
    noise: str
    method: str  # registry or torch name
    rho: float | None
    seed: int

    @property
    def label(self) -> str:
        return method_label(self.method, self.rho)

    def file(self, out: Path) -> Path:
        cell = f"{self.setup}_{self.noise}".replace(" ", "").replace("%", "")
        return out / "runs" / self.phase / cell / f"{run_slug(0, self.label, self.seed)[3:]}.json"


def validation_split(data: Dataset, cfg: ExperimentConfig, fraction: float, seed: int) -> Dataset:
    """The training set split in two: the first ``1 - fraction`` to train on,
    the rest as the scored set, with the labels as trained on (the noise of
    ``cfg`` drawn over the whole training set with ``seed``)."""
    n = len(data.y_train)
    n_val = round(fraction * n)
    if not 0 < n_val < n:
        raise ConfigError(f"a validation fraction of {fraction} leaves no validation or no training example "
                          f"of {n}; use a fraction in (0, 1) that keeps both")
    labels, _ = noisy_labels(data, cfg, seed)
    cut = n - n_val
    return replace(data, x_train=data.x_train[:cut], y_train=data.y_train[:cut], x_test=data.x_train[cut:],
                   y_test=labels[cut:])


@lru_cache(maxsize=8)
def _data(settings_json: str) -> Dataset:
    return load_data(build_config(json.loads(settings_json)))


def run_task(preset: Preset, task: Task) -> RunResult:
    """Train one run of the study (in this process)."""
    setup = next(s for s in preset.setups if s.name == task.setup)
    noise = next(n for n in preset.noises if n.name == task.noise)
    cfg = preset.config(setup, noise, task.label, task.seed)
    data_keys = ("dataset", "data_dir", "num_samples", "train_size", "test_size")
    data = _data(json.dumps({k: getattr(cfg, k) for k in data_keys}))
    hooks = []
    if task.phase == "sweep":
        data = validation_split(data, cfg, preset.val_fraction, task.seed)
    else:
        from .measure import sharpness_hook

        hooks.append(sharpness_hook(preset.sharpness_examples, **SHARPNESS_OPTIONS))
    return train_run(cfg, task.label, task.seed, data=data, metric_hooks=hooks)


def _worker(preset: Preset, task: Task) -> dict[str, Any]:
    return run_task(preset, task).to_dict()


# --------------------------------------------------------------------------- the study
@dataclass
class StudyResult:
    preset: Preset
    out: Path | None
    sweep: list[tuple[Task, RunResult]] = field(default_factory=list)
    runs: list[tuple[Task, RunResult]] = field(default_factory=list)
    chosen: dict[tuple[str, str, str], float | None] = field(default_factory=dict)  # (setup, noise, method) -> rho
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def runs(pairs: Sequence[tuple[Task, RunResult]]) -> list[dict[str, Any]]:
            return [{**asdict(t), "label": t.label, "final": r.final, "history": r.history} for t, r in pairs]

        return {"flatminima_version": flatminima.__version__, "preset": self.preset.to_dict(),
                "command": self.command, "seconds": self.seconds,
                "chosen": [{"setup": s, "noise": n, "method": m, "rho": r} for (s, n, m), r in self.chosen.items()],
                "sweep": runs(self.sweep), "runs": runs(self.runs), "environment": environment()}


def select_radius(candidates: Mapping[float, float]) -> float:
    """The radius with the best validation accuracy; ties go to the smaller radius.

    >>> select_radius({0.05: 60.0, 0.15: 62.5, 0.4: 62.5})
    0.15
    """
    if not candidates:
        raise ValueError("select_radius needs at least one (radius, accuracy) pair")
    best = max(candidates.values())
    return min(r for r, acc in candidates.items() if acc == best)


class _Pool:
    """Runs tasks in this process (``workers=1``) or in a pool of processes,
    reading back the runs a resumed study already finished."""

    def __init__(self, preset: Preset, out: Path | None, workers: int, resume: bool,
                 report: Callable[[Task, RunResult, bool], None]) -> None:
        self.preset, self.out, self.workers, self.resume, self.report = preset, out, workers, resume, report

    def run(self, tasks: Sequence[Task]) -> list[tuple[Task, RunResult]]:
        done: dict[Task, RunResult] = {}
        todo = []
        for task in tasks:
            path = task.file(self.out) if self.out is not None else None
            if self.resume and path is not None and path.is_file():
                epochs = int(self.preset.config(*self._cell(task), task.label, task.seed).epochs)
                done[task] = read_finished_run(path, epochs)
                self.report(task, done[task], True)
            else:
                todo.append(task)
        if self.workers == 1:
            for task in todo:
                done[task] = self._finish(task, run_task(self.preset, task))
        elif todo:
            import multiprocessing

            # spawn: a forked copy of a process that already ran torch can deadlock in its thread pools
            with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                pending: dict[Future[dict[str, Any]], Task] = {pool.submit(_worker, self.preset, t): t for t in todo}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        task = pending.pop(fut)
                        done[task] = self._finish(task, RunResult.from_dict(fut.result()))
        return [(t, done[t]) for t in tasks]

    def _cell(self, task: Task) -> tuple[Setup, Noise]:
        return (next(s for s in self.preset.setups if s.name == task.setup),
                next(n for n in self.preset.noises if n.name == task.noise))

    def _finish(self, task: Task, run: RunResult) -> RunResult:
        if self.out is not None:
            path = task.file(self.out)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_error(e, path.parent) from None
            write_json(path, run.to_dict())
        self.report(task, run, False)
        return run


def _check_workers(workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be a positive integer (processes training at once), got {workers!r}")
    cores = os.cpu_count() or 1
    if workers > cores:
        raise ConfigError(f"--workers {workers} is more than the {cores} CPU cores here; each worker trains on one "
                          f"core, so use at most {cores}")


@locked_out  # one study at a time in `out` (see lock.py)
def run_study(
    preset: Preset | str = "full",
    *,
    out: str | os.PathLike[str] | None = None,
    workers: int = 1,
    resume: bool = False,
    reporter: NullReporter | None = None,
    plots: bool = True,
    command: Sequence[str] = (),
) -> StudyResult:
    """Run the sweep, then the evaluation; write the tables and plots to ``out``."""
    t0 = time.perf_counter()
    preset = get_preset(preset) if isinstance(preset, str) else preset
    _check_workers(workers)
    reporter = reporter or NullReporter()
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        saved = out_path / "preset.json"
        if saved.is_file() and not resume:
            raise ConfigError(f"{out_path} already holds a study; use --resume to continue it, or another --out")
        if saved.is_file() and json.loads(saved.read_text())["preset"] != json.loads(json.dumps(preset.to_dict())):
            raise ConfigError(f"--resume: {saved} holds another preset than {preset.name!r}; resume with the preset "
                              "it was started with, or start a new --out folder")
        try:
            out_path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(e, out_path) from None
        write_json(saved, {"preset": preset.to_dict(), "command": list(command)})
    result = StudyResult(preset, out_path, command=list(command))
    cells = [(s, n) for s in preset.setups for n in preset.noises]
    sweep = [Task("sweep", s.name, n.name, m, r, preset.sweep_seed)
             for s, n in cells for m, grid in preset.radii.items() if len(grid) > 1 for r in grid]
    n_eval = len(cells) * len(preset.radii) * len(preset.seeds)
    total, counter = len(sweep) + n_eval, [0]

    def report(task: Task, run: RunResult, earlier: bool) -> None:
        counter[0] += 1
        elapsed = time.perf_counter() - t0
        f = run.final
        score = "validation" if task.phase == "sweep" else "test"
        eta = "" if earlier else f"; {elapsed / 60:.1f} min so far"
        reporter.message(f"[{counter[0]}/{total}] {task.phase} {task.setup}, {task.noise}: {task.label} seed "
                         f"{task.seed}: {score} acc {f['test_acc']:.1f}%"
                         + (" [finished earlier]" if earlier else f" ({f.get('train_seconds', math.nan):.1f} s{eta})"))

    pool = _Pool(preset, out_path, workers, resume, report)
    reporter.message(f"study {preset.name}: {len(preset.setups)} set-ups x {len(preset.noises)} noise levels; "
                     f"{len(sweep)} sweep runs on the validation split, then {n_eval} runs ({len(preset.seeds)} seeds)")
    result.sweep = pool.run(sweep)
    for s, n in cells:
        for m, grid in preset.radii.items():
            scores = {t.rho: r.final["test_acc"] for t, r in result.sweep
                      if (t.setup, t.noise, t.method) == (s.name, n.name, m) and t.rho is not None}
            result.chosen[(s.name, n.name, m)] = (select_radius(scores) if scores else grid[0]) if grid else None
    evals = [Task("eval", s.name, n.name, m, result.chosen[(s.name, n.name, m)], seed)
             for s, n in cells for m in preset.radii for seed in preset.seeds]
    result.runs = pool.run(evals)
    result.seconds = time.perf_counter() - t0
    if out_path is not None:
        from .study_report import write_study

        write_study(result, plots=plots)
    return result


def main_message(result: StudyResult) -> str:
    """Where the files are (the CLI's last line)."""
    if result.out is None:
        return f"study done in {result.seconds / 60:.1f} min"
    return (f"study done in {result.seconds / 60:.1f} min; tables in {result.out}/results.md (and sweep.md, "
            f"summary.csv, study.json), plots in {result.out}/*.png")


def ensure_study_available() -> None:
    """The study's statistics need scipy (installed with scikit-learn, in the cli extra)."""
    try:
        import scipy.stats  # noqa: F401
    except ImportError as e:
        raise ExperimentError(f"flatminima study needs scipy for its confidence intervals ({e}); "
                              "pip install 'flatminima[cli]'") from None


__all__ = ["NOISES", "PRESETS", "Noise", "Preset", "Setup", "StudyResult", "Task", "get_preset", "method_label",
           "run_study", "select_radius", "validation_split"]
