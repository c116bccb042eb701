"""Defaults that must not trap a first run (issue #16 item 4): clean labels
unless noise is asked for, and each base optimizer its own learning rate,
stated in the run's header."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mnist1d")

from flatminima.experiments import ConfigError, ExperimentConfig, build_config, compare, train_run  # noqa: E402
from flatminima.experiments.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("fm_defaults_data"))


def tiny(data_dir: str, **kw: object) -> ExperimentConfig:
    settings = dict(num_samples=200, epochs=1, batch_size=40, width=8, depth=1, threads=1, data_dir=data_dir,
                    seeds=[0], schedule="constant")
    settings.update(kw)
    return build_config(settings)


def test_noise_is_zero_unless_asked_for(data_dir: str) -> None:
    assert ExperimentConfig().noise == 0.0 and build_config({}).noise == 0.0
    for dataset in ("mnist1d", "digits"):
        run = train_run(tiny(data_dir, dataset=dataset, model="mlp"), "sgd", 0)
        assert run.info["corrupted"] == 0 and run.final["memorised"] is None, dataset
    run = train_run(tiny(data_dir, noise=0.3), "sgd", 0)
    assert run.info["corrupted"] == round(0.3 * run.info["train_examples"])


def test_compare_gives_each_plain_optimizer_its_own_default_lr(tmp_path: Path, data_dir: str) -> None:
    res = compare(tiny(data_dir, methods=["sgd", "adamw", "rmsprop", "sam"]), out=tmp_path / "o", plots=False)
    # constant schedule: the lr of every epoch is the optimizer's peak lr
    got = {r.label: r.history[0]["lr"] for r in res.runs}
    assert got == {"sgd": 0.1, "adamw": 0.001, "rmsprop": 0.01, "sam": 0.1}
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert {m["label"]: m["optimizer_args"]["lr"] for m in saved["methods"]} == got
    assert saved["config"]["lr"] is None
    # --lr sets one rate for all; an inline lr still wins for its method
    res = compare(tiny(data_dir, methods=["sgd", "adamw", "adam:lr=0.02"], lr=0.05), plots=False)
    assert {r.label: r.history[0]["lr"] for r in res.runs} == {"sgd": 0.05, "adamw": 0.05, "adam:lr=0.02": 0.02}


def test_the_header_states_each_optimizers_lr_and_the_labels(tmp_path: Path, data_dir: str,
                                                              capsys: pytest.CaptureFixture) -> None:
    args = ["--num-samples", "200", "--epochs", "1", "--batch-size", "40", "--width", "8", "--threads", "1",
            "--progress", "none", "--data-dir", data_dir, "--seeds", "1", "--no-plots"]
    assert main(["compare", *args, "--methods", "sgd", "adamw", "--out", str(tmp_path / "a")]) == 0
    header = capsys.readouterr().out.splitlines()[:2]
    assert header[0].endswith("; clean labels")
    assert ("sgd(lr=0.1, weight_decay=0.0005, momentum=0.9), adamw(lr=0.001, weight_decay=0.0005); "
            "lr: each optimizer's default;") in header[1]
    assert main(["compare", *args, "--methods", "sgd", "adamw", "--lr", "0.03", "--noise", "0.3",
                 "--out", str(tmp_path / "b")]) == 0
    header = capsys.readouterr().out.splitlines()[:2]
    assert header[0].endswith("; 30% symmetric label noise on the training labels")
    assert "sgd(lr=0.03, weight_decay=0.0005, momentum=0.9), adamw(lr=0.03, weight_decay=0.0005); lr: --lr;" in header[1]


def test_min_lr_is_checked_against_each_optimizers_default_lr(data_dir: str) -> None:
    with pytest.raises(ConfigError, match=r"--min-lr \(0\.01\) must not exceed the learning rate of 'adamw' \(0\.001\)"):
        compare(tiny(data_dir, methods=["sgd", "adamw"], min_lr=0.01), plots=False)
    with pytest.raises(ConfigError, match=r"--lr must be a finite number > 0, got 0\.0"):
        build_config({"lr": 0.0})
