"""Smoke test of ``benchmarks.study_checks`` (the LookSAM and ESAM checks behind RESULTS.md) at one
epoch: every run trains and is reported. The 20-epoch figures are RESULTS.md's; they are not
asserted here (minutes of training)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("pytorch_optimizer")
pytest.importorskip("mnist1d")


def test_study_checks_run_every_comparison(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.study_checks import main

    rows = main(["--epochs", "1"])
    assert [(k, a) for k, a, _, _ in rows["looksam"]] == [
        ("sgd", 0.0), ("flatminima", 0.7), ("flatminima layerwise", 0.7), ("pytorch_optimizer", 0.7),
        ("flatminima", 0.1), ("pytorch_optimizer", 0.1), ("flatminima", 0.0)]
    assert [r[0] for r in rows["esam"]] == ["sgd", "esam:rho=0.05", "esam:rho=0.05,gamma=1.0", "esam:rho=0.05,beta=1.0"]
    for row in rows["looksam"] + rows["esam"]:
        assert all(math.isfinite(x) and x >= 0 for x in row[-3:] if isinstance(x, float)), row
        assert 0 <= row[-2] <= 100
    printed = capsys.readouterr().out
    assert "pytorch_optimizer" in printed and "esam:rho=0.05,gamma=1.0" in printed
