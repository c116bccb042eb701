"""Metrics as they happen (issue #16 item 6): ``--log tensorboard`` writes
every epoch's row, the final sharpness values and the figures as TensorBoard
runs (read back here with TensorBoard's own EventAccumulator and compared
with results.json); Python callers get a dict per step, epoch and run end
through ``callback=``; without tensorboard the flag is a one-line error
naming the extra."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mnist1d")

from flatminima.experiments import build_config, compare, train_run  # noqa: E402
from flatminima.experiments.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("fm_logging_data"))


def tiny_args(data_dir: str, *extra: str) -> list[str]:
    return ["--num-samples", "200", "--epochs", "2", "--batch-size", "40", "--width", "8", "--threads", "1",
            "--progress", "none", "--data-dir", data_dir, "--seeds", "1", *extra]


def test_log_tensorboard_writes_every_epochs_metrics_and_the_figures(tmp_path: Path, data_dir: str,
                                                                    capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    assert main(["compare", *tiny_args(data_dir, "--methods", "sgd", "sam:rho=0.1", "--sharpness", "20",
                                       "--noise", "0.3", "--log", "tensorboard", "--out", str(out))]) == 0
    assert f"TensorBoard runs in {out}/tensorboard/" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["00_sgd_seed0", "01_sam_rho_0.1_seed0", "figures"]
    for run, slug in zip(results["runs"], ["00_sgd_seed0", "01_sam_rho_0.1_seed0"]):
        events = EventAccumulator(str(out / "tensorboard" / slug))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        numbers = {k for k, v in run["history"][0].items() if k != "epoch" and isinstance(v, (int, float))}
        assert numbers <= tags and {"test_acc", "train_loss", "lr", "memorised", "passes_per_step"} <= tags
        for key in numbers:
            logged = events.Scalars(key)
            assert [e.step for e in logged] == [1, 2]
            want = [row[key] for row in run["history"]]
            assert [e.value for e in logged] == pytest.approx(want, rel=1e-6), key  # float32 in the file
        for key in ("lambda_max", "trace"):
            (final,) = events.Scalars(f"final/{key}")
            assert final.step == 2 and final.value == pytest.approx(run["extras"][key], rel=1e-6)
    figures = EventAccumulator(str(out / "tensorboard" / "figures"), size_guidance={"images": 0})
    figures.Reload()
    assert sorted(figures.Tags()["images"]) == ["curves", "final_accuracy", "landscape"]
    (image,) = figures.Images("landscape")
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 300


def test_log_tensorboard_without_tensorboard_names_the_extra(tmp_path: Path, data_dir: str,
                                                             capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # as if the package were not installed: importing it fails as torch's module fails then
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "o"
    assert main(["compare", *tiny_args(data_dir, "--methods", "sgd", "--log", "tensorboard", "--out", str(out))]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("flatminima: error: --log tensorboard needs the 'tensorboard' extra, and tensorboard is "
                            "not installed: pip install 'flatminima[tensorboard]'\n")
    assert not out.exists()  # refused before anything ran or was written


def test_callback_gets_a_dict_per_step_per_epoch_and_at_the_end(tmp_path: Path, data_dir: str) -> None:
    cfg = build_config({"num_samples": 200, "epochs": 2, "batch_size": 40, "width": 8, "threads": 1,
                        "data_dir": data_dir, "seeds": [0], "methods": ["sgd", "sam"], "schedule": "constant"})
    events: list[dict[str, Any]] = []
    res = compare(cfg, out=tmp_path / "o", plots=False, callback=events.append)
    for run, slug in zip(res.runs, ["00_sgd_seed0", "01_sam_seed0"]):
        mine = [e for e in events if e["run"] == slug]
        assert {e["label"] for e in mine} == {run.label} and {e["seed"] for e in mine} == {0}
        steps = [e for e in mine if e["event"] == "step"]
        per_epoch = run.info["steps_per_epoch"]
        assert [e["step"] for e in steps] == list(range(1, 2 * per_epoch + 1))
        assert [(e["epoch"], e["batch"]) for e in steps] == [(ep, b) for ep in (1, 2) for b in range(1, per_epoch + 1)]
        assert {e["passes"] for e in steps} == {1.0 if run.label == "sgd" else 2.0}
        assert {e["lr"] for e in steps} == {0.1}
        # the epoch's train loss and accuracy are the batches' (equal batches: 160 examples / 40)
        for ep, row in enumerate(run.history, 1):
            batch = [e for e in steps if e["epoch"] == ep]
            assert sum(e["loss"] for e in batch) / len(batch) == pytest.approx(row["train_loss"], rel=1e-12)
            assert sum(e["acc"] for e in batch) / len(batch) == pytest.approx(row["train_acc"], rel=1e-12)
        epochs = [e for e in mine if e["event"] == "epoch"]
        assert [{k: v for k, v in e.items() if k not in ("event", "label", "method", "seed", "run")} for e in epochs] \
            == run.history
        assert [e["event"] for e in mine][-1] == "end" and mine[-1]["epochs"] == 2 and mine[-1]["extras"] == {}
    # train_run takes the same callback (no "run" key: it is not in a comparison)
    seen: list[dict[str, Any]] = []
    run = train_run(cfg.replace(epochs=1), "sam", 0, callback=seen.append)
    assert [e["event"] for e in seen] == ["step"] * run.info["steps_per_epoch"] + ["epoch", "end"]
    assert "run" not in seen[0] and seen[-2]["test_acc"] == run.history[0]["test_acc"]
