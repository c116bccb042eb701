"""The shipped CIFAR recipe (configs/cifar10-wrn16-8-sam.toml, issue #16
item 2) runs as shipped, model and all, for one step on a tiny fake CIFAR
folder (the python layout, read through the restricted unpickler; that the
binary layout loads the same data is test_faults.py's); the command the docs
give is the file's own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fake_cifar import cifar_both_layouts

pytest.importorskip("numpy")

from flatminima.experiments.cli import main  # noqa: E402
from flatminima.experiments.config import load_toml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "cifar10-wrn16-8-sam.toml"
COMMAND = "flatminima compare --config configs/cifar10-wrn16-8-sam.toml --data-dir ~/data --device cuda"
WRN_16_8_PARAMETERS = 10_961_370  # Zagoruyko & Komodakis's WRN-16-8 on 10 classes: 11.0M


def test_the_recipe_is_the_papers_settings() -> None:
    recipe = load_toml(RECIPE)
    assert {k: recipe[k] for k in ("dataset", "model", "depth", "width", "augment", "noise", "optimizer", "lr",
                                   "momentum", "weight_decay", "label_smoothing", "schedule", "epochs")} == {
        "dataset": "cifar10", "model": "wrn", "depth": 16, "width": 8, "augment": True, "noise": 0.0,
        "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "label_smoothing": 0.1,
        "schedule": "cosine", "epochs": 200}
    assert recipe["methods"] == ["sgd", "sam:rho=0.05"]
    for doc in (RECIPE, ROOT / "README.md", ROOT / "RESULTS.md"):
        assert COMMAND in doc.read_text(), doc


def test_the_recipe_trains_one_step_on_a_fake_cifar_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    py_dir, _ = cifar_both_layouts(tmp_path, "cifar10", per_file=2)
    out = tmp_path / "out"
    rc = main(["compare", "--config", str(RECIPE), "--data-dir", str(py_dir),
               "--device", "cpu", "--threads", "1", "--epochs", "1", "--train-size", "4", "--test-size", "2",
               "--progress", "none", "--no-plots", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert stdout.startswith("cifar10: 4 train / 2 test examples")
    assert ("model wrn (width 8, depth 16); sgd(lr=0.1, weight_decay=0.0005, momentum=0.9); lr: --lr; cosine LR; "
            "1 epoch, batch 128; augmentation, label smoothing 0.1; seeds 0") in stdout
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    assert results["completed"] and results["config"]["label_smoothing"] == 0.1 and results["config"]["augment"]
    methods = {m["label"]: m for m in results["methods"]}
    assert methods["sam:rho=0.05"]["hparams"]["rho"] == 0.05
    assert methods["sgd"]["optimizer_args"] == {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9}
    for run in results["runs"]:
        assert run["info"]["parameters"] == WRN_16_8_PARAMETERS and run["info"]["steps_per_epoch"] == 1
        assert run["history"][0]["steps"] == 1
        assert run["history"][0]["passes_per_step"] == (2.0 if run["label"].startswith("sam") else 1.0)
