"""``make gpu-check`` runs on a machine without a GPU: its CPU fallback (issue #15 item 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_fallback_runs_every_check_and_writes_the_report(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--no-bench", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [c["status"] for c in report["checks"]] == ["PASS"] * 5, report["checks"]
    assert "[PASS] one synchronisation: the deferred finite check" in (tmp_path / "report.txt").read_text()
    assert report["env"]["device"].startswith("cpu (no GPU")
    syncs = report["syncs"]
    assert set(syncs) >= {"sam", "asam", "wsam", "gsam", "looksam", "ae_sam", "sam + GradScaler", "sam without model="}
    # one finite check (deferred, as on a device) and the radius factor read on the host (CPU only)
    assert syncs["sam"]["per_step"] == 2.0 and sum(n for k, n in syncs["sam"]["where"].items() if k.endswith("is_finite")) == 3
    assert syncs["sam without model="]["per_step"] == 3.0  # both finite checks: without model= nothing defers
    text = (tmp_path / "report.txt").read_text()
    assert "[PASS] FSDP2, world size 1" in text and "host reads of tensor values" in text
