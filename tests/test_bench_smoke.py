"""Smoke test of the benchmark harness (``make bench``): runs it in --quick
mode on tiny models and checks the structure of what it returns. It asserts
nothing about timings."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import flatminima  # noqa: E402

benchmarks = pytest.importorskip("benchmarks")


def _positive_finite(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    res = benchmarks.run_benchmark(quick=True, tiny=True, threads=1, reps=2, warmup=1, out=str(out), progress=None)
    res["_out"] = out
    return res


def test_every_registered_method_appears(results: dict) -> None:
    methods = flatminima.list_methods()
    assert results["methods"] == methods
    for w in results["workloads"].values():
        for name in methods:
            for path in ("foreach", "per-tensor"):
                assert f"{name}[{path}]" in w["steps"]
            assert name in w["bookkeeping"]
            assert name in w["held"]
    assert set(results["memory"]["methods"]) == set(methods)


def test_ratios_are_positive_finite(results: dict) -> None:
    assert set(results["workloads"]) == {"transformer", "mlp"}
    for w in results["workloads"].values():
        assert w["info"]["param_tensors"] > 0
        for key, e in w["steps"].items():
            assert "error" not in e, (key, e.get("error"))
            for field in ("median", "iqr", "x_floor", "x_sgd"):
                assert _positive_finite(e[field]) or (field == "iqr" and e[field] == 0.0), (key, field, e[field])
            assert e["passes_per_step"] > 0
        assert w["steps"]["floor"]["x_floor"] == 1.0
        assert w["steps"]["sgd"]["x_sgd"] == 1.0
        for name, b in w["bookkeeping"].items():
            assert "error" not in b, (name, b.get("error"))
            assert _positive_finite(b["foreach"]["median"]) and _positive_finite(b["per-tensor"]["median"])
            assert _positive_finite(b["speedup"])
        for name, h in w["held"].items():
            assert h["total_bytes"] >= 0


def test_memory_and_targets(results: dict) -> None:
    mem = results["memory"]
    assert mem["param_bytes"] > 0
    for name, m in mem["methods"].items():
        assert "error" not in m, (name, m.get("error"))
        # None: the method ran no perturbed pass in the steps measured (adaptive methods)
        assert m["peak_extra_x_params"] is None or math.isfinite(m["peak_extra_x_params"])
        assert math.isfinite(m["held_rss_x_params"])
    names = [t["name"] for t in results["targets"]]
    assert any("floor" in n for n in names) and any("bookkeeping" in n for n in names)
    assert all(isinstance(t["pass"], bool) for t in results["targets"])


def test_json_and_report(results: dict) -> None:
    from benchmarks.report import render

    on_disk = json.loads(Path(results["_out"]).read_text())
    assert on_disk["methods"] == results["methods"]
    text = render(results)
    for name in results["methods"]:
        assert name in text
    assert "PASS" in text or "MISS" in text


def test_training_benchmark_structure() -> None:
    """``python -m benchmarks.training`` (AMP part; DDP's two processes are
    covered by tests/test_ddp.py): every optimizer x mode is timed and the
    ratios against fp32 and against SGD are there."""
    from benchmarks.training import AMP_MODES, render, run_training_benchmark

    res = run_training_benchmark(quick=True, tiny=True, threads=1, progress=None, ddp=False)
    for w in res["amp"].values():
        for mode in AMP_MODES:
            assert _positive_finite(w["sam_vs_sgd"][mode]["median"])
            for kind in ("sgd", "sam"):
                assert _positive_finite(w["seconds"][f"{kind}/{mode}"]["median"])
        assert w["vs_fp32"]["sam/fp32"]["median"] == 1.0
    text = render(res)
    assert "fp16+scaler" in text and "SAM x SGD" in text
    for optim in ("sgd", "adamw_torch"):  # the Hugging Face Trainer part (transformers is in the dev extra)
        assert _positive_finite(res["hf"][optim]["sam_vs_plain"]) and res["hf"][optim]["n"] == 2 * 3
    assert "SharpnessAwareTrainer" in text
