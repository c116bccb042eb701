"""The ``flatminima`` command on tiny settings (a second or two per call):
the files it writes and what they hold, the printed table, resume after an
interruption (bit-exact), TOML configs, clear errors for bad arguments."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import flatminima

pytest.importorskip("mnist1d")

from flatminima.experiments import ExperimentConfig, RunResult, summarize  # noqa: E402
from flatminima.experiments import progress as progress_mod  # noqa: E402
from flatminima.experiments.cli import main  # noqa: E402

TIMING = {"epoch_seconds", "steps_per_sec", "train_seconds"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("fm_cli_data"))


def tiny(data_dir: str, *extra: str) -> list[str]:
    return ["--num-samples", "300", "--epochs", "2", "--batch-size", "32", "--width", "16", "--threads", "1",
            "--progress", "plain", "--data-dir", data_dir, *extra]


def numbers(results: dict) -> list[list[dict]]:
    return [[{k: v for k, v in row.items() if k not in TIMING} for row in run["history"]] for run in results["runs"]]


def test_compare_writes_results_table_and_plots(tmp_path: Path, data_dir: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    rc = main(["compare", *tiny(data_dir), "--methods", "sgd", "sam:rho=0.2", "--seeds", "2", "--noise", "0.3",
               "--out", str(out)])
    assert rc == 0
    stdout, stderr = capsys.readouterr()
    assert "mnist1d: 240 train / 60 test" in stdout and "20% symmetric" not in stdout and "30% symmetric" in stdout
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert "test acc" in lines[header] and "train acc (clean)" in lines[header] and "gap" in lines[header]
    assert "steps/s" in lines[header] and "cost" in lines[header]
    rows = {line.split()[0]: line for line in lines[header + 2 : header + 4]}
    assert set(rows) == {"sgd", "sam:rho=0.2"} and "1.00x" in rows["sgd"] and "±" in rows["sam:rho=0.2"]
    assert "[4/4] sam:rho=0.2 seed 1: test acc" in stderr  # plain progress lines

    results = json.loads((out / "results.json").read_text())
    assert results["completed"] and results["baseline"] == "sgd"
    assert [(r["label"], r["seed"]) for r in results["runs"]] == [("sgd", 0), ("sgd", 1), ("sam:rho=0.2", 0), ("sam:rho=0.2", 1)]
    for run in results["runs"]:
        assert [row["epoch"] for row in run["history"]] == [1, 2] and run["completed"]
        assert run["final"]["test_acc"] == run["history"][-1]["test_acc"]
    methods = {m["label"]: m for m in results["methods"]}
    assert methods["sam:rho=0.2"]["hparams"]["rho"] == 0.2 and methods["sgd"]["optimizer_args"]["momentum"] == 0.9

    # The printed numbers are the summary of the runs, reproducible from Python.
    runs = [RunResult.from_dict(r) for r in results["runs"]]
    summary = summarize(runs, ["sgd", "sam:rho=0.2"], baseline="sgd")
    assert summary == results["summary"]
    sam = summary[1]
    assert f"{sam['test_acc']:.1f} ± {sam['test_acc_std']:.1f}" in rows["sam:rho=0.2"]
    assert f"{sam['test_loss']:.3f} ± {sam['test_loss_std']:.3f}" in rows["sam:rho=0.2"]
    assert (out / "summary.md").read_text().startswith("| method | test acc |")

    with open(out / "epochs.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 * 2 and {"method", "seed", "epoch", "test_acc", "train_clean_acc", "gap"} <= set(table[0])
    assert float(table[-1]["test_acc"]) == results["runs"][-1]["history"][-1]["test_acc"]  # exact round trip
    with open(out / "summary.csv") as f:
        srows = list(csv.DictReader(f))
    assert [r["method"] for r in srows] == ["sgd", "sam:rho=0.2"] and float(srows[1]["cost"]) == pytest.approx(sam["cost"])

    for png in ("curves.png", "final_accuracy.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    saved = json.loads((out / "config.json").read_text())
    cfg = ExperimentConfig(**saved["config"])
    assert cfg.methods == ["sgd", "sam:rho=0.2"] and cfg.seeds == [0, 1] and cfg.epochs == 2
    assert saved["command"][:2] == ["flatminima", "compare"]
    assert not list((out / "checkpoints").glob("*.pt"))  # removed once a run is finished
    assert len(list((out / "runs").glob("*.json"))) == 4


def test_train_prints_epochs_and_the_final_row(tmp_path: Path, data_dir: str, capsys: pytest.CaptureFixture) -> None:
    rc = main(["train", *tiny(data_dir), "--method", "asam", "--seed", "3", "--noise", "0", "--out", str(tmp_path / "t"),
               "--no-plots", "--keep-checkpoints"])
    assert rc == 0
    stdout, stderr = capsys.readouterr()
    assert "epoch   1/2" in stderr and "epoch   2/2" in stderr
    assert "clean labels" in stdout and "memorised" not in stdout.split("method")[1]
    results = json.loads((tmp_path / "t" / "results.json").read_text())
    assert [(r["label"], r["seed"]) for r in results["runs"]] == [("asam", 3)]
    assert results["methods"][0]["hparams"]["rho"] == flatminima.get_method("asam").defaults()["rho"]
    assert not (tmp_path / "t" / "curves.png").exists()
    ckpt = tmp_path / "t" / "checkpoints" / "00_asam_seed3.pt"
    assert ckpt.is_file()


def test_sharpness_columns_and_subcommand(tmp_path: Path, data_dir: str, capsys: pytest.CaptureFixture) -> None:
    """``--sharpness N`` adds λ_max and trace columns; ``flatminima sharpness``
    (from flatminima.sharpness, when present) reads this tool's checkpoints."""
    pytest.importorskip("flatminima.sharpness.cli")
    out = tmp_path / "s"
    assert main(["train", *tiny(data_dir), "--epochs", "1", "--method", "sam", "--out", str(out), "--no-plots",
                 "--keep-checkpoints", "--sharpness", "64"]) == 0
    stdout = capsys.readouterr().out
    assert "λ_max" in stdout and "Hessian trace" in stdout
    final = json.loads((out / "results.json").read_text())["runs"][0]["final"]
    assert final["lambda_max"] > 0 and math.isfinite(final["trace"])
    ckpt = out / "checkpoints" / "00_sam_seed0.pt"
    assert main(["sharpness", str(ckpt), "--samples", "64", "--measures", "lambda_max",
                 "--json", str(out / "sharp.json")]) == 0
    measured = json.loads((out / "sharp.json").read_text())
    assert measured["lambda_max"] == pytest.approx(final["lambda_max"], rel=1e-3)  # same subset, same objective


def test_compare_sharpness_writes_landscape_of_solutions(tmp_path: Path, data_dir: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    """With ``--sharpness N`` the compare report also draws the loss along the
    line from the baseline's solution to each method's (landscape.png); its
    end points are the two trained models' losses."""
    pytest.importorskip("flatminima.sharpness")
    from flatminima.experiments.measure import SolutionLandscape

    out = tmp_path / "l"
    args = ["compare", *tiny(data_dir), "--epochs", "1", "--methods", "sgd", "sam:rho=0.2", "asam:rho=1.0",
            "--seeds", "1", "--out", str(out), "--sharpness", "64"]
    assert main(args) == 0
    assert "landscape.png" in capsys.readouterr().out
    png = (out / "landscape.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    # without the flag there is no figure
    assert main(["compare", *tiny(data_dir), "--epochs", "1", "--methods", "sgd", "sam", "--seeds", "1",
                 "--out", str(tmp_path / "n")]) == 0
    assert not (tmp_path / "n" / "landscape.png").exists()
    # fewer than two kept solutions: nothing to draw
    assert SolutionLandscape(8).write(["sgd"], "sgd", tmp_path / "x.png") is None
    with pytest.raises(Exception, match="positive number of examples"):
        SolutionLandscape(0)


def test_list_shows_every_registered_method(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for name in flatminima.list_methods():
        assert f"  {name} " in text
    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listing["methods"]] == flatminima.list_methods()
    sam = next(m for m in listing["methods"] if m["name"] == "sam")
    assert sam["defaults"]["rho"] == flatminima.get_method("sam").defaults()["rho"]
    assert "sgd" in listing["plain_optimizers"] and "cifar10" in listing["datasets"]


def _stop_at(monkeypatch: pytest.MonkeyPatch, run_index: int, epoch: int) -> None:
    """Raise KeyboardInterrupt (as Ctrl-C would) once run ``run_index`` has finished ``epoch``."""
    original = progress_mod.PlainReporter.epoch_end

    def epoch_end(self, row):  # type: ignore[no-untyped-def]
        original(self, row)
        if self.index == run_index and row["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(progress_mod.PlainReporter, "epoch_end", epoch_end)


def test_resume_after_interruption_is_bit_exact(tmp_path: Path, data_dir: str, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    args = tiny(data_dir, "--epochs", "3", "--methods", "sgd", "wsam:rho=0.2", "--seeds", "2", "--augment",
                "--warmup-epochs", "1", "--no-plots")
    assert main(["compare", *args, "--out", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())

    # 1) --stop-after: every run stops after epoch 1, checkpointed
    out = tmp_path / "stopped"
    assert main(["compare", *args, "--out", str(out), "--stop-after", "1"]) == 0
    assert "Continue with: flatminima compare --out" in capsys.readouterr().out
    assert len(list((out / "checkpoints").glob("*.pt"))) == 4 and not list((out / "runs").glob("*.json"))
    # 2) interrupted (Ctrl-C) in the 3rd run after its epoch 2
    _stop_at(monkeypatch, 3, 2)
    assert main(["compare", "--out", str(out), "--resume", "--progress", "plain"]) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert len(list((out / "runs").glob("*.json"))) == 2  # sgd's two runs finished
    # 3) resumed to the end: the same numbers as the uninterrupted comparison
    assert main(["compare", "--out", str(out), "--resume", "--progress", "plain"]) == 0
    stderr = capsys.readouterr().err
    assert "[finished earlier]" in stderr and "resuming after epoch 2" in stderr
    resumed = json.loads((out / "results.json").read_text())
    assert numbers(resumed) == numbers(full)
    assert [r["test_acc"] for r in resumed["summary"]] == [r["test_acc"] for r in full["summary"]]


def test_toml_config_and_flag_precedence(tmp_path: Path, data_dir: str) -> None:
    toml = tmp_path / "exp.toml"
    toml.write_text(f"""
dataset = "mnist1d"
data-dir = "{data_dir}"
num_samples = 300
methods = ["sgd", "asam"]
seeds = 1
epochs = 1
batch_size = 64
width = 16
noise = 0.2
noise_type = "asymmetric"
label_smoothing = 0.1

[hparams.asam]
rho = 1.5

[optimizer_args]
dampening = 0.0
""")
    out = tmp_path / "o"
    assert main(["compare", "--config", str(toml), "--epochs", "2", "--threads", "1", "--progress", "none",
                 "--no-plots", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["epochs"] == 2 and cfg["batch_size"] == 64 and cfg["noise_type"] == "asymmetric"  # flag beats file
    assert cfg["hparams"] == {"asam": {"rho": 1.5}} and cfg["optimizer_args"] == {"dampening": 0.0}
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert methods[1]["hparams"]["rho"] == 1.5 and methods[0]["optimizer_args"]["dampening"] == 0.0


@pytest.mark.parametrize(("argv", "words"), [
    (["compare", "--methods", "sgd", "samm"], ["unknown method 'samm'", "asam", "sgd"]),
    (["compare", "--noise", "1.5"], ["--noise", "[0, 1)", "1.5"]),
    (["compare", "--noise", "0.6", "--noise-type", "pairflip"], ["0.5"]),
    (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], ["/nonexistent/cifar", "does not exist", "data_batch_1"]),
    (["train", "--dataset", "cifar100", "--data-dir", "/nonexistent/c100"], ["/nonexistent/c100", "train, test, meta"]),
    (["compare", "-H", "sam.rhoo=0.1"], ["rhoo", "rho"]),
    (["compare", "-H", "gamma=0.5", "--methods", "sgd", "sam"], ["gamma"]),
    (["compare", "--methods", "sam:rhoo=1"], ["unknown option 'rhoo'"]),
    (["compare", "--methods", "sam", "sam"], ["appears twice"]),
    (["compare", "--optimizer", "adamm"], ["unknown optimizer 'adamm'", "adamw"]),
    (["compare", "--seeds", "0"], ["--seeds", ">= 1"]),
    (["compare", "--resume"], ["config.json does not exist", "nothing to resume"]),
    (["compare", "--model", "wrn"], ["wrn", "images", "mnist1d"]),
    (["compare", "--dataset", "digits", "--model", "resnet1d"], ["resnet1d", "1-D", "digits"]),
    (["compare", "--device", "tpu"], ["--device"]),
    (["train", "--lr", "-1"], ["--lr"]),
])
def test_bad_arguments_give_clear_errors(argv: list[str], words: list[str], capsys: pytest.CaptureFixture,
                                         tmp_path: Path, data_dir: str) -> None:
    extra = [] if "--data-dir" in argv else ["--data-dir", data_dir]
    rc = main([*argv, *extra, "--out", str(tmp_path / "x"), "--progress", "none", "--threads", "1", "--epochs", "1",
               "--num-samples", "100"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("flatminima: error: ") and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_config_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('epochs = 3\nmethods = ["sgd", "sam"\nnoise = 0.1\n')
    assert main(["compare", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid TOML" in err and "line" in err
    typo = tmp_path / "typo.toml"
    typo.write_text("epoch = 3\n")
    assert main(["compare", "--config", str(typo)]) == 2
    assert "unknown setting 'epoch'" in (e := capsys.readouterr().err) and "did you mean 'epochs'" in e
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('epochs = "ten"\n')
    assert main(["compare", "--config", str(wrong)]) == 2
    assert "--epochs must be an integer, got 'ten'" in capsys.readouterr().err
    assert main(["compare", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compare", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_existing_results_are_not_overwritten(tmp_path: Path, data_dir: str, capsys: pytest.CaptureFixture) -> None:
    args = tiny(data_dir, "--epochs", "1", "--methods", "sgd", "--seeds", "1", "--no-plots", "--out", str(tmp_path / "o"))
    assert main(["compare", *args]) == 0
    assert main(["compare", *args]) == 2
    assert "already holds results; use --resume" in capsys.readouterr().err
    assert main(["compare", *args, "--resume", "--lr", "0.05"]) == 2
    assert "lr: None -> 0.05" in capsys.readouterr().err
    # adding a seed to a finished comparison is allowed
    assert main(["compare", *args[:-2], "--out", str(tmp_path / "o"), "--resume", "--seeds", "2"]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["seed"] for r in results["runs"]] == [0, 1]


def test_a_method_that_cannot_run_does_not_stop_the_others(tmp_path: Path, data_dir: str,
                                                           capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from flatminima.experiments import train as train_mod

    # ESAM at gamma < 1 needs the per-sample closure; hand it PyTorch's form instead.
    monkeypatch.setattr(train_mod, "closure_form", lambda method: "loss")
    rc = main(["compare", *tiny(data_dir), "--epochs", "1", "--methods", "sgd", "esam", "--seeds", "1", "--no-plots",
               "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "method 'esam' failed at its first step" in err and "per-sample" in err
    assert "sgd" in out and "\nesam" not in out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(results["failures"]) == ["esam"] and [r["label"] for r in results["runs"]] == ["sgd"]
    assert main(["train", *tiny(data_dir), "--epochs", "1", "--method", "esam", "--out", str(tmp_path / "t")]) == 2
    assert "failed at its first step" in capsys.readouterr().err


def test_module_entry_point(tmp_path: Path) -> None:
    """``python -m flatminima.experiments`` (what torchrun runs), ``python -m flatminima`` and the console script."""
    env = {**os.environ, "PYTHONPATH": str(Path(flatminima.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "flatminima.experiments", "compare", "--methods", "nope"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "unknown method 'nope'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "flatminima", "--version"], capture_output=True, text=True, env=env,
                          timeout=120)  # python -m flatminima: the same command
    assert proc.returncode == 0 and flatminima.__version__ in proc.stdout, (proc.stdout, proc.stderr)
    script = shutil.which("flatminima", path=str(Path(sys.executable).parent))
    if script:  # the console script of pyproject's [project.scripts]
        assert "flatminima.experiments.cli" in Path(script).read_text()


@pytest.mark.skipif(not hasattr(os, "fork") or os.environ.get("FLATMINIMA_SKIP_DDP") == "1", reason="needs torchrun")
def test_torchrun_two_processes_match_one(tmp_path: Path, data_dir: str) -> None:
    """DDP on CPU (gloo): with the global batch split over 2 processes, the
    gradients are those of one process (up to rounding): same results."""
    args = ["train", "--method", "sam", "--num-samples", "300", "--epochs", "2", "--batch-size", "32", "--width", "16",
            "--threads", "1", "--progress", "none", "--no-plots", "--data-dir", data_dir]
    env = {**os.environ, "PYTHONPATH": str(Path(flatminima.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flatminima.experiments", *args, "--out", str(tmp_path / "ddp")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert "(2 processes)" in stdout
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert ddp["environment"]["world_size"] == 2 and ddp["runs"][0]["info"]["world_size"] == 2
    for a, b in zip(ddp["runs"][0]["history"], one["runs"][0]["history"]):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-4)
        assert math.isclose(a["test_loss"], b["test_loss"], rel_tol=1e-4)
