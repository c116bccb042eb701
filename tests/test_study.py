"""The results study (``flatminima study``, flatminima.experiments.study):
the confidence-interval math against hand computations, the radius choice,
the validation split, and the fast preset end to end (tables, plots,
finite numbers, the sweep's choice, the paired differences recomputed from
the runs with a plain loop, resume)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("mnist1d")
pytest.importorskip("sklearn")
pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

from flatminima.experiments import ConfigError, build_config, load_dataset
from flatminima.experiments.cli import main
from flatminima.experiments.stats import paired_difference, t_interval
from flatminima.experiments.study import (
    PRESETS,
    run_study,
    select_radius,
    validation_split,
)
from flatminima.experiments.train import noisy_labels

# Student-t quantiles t_{0.975, df} from a printed table (df 1..4).
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105}


def test_t_interval_against_a_hand_computation() -> None:
    i = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sample std sqrt(10 / 4), half-width t_{0.975,4} * s / sqrt(5)
    assert i.mean == 3.0 and i.n == 5
    assert i.half == pytest.approx(T975[4] * math.sqrt(2.5) / math.sqrt(5), rel=1e-9)
    assert i.half == pytest.approx(1.963243, abs=1e-6)
    assert (i.low, i.high) == (pytest.approx(3 - 1.963243, abs=1e-6), pytest.approx(3 + 1.963243, abs=1e-6))
    two = t_interval([10.0, 12.0])  # s = sqrt(2), half = 12.706 * sqrt(2) / sqrt(2)
    assert two.mean == 11.0 and two.half == pytest.approx(T975[1], rel=1e-9)
    one = t_interval([7.5])
    assert one.mean == 7.5 and math.isnan(one.half) and not one.excludes_zero


def test_paired_difference_against_a_hand_computation() -> None:
    a = {0: 60.0, 1: 62.0, 2: 61.0, 9: 99.0}  # seed 9 has no partner: left out
    b = {0: 55.0, 1: 56.0, 2: 57.0}
    d = paired_difference(a, b)  # differences 5, 6, 4: mean 5, s 1
    assert (d.mean, d.n) == (5.0, 3)
    assert d.half == pytest.approx(T975[2] / math.sqrt(3), rel=1e-9)
    assert d.excludes_zero
    # the same values unpaired would give a far wider interval: pairing is what the table reports
    assert paired_difference({0: 1.0, 1: -1.0}, {0: 0.0, 1: 0.0}).excludes_zero is False


@pytest.mark.parametrize(("values", "words"), [
    ([], "at least one value"), ([1.0, math.nan], "finite values, got nan"), ([1.0, math.inf], "inf"),
])
def test_t_interval_refuses_what_it_cannot_serve(values: list[float], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        t_interval(values)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\), got 95"):
        t_interval([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match=r"seeds in both runs; got seeds \[0\] and \[1\]"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_select_radius_takes_the_best_and_the_smaller_on_a_tie() -> None:
    assert select_radius({0.05: 60.0, 0.15: 62.5, 0.4: 61.0}) == 0.15
    assert select_radius({0.4: 62.5, 0.05: 60.0, 0.15: 62.5}) == 0.15
    with pytest.raises(ValueError, match="at least one"):
        select_radius({})


def test_validation_split_scores_held_out_training_examples(tmp_path: Path) -> None:
    cfg = build_config(dict(num_samples=300, noise=0.4, noise_type="asymmetric", data_dir=str(tmp_path)))
    data = load_dataset("mnist1d", str(tmp_path), num_samples=300)
    val = validation_split(data, cfg, 0.2, seed=3)
    assert len(val.y_train) == 192 and len(val.y_test) == 48  # 240 training examples: 80% / 20%
    assert torch.equal(val.x_train, data.x_train[:192]) and torch.equal(val.x_test, data.x_train[192:])
    assert torch.equal(val.y_test, noisy_labels(data, cfg, 3)[0][192:])  # the labels as trained on
    assert not torch.equal(val.y_test, data.y_train[192:])  # ... which are noisy, not the clean ones
    with pytest.raises(ConfigError, match="validation fraction of 0.001 leaves no validation"):
        validation_split(data, cfg, 0.001, seed=0)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fast_preset_writes_tables_and_plots_from_its_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    assert main(["study", "--preset", "fast", "--out", str(out), "--progress", "none"]) == 0
    assert "study done" in capsys.readouterr().out
    for name in ("results.md", "sweep.md", "summary.csv", "study.json", "accuracy_vs_passes.png",
                 "difference_to_sgd.png", "sharpness.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    preset = PRESETS["fast"]
    study = json.loads((out / "study.json").read_text())
    cells = len(preset.setups) * len(preset.noises)
    assert len(study["runs"]) == cells * len(preset.radii) * len(preset.seeds)
    assert len(study["sweep"]) == cells * 2  # only sam has more than one radius to try
    assert all(r["phase"] == "sweep" for r in study["sweep"])

    # the sweep's choice, recomputed: the best validation accuracy, the smaller radius on a tie
    for c in study["chosen"]:
        if c["method"] == "sam":
            scores = [(r["final"]["test_acc"], -r["rho"]) for r in study["sweep"]
                      if (r["setup"], r["noise"], r["method"]) == (c["setup"], c["noise"], "sam")]
            assert c["rho"] == -max(scores)[1]
        elif c["method"] == "looksam":
            assert c["rho"] == 0.05  # a grid of one radius is not swept
        else:
            assert c["rho"] is None

    rows = _rows(out / "summary.csv")
    assert len(rows) == cells * len(preset.radii)
    for row in rows:
        for key in ("test_acc", "test_acc_ci_low", "test_acc_ci_high", "passes_per_step", "total_passes",
                    "lambda_max", "trace"):
            assert math.isfinite(float(row[key])), (row["setup"], row["method"], key)
        # the paired difference to SGD and its interval, recomputed from the runs with a plain loop
        if row["method"] == "sgd":
            assert row["diff_to_sgd"] == ""
            continue
        mine, base = {}, {}
        for r in study["runs"]:
            if (r["setup"], r["noise"]) == (row["setup"], row["noise"]):
                if r["method"] == row["method"]:
                    mine[r["seed"]] = r["final"]["test_acc"]
                if r["method"] == "sgd":
                    base[r["seed"]] = r["final"]["test_acc"]
        diffs = [mine[s] - base[s] for s in sorted(mine)]
        mean = sum(diffs) / len(diffs)
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
        half = T975[len(diffs) - 1] * sd / math.sqrt(len(diffs))
        assert float(row["diff_to_sgd"]) == pytest.approx(mean, abs=1e-9)
        assert float(row["diff_ci_high"]) == pytest.approx(mean + half, abs=1e-6)
        assert float(row["passes_per_step"]) == {"sam": 2.0, "looksam": 1.25}[row["method"]]

    text = (out / "results.md").read_text()
    assert "## Where SAM does not help" in text and "## Difference to SGD" in text
    for setup in preset.setups:
        assert f"## {setup.name}" in text
    assert "Δ vs SGD, points [95% CI]" in text and "λ_max" in text

    # resume: every run is read back, nothing trains, the same tables
    before = (out / "summary.csv").read_text()
    assert main(["study", "--preset", "fast", "--out", str(out), "--progress", "plain", "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("[finished earlier]") == len(study["runs"]) + len(study["sweep"])
    assert (out / "summary.csv").read_text() == before
    # a second study into the same folder is refused, naming the way out; so is resuming another preset
    assert main(["study", "--preset", "fast", "--out", str(out), "--progress", "none"]) == 2
    assert "already holds a study; use --resume" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="holds another preset than 'fast'"):
        run_study(replace(preset, seeds=(0, 1, 2)), out=out, resume=True)


def test_study_refuses_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "--preset", "fast", "--workers", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--workers must be a positive integer" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown study preset 'huge'; choose from full, fast"):
        run_study("huge")
    assert main(["study", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
