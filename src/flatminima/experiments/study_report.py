"""The study's numbers, tables and files (see :mod:`.study`).

:func:`study_rows` computes one row per set-up, noise level and method: the
test accuracy over seeds with its 95% Student-t interval, the paired
difference to SGD (per seed) with its interval, passes per step and in
total, the share of wrong labels memorised, and ``lambda_max`` and the
Hessian trace at the end of training (means over seeds).
:func:`write_study` writes ``results.md`` (the tables and the plain
statements of where SAM does not help), ``sweep.md``, ``summary.csv``,
``study.json`` and the plots.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import atomic_write_text, write_json
from .errors import write_error
from .report import render_markdown
from .stats import Interval, paired_difference, t_interval

if TYPE_CHECKING:
    from .study import StudyResult

BASELINE = "sgd"
#: A baseline at or above this test accuracy (%) leaves little to gain: a saturated model.
SATURATED = 97.0


@dataclass
class StudyRow:
    setup: str
    noise: str
    method: str
    label: str
    rho: float | None
    seeds: list[int]
    passes_per_step: float
    total_passes: float  # forward-backward passes over the whole run (per-step passes x steps)
    test_acc: Interval
    diff: Interval | None  # paired difference to SGD, in points; None for SGD itself
    memorised: float | None
    lambda_max: float | None
    trace: float | None
    test_loss: float

    def csv_row(self) -> dict[str, Any]:
        d = self.diff
        return {"setup": self.setup, "noise": self.noise, "method": self.method, "label": self.label, "rho": self.rho,
                "seeds": len(self.seeds), "passes_per_step": self.passes_per_step, "total_passes": self.total_passes,
                "test_acc": self.test_acc.mean, "test_acc_ci_low": self.test_acc.low,
                "test_acc_ci_high": self.test_acc.high, "diff_to_sgd": d.mean if d else None,
                "diff_ci_low": d.low if d else None, "diff_ci_high": d.high if d else None,
                "memorised": self.memorised, "lambda_max": self.lambda_max, "trace": self.trace,
                "test_loss": self.test_loss}


def _mean(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def study_rows(result: StudyResult) -> list[StudyRow]:
    rows = []
    preset = result.preset
    for setup in preset.setups:
        for noise in preset.noises:
            cell = [(t, r) for t, r in result.runs if (t.setup, t.noise) == (setup.name, noise.name)]
            base = {t.seed: r.final["test_acc"] for t, r in cell if t.method == BASELINE}
            for method in preset.methods:
                mine = [(t, r) for t, r in cell if t.method == method]
                if not mine:
                    continue
                finals = [r.final for _, r in mine]
                accs = {t.seed: r.final["test_acc"] for t, r in mine}
                per_step = _mean([f["passes_per_step"] for f in finals]) or math.nan
                rows.append(StudyRow(
                    setup.name, noise.name, method, mine[0][0].label, mine[0][0].rho, sorted(accs), per_step,
                    per_step * finals[0]["steps"], t_interval(list(accs.values())),
                    paired_difference(accs, base) if method != BASELINE and base else None,
                    _mean([f.get("memorised") for f in finals]), _mean([f.get("lambda_max") for f in finals]),
                    _mean([f.get("trace") for f in finals]), _mean([f["test_loss"] for f in finals]) or math.nan,
                ))
    return rows


# --------------------------------------------------------------------------- text
def _ci(i: Interval, signed: bool = False) -> str:
    f = "{:+.1f}" if signed else "{:.1f}"
    if not math.isfinite(i.half):
        return f.format(i.mean)
    return f"{f.format(i.mean)} [{f.format(i.low)}, {f.format(i.high)}]"


def _diff_cell(d: Interval | None) -> str:
    if d is None:
        return "–"
    text = _ci(d, signed=True)
    return f"**{text}**" if d.excludes_zero else text


def _g(v: float | None, fmt: str = "{:.3g}") -> str:
    return "–" if v is None or not math.isfinite(v) else fmt.format(v)


def cell_table(rows: Sequence[StudyRow]) -> str:
    headers = ["method", "ρ", "passes/step", "total passes", "test acc % [95% CI]", "Δ vs SGD, points [95% CI]",
               "memorised %", "λ_max", "trace"]
    body = [[r.method, _g(r.rho, "{:g}"), f"{r.passes_per_step:.2f}", f"{r.total_passes:,.0f}", _ci(r.test_acc),
             _diff_cell(r.diff), _g(r.memorised, "{:.1f}"), _g(r.lambda_max), _g(r.trace)] for r in rows]
    return render_markdown(headers, body)


def overview_table(rows: Sequence[StudyRow], cells: Sequence[tuple[str, str]], methods: Sequence[str]) -> str:
    """Paired difference to SGD per method (rows) and set-up/noise (columns)."""
    by = {(r.setup, r.noise, r.method): r for r in rows}
    headers = ["method", *[f"{s}, {n}" for s, n in cells]]
    body = []
    for m in methods:
        if m == BASELINE:
            body.append([f"{m} (test acc %)", *[_ci(by[(s, n, m)].test_acc) if (s, n, m) in by else "–"
                                                 for s, n in cells]])
        else:
            body.append([m, *[_diff_cell(by[(s, n, m)].diff) if (s, n, m) in by else "–" for s, n in cells]])
    return render_markdown(headers, body)


def where_sam_does_not_help(rows: Sequence[StudyRow], method: str = "sam") -> list[str]:
    """Plain statements, one per set-up and noise level where ``method`` does
    not improve on SGD with 95% confidence (from the paired interval)."""
    by_cell = {(r.setup, r.noise): r for r in rows if r.method == BASELINE}
    out = []
    for r in rows:
        if r.method != method or r.diff is None:
            continue
        base = by_cell.get((r.setup, r.noise))
        sat = (f"; SGD already reaches {base.test_acc.mean:.1f}% (a saturated model)"
               if base is not None and base.test_acc.mean >= SATURATED else "")
        if r.diff.excludes_zero and r.diff.mean > 0:
            continue
        verdict = "is worse than SGD" if r.diff.excludes_zero else "does not differ from SGD beyond the noise of the seeds"
        out.append(f"{r.setup}, {r.noise}: {r.label} {verdict} ({_ci(r.diff, signed=True)} points){sat}.")
    return out


def protocol_text(result: StudyResult) -> str:
    p = result.preset
    setups = "; ".join(
        f"**{s.name}**: " + ", ".join(f"{k} {v}" for k, v in s.settings.items()) for s in p.setups)
    noises = ", ".join(f"{n.name} ({n.rate:g} {n.kind})" if n.rate else n.name for n in p.noises)
    grids = "; ".join(f"{m} {{{', '.join(f'{r:g}' for r in g)}}}" for m, g in p.radii.items() if g)
    common = ", ".join(f"{k} {v}" for k, v in p.common.items())
    bullets = [
        f"- Set-ups: {setups}.",
        (f"- Label noise on the training labels (test labels clean): {noises}. Asymmetric noise maps each of some "
         "classes to a similar one, a documented mapping per data set (flatminima.experiments.noise.ASYMMETRIC)."),
        f"- Shared settings: {common}. Every sharpness-aware method wraps this SGD.",
        (f"- Radius sweep: seed {p.sweep_seed}, trained on the first {1 - p.val_fraction:.0%} of the training set, "
         f"scored on the last {p.val_fraction:.0%} (validation, with the labels as trained on); the radius with the "
         f"best final validation accuracy is kept, ties to the smaller. Grids: {grids}. The test set is not used."),
        (f"- Evaluation: seeds {', '.join(map(str, p.seeds))} on the whole training set; test accuracy after the "
         "last epoch, mean with its 95% Student-t interval; Δ vs SGD is the mean of the per-seed differences (same "
         "seed: same initial weights, data order and noisy labels) with its 95% t interval, **bold** when it "
         "excludes 0."),
        ("- passes/step: forward-backward passes (closure calls) per optimizer step as counted by the training "
         "loop; total passes = passes/step x steps. ESAM's three calls are a full pass, a forward of the perturbed "
         "model for its data selection and a pass on the selected part, so the count overstates its compute."),
        (f"- λ_max and trace: of the training-loss Hessian (the labels as trained on) on {p.sharpness_examples} "
         "training examples at the end of training (flatminima.sharpness), means over seeds."),
    ]
    return "\n".join(bullets)


def results_markdown(result: StudyResult, rows: Sequence[StudyRow]) -> str:
    p = result.preset
    cells = [(s.name, n.name) for s in p.setups for n in p.noises]
    cmd = " ".join(result.command) if result.command else f"flatminima study --preset {p.name}"
    n_runs = len(result.runs) + len(result.sweep)
    parts = [f"# Study: preset {p.name}", "",
             (f"`{cmd}`: {n_runs} runs ({len(result.sweep)} in the sweep); "
              f"{result.seconds / 60:.1f} min in the last session."), "",
             "## Protocol", "", protocol_text(result), "",
             "## Difference to SGD (test accuracy, points)", "",
             overview_table(rows, cells, p.methods), "", "## Where SAM does not help", ""]
    plain = where_sam_does_not_help(rows)
    parts += [f"- {line}" for line in plain] if plain else ["- SAM improves on SGD in every set-up and noise level here."]
    for setup in p.setups:
        parts += ["", f"## {setup.name}"]
        for noise in p.noises:
            mine = [r for r in rows if (r.setup, r.noise) == (setup.name, noise.name)]
            if mine:
                parts += ["", f"### {noise.name}", "", cell_table(mine)]
    return "\n".join(parts) + "\n"


def sweep_markdown(result: StudyResult) -> str:
    p = result.preset
    parts = [f"# Radius sweep (validation accuracy %, seed {p.sweep_seed}; the kept radius in bold)", ""]
    for setup in p.setups:
        for noise in p.noises:
            body = []
            for m, grid in p.radii.items():
                if len(grid) < 2:
                    continue
                scores = {t.rho: r.final["test_acc"] for t, r in result.sweep
                          if (t.setup, t.noise, t.method) == (setup.name, noise.name, m)}
                kept = result.chosen.get((setup.name, noise.name, m))
                body.append([m, *[(f"**ρ={r:g}: {scores[r]:.1f}**" if r == kept else f"ρ={r:g}: {scores[r]:.1f}")
                                  if r in scores else f"ρ={r:g}: –" for r in grid]])
            if body:
                width = max(len(b) for b in body)
                body = [b + [""] * (width - len(b)) for b in body]
                parts += [f"## {setup.name}, {noise.name}", "",
                          render_markdown(["method", *[f"radius {i + 1}" for i in range(width - 1)]], body), ""]
    return "\n".join(parts)


def summary_csv(rows: Sequence[StudyRow]) -> str:
    buf = io.StringIO()
    dicts = [r.csv_row() for r in rows]
    w = csv.DictWriter(buf, fieldnames=list(dicts[0]) if dicts else ["setup"], lineterminator="\n")
    w.writeheader()
    for d in dicts:
        w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in d.items()})
    return buf.getvalue()


def write_study(result: StudyResult, plots: bool = True) -> list[Path]:
    out = result.out
    if out is None:
        raise ValueError("write_study needs a result with an out folder")
    rows = study_rows(result)
    files = {"results.md": results_markdown(result, rows), "sweep.md": sweep_markdown(result),
             "summary.csv": summary_csv(rows)}
    for name, text in files.items():
        atomic_write_text(out / name, text)
    write_json(out / "study.json", {**result.to_dict(), "rows": [r.csv_row() for r in rows]})
    written = [out / n for n in (*files, "study.json")]
    if plots:
        from .study_plots import plot_study

        try:
            written += plot_study(rows, result.preset, out)
        except OSError as e:
            raise write_error(e, out) from None
    return written


def rows_by_cell(rows: Sequence[StudyRow]) -> Mapping[tuple[str, str], list[StudyRow]]:
    by: dict[tuple[str, str], list[StudyRow]] = {}
    for r in rows:
        by.setdefault((r.setup, r.noise), []).append(r)
    return by
