"""Smoke test of the sharpness benchmark section (``python -m benchmarks.sharpness``);
asserts the structure of its results, nothing about timings."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

bench = pytest.importorskip("benchmarks.sharpness")


def test_sharpness_benchmark_tiny(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    res = bench.run_sharpness_benchmark(quick=True, tiny=True, threads=1, reps=1, out=str(out), progress=None)
    assert set(res["workloads"]) == {"transformer", "mlp"}
    for w in res["workloads"].values():
        for key in ("fb", "hvp", "hvp_cached"):
            assert w[key]["median"] > 0
        for key in ("lambda_max", "trace"):
            assert math.isfinite(w[key]["value"]) and 1 <= w[key]["products"] <= 20
            assert w[key]["seconds"]["median"] > 0
    assert json.loads(out.read_text())["meta"]["tiny"] is True
    text = bench.render(res)
    assert "lambda_max" in text and "transformer" in text and "mlp" in text
    versus = res["versus_pyhessian"]
    if "skipped" in versus:
        assert "pyhessian" in versus["skipped"] and "skipped" in text
        return
    for w in versus["workloads"].values():
        lm, tr, de = w["lambda_max"], w["trace"], w["density"]
        assert lm["flatminima"]["rel_error"] <= 1e-3 and lm["pyhessian"]["products"] >= 1
        assert tr["hutch++"]["met"] and tr["hutch++"]["stderr"] <= tr["pyhessian"]["stderr"]
        assert de["l1"] < 1e-3 and de["pyhessian"]["products"] == de["flatminima"]["products"] == 20
    assert "vs PyHessian" in text and "HVPs (ratio)" in text
