"""The ``sharpness`` and ``landscape`` subcommands and the checkpoint contract."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from sharpness_helpers import net
from torch import nn

import flatminima.sharpness as S
from flatminima.sharpness import cli


def model_factory(ckpt: Mapping[str, Any]) -> nn.Module:
    cfg = ckpt["model_config"]
    return net(seed=cfg["seed"], batchnorm=cfg["batchnorm"])


def data_factory(ckpt: Mapping[str, Any], *, split: str, n_samples: int, batch_size: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1000))
    x = torch.randn(n_samples, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n_samples,), generator=g)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n_samples, batch_size)]


def _save(path: Path, seed: int, batchnorm: bool = False, **extra: Any) -> nn.Module:
    model = net(seed=seed + 100, batchnorm=batchnorm)  # weights differ from a fresh factory model
    torch.save({"model_state": model.state_dict(), "model_config": {"seed": seed, "batchnorm": batchnorm}, **extra}, path)
    return model


def _main(*argv: str) -> int:
    return cli.main(list(argv), model_factory=model_factory, data_factory=data_factory)


def test_sharpness_command_prints_what_report_returns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _save(tmp_path / "a.pt", 1)
    out = tmp_path / "r.json"
    rc = _main("sharpness", str(tmp_path / "a.pt"), "--samples", "40", "--batch-size", "16", "--max-iter", "30",
               "--max-samples", "20", "--json", str(out), "--no-progress")
    assert rc == 0
    text = capsys.readouterr().out
    assert "lambda_max" in text and "trace" in text and "one_step_gap" in text
    got = json.loads(out.read_text())
    batches = data_factory({}, split="train", n_samples=40, batch_size=16, seed=0)
    row = S.report(model, batches, measures=["lambda_max", "trace", "gap"], max_iter=30, max_samples=20)
    for key in ("loss", "lambda_max", "trace", "trace_stderr", "one_step_gap"):
        assert got[key] == row[key], key
    assert got["samples"] == 40 and got["split"] == "train"


def test_sharpness_command_other_measures(tmp_path: Path) -> None:
    _save(tmp_path / "a.pt", 1, batchnorm=True)
    out = tmp_path / "r.json"
    rc = _main("sharpness", str(tmp_path / "a.pt"), "--samples", "24", "--split", "test", "--measures",
               "worst_case,average_case,m_sharpness", "--m", "8", "--p", "inf", "--steps", "2",
               "--noise-samples", "2", "--no-adaptive", "--json", str(out))
    assert rc == 0
    got = json.loads(out.read_text())
    assert {"worst_case_sharpness", "average_case_sharpness", "m_sharpness"} <= set(got)
    assert "lambda_max" not in got


def test_landscape_commands_write_pictures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    a, b = _save(tmp_path / "sgd.pt", 1, batchnorm=True), _save(tmp_path / "sam.pt", 2, batchnorm=True)
    common = ["--samples", "32", "--points", "5", "--no-progress"]
    out = tmp_path / "interp.png"
    assert _main("landscape", str(tmp_path / "sgd.pt"), str(tmp_path / "sam.pt"), "--out", str(out),
                 "--json", str(tmp_path / "i.json"), *common) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    curve = json.loads((tmp_path / "i.json").read_text())
    batches = data_factory({}, split="train", n_samples=32, batch_size=256, seed=0)
    assert curve["alphas"] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert curve["losses"][1] == S.evaluate_loss(a, batches) and curve["losses"][3] == S.evaluate_loss(b, batches)
    assert _main("landscape", str(tmp_path / "sgd.pt"), "--out", str(tmp_path / "s1.png"), *common) == 0
    assert _main("landscape", str(tmp_path / "sgd.pt"), "--2d", "--log", "--range", "-0.5", "0.5",
                 "--out", str(tmp_path / "s2.png"), *common) == 0
    assert (tmp_path / "s1.png").stat().st_size > 2000 and (tmp_path / "s2.png").stat().st_size > 2000
    assert "wrote" in capsys.readouterr().out


def test_sharpness_density_writes_the_picture_and_the_quadrature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    model = _save(tmp_path / "a.pt", 1)
    out, png = tmp_path / "r.json", tmp_path / "esd.png"
    rc = _main("sharpness", str(tmp_path / "a.pt"), "--samples", "40", "--batch-size", "16", "--measures",
               "lambda_max,trace", "--method", "power", "--trace-method", "hutchinson", "--max-samples", "12",
               "--density", str(png), "--density-iter", "20", "--density-runs", "2", "--json", str(out),
               "--no-progress")
    assert rc == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert f"wrote {png}" in capsys.readouterr().out
    got = json.loads(out.read_text())
    batches = data_factory({}, split="train", n_samples=40, batch_size=16, seed=0)
    sd = S.hessian_density(model, batches, iterations=20, runs=2)
    assert got["density"]["nodes"] == sd.nodes and got["density"]["weights"] == sd.weights
    assert got["density"]["n_products"] == 40 and got["density"]["png"] == str(png)
    row = S.report(model, batches, method="power", trace_method="hutchinson", max_samples=12)
    assert got["lambda_max"] == row["lambda_max"] and got["trace"] == row["trace"]
    monkeypatch.chdir(tmp_path)  # without a name: <checkpoint stem>_density.png in the current directory
    assert _main("sharpness", "a.pt", "--samples", "16", "--measures", "", "--density", "--density-iter", "5",
                 "--no-progress") == 0
    assert (tmp_path / "a_density.png").stat().st_size > 5000
    assert _main("sharpness", "a.pt", "--measures", "", "--density", "--sigma-squared", "0") == 2
    assert "Invalid sigma_squared value: 0.0" in capsys.readouterr().err


def test_add_subcommands_on_a_foreign_parser(tmp_path: Path) -> None:
    _save(tmp_path / "a.pt", 3)
    parser = argparse.ArgumentParser(prog="flatminima")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")  # the experiment tool's own commands live beside ours
    parsers = cli.add_subcommands(sub, model_factory=model_factory, data_factory=data_factory)
    assert set(parsers) == {"sharpness", "landscape"}
    args = parser.parse_args(["sharpness", str(tmp_path / "a.pt"), "--measures", "gap", "--samples", "8"])
    assert args.func is cli.sharpness_main and args.model_factory is model_factory
    assert args.func(args) == 0


def test_checkpoint_data_fallback_and_loss_factory(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    _save(tmp_path / "a.pt", 1, data={"x": torch.randn(20, 5, generator=g, dtype=torch.float64),
                                      "y": torch.randint(0, 3, (20,), generator=g)})
    calls = []

    def loss_factory(ckpt: Mapping[str, Any]) -> Any:
        calls.append(sorted(ckpt))
        return nn.functional.cross_entropy

    out = tmp_path / "r.json"
    rc = cli.main(["sharpness", str(tmp_path / "a.pt"), "--measures", "gap", "--samples", "12", "--json", str(out)],
                  model_factory=model_factory, loss_factory=loss_factory)
    assert rc == 0 and calls and json.loads(out.read_text())["samples"] == 12


def test_bad_checkpoints_and_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"weights": {}}, tmp_path / "bad.pt")
    assert _main("sharpness", str(tmp_path / "bad.pt")) == 2
    assert "has no 'model_state'" in capsys.readouterr().err
    assert _main("sharpness", str(tmp_path / "missing.pt")) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    _save(tmp_path / "a.pt", 1)
    assert cli.main(["sharpness", str(tmp_path / "a.pt")], data_factory=data_factory) == 2
    assert "no model_factory" in capsys.readouterr().err
    assert cli.main(["sharpness", str(tmp_path / "a.pt")], model_factory=model_factory) == 2
    assert "no data_factory" in capsys.readouterr().err
    assert _main("sharpness", str(tmp_path / "a.pt"), "--rho", "-1", "--measures", "gap", "--samples", "8") == 2
    assert "Invalid rho value: -1.0" in capsys.readouterr().err
    assert _main("sharpness", str(tmp_path / "a.pt"), "--measures", "lambda_max,flat", "--samples", "8") == 2
    assert "'flat'" in capsys.readouterr().err
    assert _main("landscape", str(tmp_path / "a.pt"), str(tmp_path / "a.pt"), "--2d", "--samples", "8") == 2
    assert "--2d" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _main("sharpness", str(tmp_path / "a.pt"), "--samples", "0")


def test_state_dict_under_model_key_is_accepted(tmp_path: Path) -> None:
    model = net(seed=9)
    torch.save({"format": 1, "model": model.state_dict(), "model_config": {"seed": 1, "batchnorm": False}},
               tmp_path / "run.pt")
    loaded, ckpt = cli.load_checkpoint(tmp_path / "run.pt", model_factory)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert ckpt["format"] == 1
