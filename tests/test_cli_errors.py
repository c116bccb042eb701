"""The ``flatminima`` command on input it cannot serve (issue #14, items 10
and 12): one line ``flatminima: error: ...`` saying what to do, no traceback,
exit status 2 for bad input and 1 for a run that could not finish; ``compare``
goes on past a method that cannot run; Muon + AdamW as a plain optimizer and
as the base of a sharpness-aware method.

Runs are tiny (MNIST-1D, 300 examples, width 16) and call ``main()`` in
process; file system faults are injected (CI runs as root: chmod would not
stop it)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import flatminima

np = pytest.importorskip("numpy")
pytest.importorskip("mnist1d")

from flatminima.experiments import checkpoint as checkpoint_mod  # noqa: E402
from flatminima.experiments.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("fm_cli_errors_data"))


def tiny(data_dir: str, *extra: str) -> list[str]:
    return ["--num-samples", "300", "--epochs", "1", "--batch-size", "32", "--width", "16", "--threads", "1",
            "--progress", "none", "--no-plots", "--data-dir", data_dir, *extra]


def one_line_error(capsys: pytest.CaptureFixture, *words: str) -> str:
    """The error printed: a single ``flatminima: error:`` line holding ``words``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("flatminima: error: "), err
    for w in words:
        assert w in lines[0], (w, err)
    return lines[0]


# --------------------------------------------------------------------------- --out
def test_out_that_is_a_file(tmp_path: Path, data_dir: str, capsys: pytest.CaptureFixture) -> None:
    afile = tmp_path / "results"
    afile.write_text("not a folder")
    assert main(["compare", *tiny(data_dir, "--methods", "sgd", "--seeds", "1", "--out", str(afile))]) == 2
    one_line_error(capsys, str(afile), "--out must be a folder")
    assert afile.read_text() == "not a folder"


@pytest.mark.parametrize(("code", "words"), [
    (errno.EROFS, ["the file system is read-only", "give --out a folder on a writable disk"]),
    (errno.EACCES, ["permission denied", "give --out a folder you may write to"]),
])
def test_out_in_a_folder_that_cannot_be_written(tmp_path: Path, data_dir: str, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch, code: int, words: list[str]) -> None:
    locked = tmp_path / "locked"
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if locked in self.parents:  # what the kernel says for a read-only or foreign folder
            raise OSError(code, os.strerror(code), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    out = locked / "run"
    assert main(["compare", *tiny(data_dir, "--methods", "sgd", "--seeds", "1", "--out", str(out))]) == 2
    one_line_error(capsys, str(out), *words)


def test_disk_full_while_writing_results(tmp_path: Path, data_dir: str, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from the file system (fsync reports it on a full disk): exit 1,
    one line; the finished run is kept, and --resume writes the results."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell which file is written")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if ".results.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint_mod.os, "fsync", fsync)
    out = tmp_path / "o"
    args = ["compare", *tiny(data_dir, "--methods", "sgd", "--seeds", "1", "--out", str(out))]
    assert main(args) == 1
    one_line_error(capsys, "no space left on the disk while writing", str(out / "results.json"), "--resume")
    assert not (out / "results.json").exists() and (out / "runs" / "00_sgd_seed0.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # the half-written file is gone
    monkeypatch.setattr(checkpoint_mod.os, "fsync", real_fsync)
    assert main(["compare", "--out", str(out), "--resume", "--progress", "none"]) == 0
    assert [r["label"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["sgd"]


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize(("argv", "words"), [
    (["compare", "--seeds", "100000000000"], ["--seeds 100000000000", "at most 10000 seeds", "a list of seeds"]),
    (["train", "--width", str(2**62)], ["cannot build the model mlp", f"width {2**62}", "give a smaller --width"]),
    (["train", "--opt-arg", "lr=nan"], ["--opt-arg lr='nan'", "SGD's lr must be a finite number"]),
    (["train", "--opt-arg", "lr=1e999"], ["--opt-arg lr=inf", "finite number"]),
    (["train", "--optimizer", "adam", "--opt-arg", "betas=(0.9,'x')"], ["betas=(0.9, 'x')", "2 finite numbers"]),
    (["train", "--method", "sam:lr=nan"], ["method 'sam:lr=nan'", "lr='nan'", "finite number"]),
])
def test_bad_settings(argv: list[str], words: list[str], tmp_path: Path, data_dir: str,
                      capsys: pytest.CaptureFixture) -> None:
    assert main([argv[0], *tiny(data_dir, "--out", str(tmp_path / "o")), *argv[1:]]) == 2
    one_line_error(capsys, *words)


# --------------------------------------------------------------------------- CIFAR
def write_cifar10(folder: Path, n: int, labels: list[Any] | None = None) -> None:
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((n, 3072), np.uint8), b"labels": labels if labels is not None else [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))


@pytest.mark.parametrize(("n", "labels", "words"), [
    (0, None, ["data_batch_1 holds no images", "official archive"]),
    (2, ["cat", "dog"], ["'labels' must be a list of integer class indices", "found 'cat' (str)"]),
    (2, ["1", "2"], ["found '1' (str)"]),  # numpy would read these as 1 and 2
    (2, [b"1", b"2"], ["found b'1' (bytes)"]),
    (2, [1.5, 2.0], ["found 1.5 (float)"]),  # numpy would read this as 1
])
def test_cifar_folder_with_no_images_or_non_integer_labels(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           n: int, labels: list[Any] | None, words: list[str]) -> None:
    write_cifar10(tmp_path / "cifar", n, labels)
    argv = ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--model", "mlp", "--width", "4",
            "--epochs", "1", "--progress", "none", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    one_line_error(capsys, str(tmp_path / "cifar" / "data_batch_1"), *words)


# --------------------------------------------------------------------------- checkpoints
class _Runs:
    """Makes ``os.getcwd`` run when unpickled: what a crafted file would do."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.getcwd, ())


@pytest.mark.parametrize("command", ["sharpness", "landscape"])
def test_measuring_a_file_that_is_not_a_checkpoint(command: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert main([command, str(text)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("error: "), err
    assert f"'{text}' is not a checkpoint this command reads: it is not a file torch.save wrote" in err
    assert "weights_only=False" not in err  # torch's own text suggests it; that would run the file's code
    crafted = tmp_path / "crafted.pt"
    torch.save({"model_state": {}, "x": _Runs()}, crafted)
    assert main([command, str(crafted)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it holds objects other than tensors and plain data" in err and "getcwd" in err
    assert "weights_only=False" not in err


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory, data_dir: str) -> Path:
    """A SAM run stopped after epoch 1 of 2: its results folder, with the checkpoint."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert main(["train", *tiny(data_dir, "--epochs", "2", "--method", "sam", "--out", str(out), "--stop-after", "1")]) == 0
    return out


def _rng_of(state: dict[str, Any], value: Any) -> None:
    state["rng"]["torch"] = value


@pytest.mark.parametrize(("edit", "words"), [
    (lambda s: s["optimizer"]["flatminima"].pop("counters"), ["counters must be non-negative ints"]),
    (lambda s: _rng_of(s, torch.zeros(5)), ["random number generator state is a torch.float32 tensor of shape [5]"]),
    (lambda s: _rng_of(s, "abc"), ["random number generator state is 'abc'"]),
    (lambda s: _rng_of(s, torch.zeros_like(torch.get_rng_state())), ["random number generator state is not valid"]),
    (lambda s: s.pop("rng"), ["random number generator state is None"]),
    (lambda s: s["model"].pop("net.1.weight"), ["model or GradScaler state does not load", "net.1.weight"]),
])
def test_resuming_from_a_damaged_checkpoint(edit: Any, words: list[str], stopped_run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_bytes((stopped_run / "config.json").read_bytes())
    ckpt = out / "checkpoints" / "00_sam_seed0.pt"
    state = torch.load(stopped_run / "checkpoints" / "00_sam_seed0.pt", weights_only=True)
    edit(state)
    torch.save(state, ckpt)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--progress", "none"]) == 2
    one_line_error(capsys, f"checkpoint {ckpt} does not match this run", "remove it to start the run afresh", *words)


@pytest.mark.parametrize(("content", "words"), [
    ("{", ["is not a finished run's record (JSONDecodeError"]),
    ('{"label": "sgd"}', ["KeyError"]),
    (None, ["one row of numbers per epoch"]),  # valid JSON, a history row edited to hold text
])
def test_resume_with_a_damaged_run_record(content: str | None, words: list[str], tmp_path: Path, data_dir: str,
                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    assert main(["compare", *tiny(data_dir, "--methods", "sgd", "--seeds", "1", "--out", str(out))]) == 0
    record = out / "runs" / "00_sgd_seed0.json"
    if content is None:
        d = json.loads(record.read_text())
        d["history"][0]["test_acc"] = "high"
        content = json.dumps(d)
    record.write_text(content)
    capsys.readouterr()
    assert main(["compare", "--out", str(out), "--resume", "--progress", "none"]) == 2
    one_line_error(capsys, f"--resume: {record}", "delete it to train that run again", *words)


# --------------------------------------------------------------------------- the cli extra
_NO_EXTRA = """
import sys
class NoExtra:  # the `cli` extra is not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"numpy", "matplotlib", "rich", "sklearn", "mnist1d"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoExtra())
import runpy
sys.argv = ["flatminima", *sys.argv[1:]]
runpy.run_module("flatminima.experiments", run_name="__main__")
"""


@pytest.mark.parametrize("argv", [["--help"], ["compare"], ["list"], ["sharpness", "x.pt"]])
def test_without_the_cli_extra(argv: list[str]) -> None:
    """``python -m flatminima.experiments`` (the console script's module) where
    numpy and the rest of the extra cannot be imported: help works, a command
    names the extra to install."""
    env = {**os.environ, "PYTHONPATH": str(Path(flatminima.__file__).parents[1]), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", _NO_EXTRA, *argv], capture_output=True, text=True, env=env,
                          timeout=120)
    if argv == ["--help"]:
        assert proc.returncode == 0 and "usage: flatminima" in proc.stdout and "flatminima[cli]" in proc.stdout
        return
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1] == (
        "flatminima: error: the flatminima command needs the 'cli' extra, and numpy is not installed: "
        "pip install 'flatminima[cli]'"), proc.stderr


# --------------------------------------------------------------------------- compare goes on
def test_compare_goes_on_past_a_method_that_cannot_run(tmp_path: Path, data_dir: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    """resnet1d has no 2-D weights in hidden layers (convolutions; the head is
    a layer Muon must not take): muon cannot run there, sgd can."""
    out = tmp_path / "o"
    rc = main(["compare", *tiny(data_dir, "--model", "resnet1d", "--methods", "sgd", "muon", "--seeds", "1",
                                "--out", str(out))])
    stdout, err = capsys.readouterr()
    assert rc == 1
    assert err.strip() == ("flatminima: error: method 'muon': MuonAdamW: no parameter has use_muon=True, so Muon would "
                           "step nothing; the model has no 2-D weights in hidden layers (Muon takes only those): use "
                           "AdamW instead")
    table = stdout[stdout.index("method"):]
    assert "\nsgd " in table and "muon" not in table and "cost = time per step relative to sgd" in table
    results = json.loads((out / "results.json").read_text())
    assert list(results["failures"]) == ["muon"] and [r["label"] for r in results["runs"]] == ["sgd"]
    # none finished: no empty table, the errors, exit 1
    rc = main(["compare", *tiny(data_dir, "--model", "resnet1d", "--optimizer", "muon", "--methods", "base", "sam",
                                "--seeds", "1", "--out", str(tmp_path / "none"))])
    stdout, err = capsys.readouterr()
    assert rc == 1 and "no method finished" in stdout and "method  " not in stdout
    assert [line.split(":")[2] for line in err.strip().splitlines()] == [" method 'muon'", " method 'sam'"]


# --------------------------------------------------------------------------- Muon + AdamW
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(),
                         nn.Linear(8, 8, bias=False), nn.Linear(8, 3))


def test_muon_param_groups_split() -> None:
    model = mlp()
    for module in (model, nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 5),
                                        nn.Linear(5, 2))):
        weighted = [m for m in model.modules() if any(p.dim() >= 2 for p in m.parameters(recurse=False))]
        if module is not model:
            weighted = [m for m in module.modules() if any(p.dim() >= 2 for p in m.parameters(recurse=False))]
        outer = {id(weighted[0]), id(weighted[-1])}
        want_muon, want_rest = [], []
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                hidden_matrix = name == "weight" and p.dim() == 2 and id(m) not in outer and not isinstance(m, nn.LayerNorm)
                (want_muon if hidden_matrix else want_rest).append(p)
        groups = flatminima.muon_param_groups(module)
        assert [g["use_muon"] for g in groups] == [True, False]
        assert [id(p) for p in groups[0]["params"]] == [id(p) for p in want_muon]
        assert [id(p) for p in groups[1]["params"]] == [id(p) for p in want_rest]
    groups = flatminima.muon_param_groups(model)
    assert [tuple(p.shape) for p in groups[0]["params"]] == [(8, 8), (8, 8)]  # the two hidden Linear weights


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def test_muon_adamw_steps_as_muon_and_adamw_side_by_side() -> None:
    """MuonAdamW (lr scheduled) = torch's Muon on the hidden matrices + torch's AdamW on the rest."""
    model, ref = mlp(), mlp()
    opt = flatminima.MuonAdamW(flatminima.muon_param_groups(model), lr=0.01, weight_decay=0.1)
    groups = flatminima.muon_param_groups(ref)
    refs = [torch.optim.Muon(groups[0]["params"], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(groups[1]["params"], lr=0.01, weight_decay=0.1)]
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for x, y in _batches(4):
        for m, optimizers in ((model, [opt]), (ref, refs)):
            for o in optimizers:
                o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            for o in optimizers:
                o.step()
        sched.step()
        for o in refs:
            for group in o.param_groups:
                group["lr"] *= 0.5
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def _sam_run(model: nn.Module, opt: flatminima.SharpnessAware, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in batches:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def test_sam_on_muon_adamw_resumes_bit_for_bit(tmp_path: Path) -> None:
    def build() -> tuple[nn.Module, flatminima.SharpnessAware, torch.optim.lr_scheduler.LRScheduler]:
        model = mlp()
        opt = flatminima.SAM(flatminima.muon_param_groups(model), flatminima.MuonAdamW, rho=0.05, lr=0.01)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))

    batches = _batches(6)
    model, opt, sched = build()
    assert opt.base_optimizer.param_groups is opt.param_groups  # one list of group dicts: the scheduler reaches both
    for batch in batches:
        _sam_run(model, opt, [batch])
        sched.step()
    first, first_opt, first_sched = build()
    for batch in batches[:3]:
        _sam_run(first, first_opt, [batch])
        first_sched.step()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict(), "sched": first_sched.state_dict()},
               tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed, resumed_opt, resumed_sched = build()
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    inner = resumed_opt.base_optimizer._inner  # each inner optimizer holds the loaded groups and state
    assert all(g in resumed_opt.param_groups for o in inner.values() for g in o.param_groups)
    assert all(o.state is resumed_opt.base_optimizer.state for o in inner.values())
    for batch in batches[3:]:
        _sam_run(resumed, resumed_opt, [batch])
        resumed_sched.step()
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert resumed_opt.step_count == 6 and opt.param_groups[0]["lr"] == resumed_opt.param_groups[0]["lr"]


def test_muon_adamw_refuses_what_it_cannot_serve() -> None:
    model = mlp()
    with pytest.raises(TypeError, match=r"takes param groups \(dicts with use_muon=True or False\), got a Parameter"):
        flatminima.MuonAdamW(model.parameters())
    with pytest.raises(TypeError, match=r"param group 0 needs use_muon=True \(Muon\) or False \(AdamW\), got None"):
        flatminima.MuonAdamW([{"params": list(model.parameters())}])
    with pytest.raises(ValueError, match=r"Muon takes only 2-D parameters, got one of shape \[8\]"):
        flatminima.MuonAdamW([{"params": list(model.parameters()), "use_muon": True}])
    with pytest.raises(ValueError, match="no parameter has use_muon=True"):
        flatminima.MuonAdamW([{"params": list(model.parameters()), "use_muon": False}])
    opt = flatminima.MuonAdamW(flatminima.muon_param_groups(model))
    swapped = opt.state_dict()
    swapped["param_groups"] = [{**g, "use_muon": not g["use_muon"]} for g in swapped["param_groups"]]
    before = opt.state_dict()
    with pytest.raises(ValueError, match="param group 0 of the state dict has use_muon=False, this optimizer's has True"):
        opt.load_state_dict(swapped)
    assert opt.state_dict() == before


def test_muon_through_the_command(tmp_path: Path, data_dir: str, capsys: pytest.CaptureFixture) -> None:
    """``muon`` as a plain optimizer and as SAM's base (--optimizer muon) on
    the MLP; interrupted after epoch 1 and resumed, the same numbers."""
    args = tiny(data_dir, "--epochs", "2", "--optimizer", "muon", "--lr", "0.01", "--methods", "base", "sam",
                "--seeds", "1")
    assert main(["compare", *args, "--out", str(tmp_path / "full")]) == 0
    assert main(["compare", *args, "--out", str(tmp_path / "part"), "--stop-after", "1"]) == 0
    assert main(["compare", "--out", str(tmp_path / "part"), "--resume", "--progress", "none"]) == 0
    timing = {"epoch_seconds", "steps_per_sec"}

    def numbers(folder: str) -> list[list[dict[str, Any]]]:
        runs = json.loads((tmp_path / folder / "results.json").read_text())["runs"]
        return [[{k: v for k, v in row.items() if k not in timing} for row in r["history"]] for r in runs]

    full = numbers("full")
    assert [len(h) for h in full] == [2, 2] and full == numbers("part")
    assert "muon(lr=0.01, weight_decay=0.0005)" in capsys.readouterr().out


def test_muon_adamw_reads_a_generator_of_parameters_once() -> None:
    """Groups given as generators (``module.parameters()``): the check that some group is Muon's
    used to read them to the end, leaving Muon nothing to step."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    hidden = (p for p in model[1].parameters() if p.dim() == 2)
    rest = (p for m in model for p in m.parameters() if p is not model[1].weight)
    opt = flatminima.MuonAdamW([{"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False}], lr=0.01)
    assert sorted(len(g["params"]) for g in opt.param_groups) == [1, 5]
