"""Smoke test of the side-by-side benchmark against pytorch_optimizer (``python -m benchmarks.peers``,
issue #15 item 1): tiny models, one rep; it checks what is measured and reported, not the timings."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("pytorch_optimizer")
from benchmarks import peer_memory, peers  # noqa: E402


def test_the_issue_models_have_their_tensor_counts() -> None:
    counts = {wl.name: wl.n_tensors for wl in peers.workloads(torch.device("cpu"))}
    assert counts == {"mlp": 6, "resnet1d": 47, "transformer": 102}
    mlp = peers.workloads(torch.device("cpu"))[0]
    assert mlp.n_params == 78858 and any(isinstance(m, torch.nn.BatchNorm1d)
                                         for m in peers.workloads(torch.device("cpu"))[1].model.modules())


def test_every_peer_is_built_with_its_documented_usage() -> None:
    wl = peers.workloads(torch.device("cpu"), tiny=True)[1]  # the ResNet1D: BatchNorm
    for name, label in peers.PAIRS:
        opt, step = peers.build_peer(peers._copy(wl), name)
        step()
        assert type(opt).__name__ == label.replace("ASAM", "SAM") and type(opt).__module__.startswith("pytorch_optimizer")
    with pytest.raises(ValueError, match="no pytorch_optimizer peer for 'vasso'; peers: \\['sam'"):
        peers.build_peer(wl, "vasso")


def test_side_by_side_run_reports_ratios_bookkeeping_and_memory(tmp_path: Path) -> None:
    res = peers.run_peers(quick=True, tiny=True, reps=1, methods=["sam", "looksam"], memory=False,
                          models=["mlp", "resnet1d"],
                          out=str(tmp_path / "peers.json"))
    # memory: our SAM in its fresh process; the peer's child measured in this process (its figures are
    # not meaningful here, only their form: one more child process would add seconds to the suite)
    res["memory"] = peer_memory.measure(["sam"], device="cpu", width=256, peers=False, threads=1,
                                        progress=lambda m: None)
    cfg = dict(device="cpu", threads=1, width=64, mode="hwm", library="pytorch_optimizer", method="sam")
    res["memory"]["peers"]["sam"] = peer_memory._child(cfg)
    res["targets"] = peers.targets(res)
    assert list(res["workloads"]) == ["mlp", "resnet1d"]
    for w in res["workloads"].values():
        steps = w["steps"]
        assert list(steps) == ["sgd", "floor", "flatminima sam", "pytorch_optimizer sam",
                               "pytorch_optimizer sam foreach", "flatminima looksam", "pytorch_optimizer looksam"]
        assert steps["floor"]["x_floor"] == 1.0 and steps["sgd"]["median_x_sgd"] == 1.0
        assert steps["floor"]["bookkeeping_ms"] == 0.0 and steps["sgd"]["bookkeeping_ms"] == 0.0
        assert steps["flatminima looksam"]["periodic"] and not steps["flatminima sam"]["periodic"]
        assert steps["flatminima looksam"]["inner"] == peers.PERIODIC_INNER
        for e in steps.values():
            assert all(math.isfinite(e[k]) and e[k] > 0 for k in ("median_ms", "mean_ms", "x_floor"))
    mem = res["memory"]
    for side in ("ours", "peers"):
        assert set(mem[side]) == {"sam"} and math.isfinite(mem[side]["sam"]["peak_extra_x_params"]), mem
    names = [t["name"] for t in res["targets"]]
    assert "SAM bookkeeping <= 0.5 x the fastest peer's (mlp)" in names
    assert "SAM step <= the peer's (resnet1d)" in names and "sam peak extra memory <= 1.0 x params (+0.03)" in names
    text = peers.render(res)
    assert "pytorch_optimizer looksam*" in text and "bookkeeping x SGD" in text and ("[PASS]" in text or "[MISS]" in text)
    assert (tmp_path / "peers.json").stat().st_size > 0
