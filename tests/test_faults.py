"""Faults a careless or hostile caller can cause, each refused cleanly (issue
#14; the library's state-dict items so far): options read from a state dict
pass the constructor's checks, a state dict of another method is refused, a
failed load leaves the optimizer exactly as it was, and a fuzz of mutated
state dicts either loads or raises ValueError/TypeError with nothing changed.
A huge but finite gradient is a step, not a skip."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import flatminima
import helpers
from fake_cifar import cifar_both_layouts
from methods_db import DEFAULT_CASES


def _trained(name: str = "sam", steps: int = 2, **kwargs: Any) -> tuple[nn.Module, flatminima.SharpnessAware]:
    model = helpers.mlp(torch.float64)
    opt = flatminima.create(name, helpers.two_groups(model), torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)
    for x, y in helpers.batches(steps, torch.float64):
        opt.step(helpers.make_closure(opt, model, x, y))
    return model, opt


def _snapshot(opt: flatminima.SharpnessAware) -> dict[str, Any]:
    return copy.deepcopy(opt.state_dict())


def _unchanged(opt: flatminima.SharpnessAware, before: dict[str, Any]) -> None:
    helpers.assert_tree_equal(opt.state_dict(), before)
    assert opt.param_groups is opt.base_optimizer.param_groups  # still shared: LR changes reach the base
    for key in opt.defaults:
        assert all(key in g for g in opt.param_groups)


@pytest.mark.parametrize(
    ("where", "key", "value", "match"),
    [
        ("group", "rho", -5.0, "Invalid rho value: -5.0"),
        ("group", "rho", float("nan"), "rho"),
        ("group", "norm_eps", 0.0, "Invalid norm_eps value: 0.0"),
        ("base group", "rho", -3.0, "Invalid rho value: -3.0"),  # the base's groups are the ones in effect
        ("base group", "rho", 0.3, "rho=0.3 in the base optimizer's param group 0 but 0.05 in"),
        ("options", "max_grad_norm", -1.0, "Invalid max_grad_norm value: -1.0"),
        ("options", "sync_perturbations", 1, "sync_perturbations must be a bool"),
        ("counters", "steps", -1, "counters must be non-negative ints"),
        ("counters", "steps", "3", "counters must be non-negative ints"),
    ],
)
def test_loaded_options_pass_the_constructor_checks(where: str, key: str, value: Any, match: str) -> None:
    _, opt = _trained(max_grad_norm=1.0)
    saved = _snapshot(opt)
    bad = copy.deepcopy(saved)
    if where == "group":
        bad["param_groups"][0][key] = value
    elif where == "base group":
        bad["base"]["param_groups"][0][key] = value
    else:
        bad["flatminima"][where][key] = value
    _, other = _trained(max_grad_norm=1.0)
    before = _snapshot(other)
    with pytest.raises((ValueError, TypeError), match=match):
        other.load_state_dict(bad)
    _unchanged(other, before)


def test_a_failed_load_leaves_the_optimizer_as_it_was() -> None:
    """A state dict whose base part is broken (a missing key) used to leave
    the groups unshared, so LR changes stopped reaching the base optimizer."""
    _, opt = _trained()
    for breaks, match in [(lambda sd: sd["base"].pop("state"), "does not load"),
                          (lambda sd: sd["base"]["param_groups"][0].pop("lr"), "lacks \\['lr'\\]")]:
        bad = _snapshot(opt)
        breaks(bad)
        _, other = _trained(steps=3)
        before = _snapshot(other)
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(bad)
        _unchanged(other, before)
        other.param_groups[0]["lr"] = 0.5
        assert other.base_optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize(("saved_as", "loaded_as", "flag"), [("sam", "asam", "adaptive"), ("gcsam", "sam", "centralize")])
def test_another_methods_state_dict_is_refused(saved_as: str, loaded_as: str, flag: str) -> None:
    """SAM, ASAM and GCSAM share a class; the flags say which method a state
    dict belongs to, and loading it into another would silently change it."""
    _, opt = _trained(saved_as)
    _, other = _trained(loaded_as)
    before = _snapshot(other)
    with pytest.raises(ValueError, match=f"state dict was saved with {flag}="):
        other.load_state_dict(opt.state_dict())
    _unchanged(other, before)


def test_a_huge_finite_gradient_is_a_step_not_a_skip() -> None:
    """A gradient of about 1e25 overflows the float32 sum of squares; the norm
    is then recomputed in float64 before the gradient is called non-finite,
    and the step is taken, on both kernel paths, as in float64."""
    results = []
    for dtype, foreach in [(torch.float32, True), (torch.float32, False), (torch.float64, True)]:
        model = helpers.mlp(dtype)
        opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-27, foreach=foreach)
        x, y = helpers.batches(1, torch.float64)[0]
        x = x.to(dtype)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y) * 1e25
            loss.backward()
            return loss

        w0 = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt.step(closure)
        assert opt.skipped_steps == 0 and opt.perturbed_steps == 1
        w1 = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert torch.isfinite(w1).all() and not torch.equal(w0, w1)
        results.append((w1 - w0).double())
    assert torch.equal(results[0], results[1])  # foreach and per-tensor paths agree
    torch.testing.assert_close(results[0], results[2], rtol=1e-3, atol=1e-6)  # float32 rounding of a ~1e-2 step


# --------------------------------------------------------------------------- the fuzz
_CASES = [c for c in DEFAULT_CASES if c.closure == "loss"]


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of the nested dicts and lists of a state dict."""
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, prefix + (i,))
    return out


_JUNK = st.sampled_from([None, -1, 0, 1, 2.5, -3.0, float("nan"), float("inf"), "x", True, [], {}, [1, 2],
                         torch.zeros(()), torch.ones(3)])


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(_CASES), data=st.data())
def test_fuzzed_state_dicts_load_or_fail_cleanly(case: Any, data: Any) -> None:
    """A state dict with one value replaced or one key deleted, anywhere:
    load_state_dict either loads it or raises ValueError/TypeError, and then
    leaves the optimizer exactly as it was. (What it loads is not checked
    further here: a base optimizer's own state, a momentum buffer of the
    wrong shape say, is the base optimizer's to check.)"""
    model = helpers.mlp(torch.float64)
    opt = flatminima.create(case.method, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **case.kwargs)
    for x, y in helpers.batches(2, torch.float64):
        opt.step(helpers.make_closure(opt, model, x, y))
    saved = copy.deepcopy(opt.state_dict())
    path = data.draw(st.sampled_from(_paths(saved)))
    node = saved
    for k in path[:-1]:
        node = node[k]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = data.draw(_JUNK)
    before = _snapshot(opt)
    try:
        opt.load_state_dict(saved)
    except (ValueError, TypeError):
        _unchanged(opt, before)


def test_a_non_finite_option_set_by_hand_is_refused_at_the_step() -> None:
    """rho = nan (or inf) is refused by the constructor and add_param_group,
    and also when set by hand between steps: the step names the value."""
    params = [nn.Parameter(torch.zeros(2))]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rho"):
            flatminima.SAM(params, torch.optim.SGD, rho=bad, lr=0.1)
    model, opt = _trained()
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "rho": float("inf")})
    opt.param_groups[0]["rho"] = float("nan")
    w0 = [p.detach().clone() for p in model.parameters()]
    x, y = helpers.batches(1, torch.float64)[0]
    with pytest.raises(ValueError, match="Invalid rho value: nan"):
        opt.step(helpers.make_closure(opt, model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


def test_mostly_skipped_steps_warn_again_with_the_likely_causes() -> None:
    """A finite rho so large that w + eps overflows skips every step: after
    10 steps a second warning says how many were skipped and names rho and lr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))  # float32: at w + eps the gradients overflow
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=1e30, lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for x, y in helpers.batches(12, torch.float64):
            opt.step(helpers.make_closure(opt, model, x.float(), y))
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert opt.skipped_steps == 12 and len(messages) == 2, messages
    assert "non-finite gradient in the perturbed pass" in messages[0]
    assert "10 of the last 10 steps were skipped" in messages[1]
    assert "rho = [1e+30]" in messages[1] and "lr = [0.1]" in messages[1]


def test_wsam_decoupled_term_is_clipped_too() -> None:
    """With max_grad_norm, WSAM's decoupled sharpness term s = g_p - g is
    clipped to the same bound as the direction handed to the base optimizer:
    a gradient spike moves the weights by at most lr * (1 + alpha) * bound."""
    model = helpers.mlp(torch.float64)
    opt = flatminima.WSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.9, max_grad_norm=0.1, lr=0.1)
    x, y = helpers.batches(1, torch.float64)[0]

    def spike() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * 1e4
        loss.backward()
        return loss

    w0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt.step(spike)
    moved = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - w0).norm())
    alpha = 0.9 / 0.1
    assert 0.0 < moved <= 0.1 * (1 + alpha) * 0.1 * (1 + 1e-9), moved


def test_mnist1d_cache_has_a_checkpoints_permissions(tmp_path: Any) -> None:
    """The MNIST-1D cache is written as checkpoints are (atomically, through a
    temporary file): with the usual permissions, not mkstemp's 0600."""
    pytest.importorskip("mnist1d")
    from flatminima.experiments.data import load_mnist1d

    load_mnist1d(200, tmp_path)
    (cache,) = [p for p in tmp_path.iterdir() if p.suffix == ".npz"]
    mask = os.umask(0)
    os.umask(mask)
    assert cache.stat().st_mode & 0o777 == 0o666 & ~mask
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_crafted_cifar_pickle_is_refused_and_its_code_does_not_run(tmp_path: Any) -> None:
    """The CIFAR loader reads the python batches through an unpickler that
    allows only what those files hold; a batch that tries to run code is
    refused with an error naming the file, and the code never runs."""
    import pickle

    np = pytest.importorskip("numpy")
    from flatminima.experiments.data import cifar_files, load_cifar
    from flatminima.experiments.errors import DataError

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    good = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1], b"batch_label": b"x", b"filenames": [b"a", b"b"]}
    for name in cifar_files("cifar10"):
        body = {b"label_names": [b"c%d" % i for i in range(10)]} if name.endswith("meta") else good
        (tmp_path / name).write_bytes(pickle.dumps(body))
    assert load_cifar("cifar10", tmp_path).x_train.shape[0] == 10  # the honest files load
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({**good, b"extra": Exploit()}))
    with pytest.raises(DataError, match="data_batch_1.*refused"):
        load_cifar("cifar10", tmp_path)
    assert not marker.exists()


# --------------------------------------------------------------------------- CLI and data (items 1, 2, 8, 9, 11, 13)
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_binary_version_loads_the_same_data_without_pickle(tmp_path: Any, name: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The official binary batches (data_batch_1.bin ..., train.bin/test.bin)
    load to the same images, labels and class names as the python version,
    from the folder or its parent, and no pickle is read on the way."""
    from flatminima.experiments import data as data_mod
    from flatminima.experiments.errors import DataError

    py_dir, bin_dir = cifar_both_layouts(tmp_path, name)
    want = data_mod.load_cifar(name, py_dir)

    def no_pickle(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the binary version must not be unpickled")

    monkeypatch.setattr(data_mod, "_unpickle", no_pickle)
    monkeypatch.setattr(data_mod.pickle, "Unpickler", no_pickle)
    for where in (bin_dir, tmp_path):  # tmp_path holds py/ (the python files are not at its top) and the bin folder
        got = data_mod.load_cifar(name, where)
        for field in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field
        assert got.class_names == want.class_names and got.class_names[7] == "class7"
        assert "binary batches" in got.source
    first = data_mod.cifar_binary.LAYOUTS[name].train[0]
    (bin_dir / first).write_bytes(b"\x00" * 3000)
    with pytest.raises(DataError, match=f"{first}: not a CIFAR binary batch: 3000 bytes"):
        data_mod.load_cifar(name, bin_dir)


def test_a_checkpoints_data_dir_is_never_read_from_the_checkpoints_folder(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """A checkpoint recording a relative data_dir: `flatminima sharpness` reads
    it from the current directory, or from the user's --data-dir, and never
    from the folder the checkpoint sits in (which holds a decoy here)."""
    import json

    pytest.importorskip("flatminima.sharpness.cli")
    from flatminima.experiments.cli import main
    from flatminima.experiments.config import build_config
    from flatminima.experiments.train import train_run

    run_dir, ckpt_dir, elsewhere = tmp_path / "run", tmp_path / "ckpts", tmp_path / "elsewhere"
    for d in (run_dir, ckpt_dir, elsewhere):
        d.mkdir()
    _, bin_dir = cifar_both_layouts(run_dir, "cifar10")
    _, decoy = cifar_both_layouts(ckpt_dir, "cifar10")
    bin_dir.rename(run_dir / "data")
    decoy.rename(ckpt_dir / "data")
    ckpt = ckpt_dir / "run.pt"
    monkeypatch.chdir(run_dir)
    cfg = build_config({"dataset": "cifar10", "data_dir": "data", "model": "mlp", "width": 4, "depth": 1,
                        "epochs": 1, "batch_size": 8, "noise": 0.0, "threads": 1})
    train_run(cfg, "sgd", 0, checkpoint=ckpt)
    measure = ["sharpness", str(ckpt), "--samples", "6", "--measures", "gap", "--no-progress"]

    def gap(*extra: str) -> float:
        assert main([*measure, "--json", str(tmp_path / "m.json"), *extra]) == 0, capsys.readouterr().err
        return json.loads((tmp_path / "m.json").read_text())["one_step_gap"]

    from_cwd = gap()  # run_dir/data, as when the run was started
    monkeypatch.chdir(elsewhere)
    assert main(measure) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"flatminima: error: CIFAR-10: data folder {elsewhere / 'data'} does not exist; it must hold "
                   f"the python version of CIFAR-10 as extracted from cifar-10-python.tar.gz: data_batch_1, "
                   f"data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta; or the binary "
                   f"version from cifar-10-binary.tar.gz: data_batch_1.bin, data_batch_2.bin, data_batch_3.bin, "
                   f"data_batch_4.bin, data_batch_5.bin, test_batch.bin, batches.meta.txt")
    assert gap("--data-dir", str(run_dir / "data")) == from_cwd  # the user's folder wins
    monkeypatch.chdir(tmp_path)
    assert gap("--data-dir", "run/data") == from_cwd  # relative to the current directory


def _tiny_compare(out: Any, *extra: str) -> int:
    """`flatminima compare` on 64 digits, one tiny MLP, one epoch: about 0.1 s."""
    pytest.importorskip("sklearn")
    from flatminima.experiments.cli import main

    return main(["compare", "--dataset", "digits", "--train-size", "64", "--test-size", "32", "--model", "mlp",
                 "--width", "4", "--depth", "1", "--epochs", "1", "--methods", "sgd", "--seeds", "1", "--no-plots",
                 "--progress", "none", "--threads", "1", "--out", str(out), *extra])


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()  # reaped: no process has this pid now (pids are not reused this fast)
    return child.pid


def _lock_text(pid: int, start: Any, host: str | None = None) -> str:
    import json
    import socket

    return json.dumps({"pid": pid, "start": start, "host": host or socket.gethostname(), "since": "2024-01-01 00:00:00"})


@pytest.mark.parametrize("holder", ["this live process", "another host", "not a lock"])
def test_a_held_run_folder_refuses_a_second_run(tmp_path: Any, capsys: pytest.CaptureFixture, holder: str) -> None:
    """A lock file whose owner runs (here: this very process, with its real
    start time), or cannot be checked (another host, unreadable contents),
    refuses the run with one line, writes nothing, and stays as it was."""
    from flatminima.experiments.lock import LOCK_NAME, process_start

    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    text = {"this live process": _lock_text(os.getpid(), process_start(os.getpid())),
            "another host": _lock_text(os.getpid(), 1, host="elsewhere.example"),
            "not a lock": ""}[holder]
    lock.write_text(text)
    assert _tiny_compare(out) == 2
    err = capsys.readouterr().err
    prefix = f"flatminima: error: the results folder {out} "
    expected = {
        "this live process": f"is in use by another run (pid {os.getpid()}, since 2024-01-01 00:00:00); wait for it "
                             f"to finish or use another --out (if no run is using the folder, delete {lock})",
        "another host": f"is in use by another run (pid {os.getpid()} on elsewhere.example, since 2024-01-01 "
                        f"00:00:00); wait for it to finish or use another --out (if no run is using the folder, "
                        f"delete {lock})",
        "not a lock": f"is locked by {lock}, which is being written or is not a flatminima lock (b''); if no run "
                      f"is using the folder, delete {lock}",
    }[holder]
    assert err == prefix + expected + "\n"
    assert lock.read_text() == text and sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


@pytest.mark.parametrize("holder", ["dead pid", "reused pid"])
def test_a_stale_lock_is_taken_over_held_during_the_run_and_released(tmp_path: Any, holder: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock left by a dead process, or naming a live pid whose start time
    differs (the pid was reused), is taken over; during the run the lock holds
    this process's pid and start time, and it is gone afterwards."""
    import json

    from flatminima.experiments import runner
    from flatminima.experiments.lock import LOCK_NAME, process_start

    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    start = process_start(os.getpid())
    lock.write_text(_lock_text(_dead_pid(), 5) if holder == "dead pid" else _lock_text(os.getpid(), start - 1))
    seen = []
    write_outputs = runner.write_outputs

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(json.loads(lock.read_text()))
        return write_outputs(*args, **kwargs)

    monkeypatch.setattr(runner, "write_outputs", spy)
    assert _tiny_compare(out) == 0
    assert [(s["pid"], s["start"]) for s in seen] == [(os.getpid(), start)]
    assert not lock.exists() and (out / "results.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(LOCK_NAME)]  # nothing moved aside is left


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_the_run_folder_lock_is_released_on_error_and_ctrl_c(tmp_path: Any, fault: type,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from flatminima.experiments import runner
    from flatminima.experiments.lock import LOCK_NAME

    out = tmp_path / "out"
    held = []

    def fail(*args: Any, **kwargs: Any) -> Any:
        held.append((out / LOCK_NAME).is_file())
        raise fault("injected")

    monkeypatch.setattr(runner, "train_run", fail)
    if fault is KeyboardInterrupt:
        assert _tiny_compare(out) == 130
    else:
        with pytest.raises(RuntimeError, match="injected"):
            _tiny_compare(out)
    assert held == [True] and not (out / LOCK_NAME).exists()


def test_process_start_reads_field_22_past_a_command_name_with_spaces_and_parentheses(tmp_path: Any) -> None:
    """/proc/<pid>/stat's command name may hold ") (": the start time is read
    after its last parenthesis; a pid with no process has none."""
    import subprocess
    import sys

    from flatminima.experiments.lock import process_start

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc here (the lock then compares pids only, see lock.py)")
    odd = tmp_path / "a) (b c"
    odd.symlink_to(sys.executable)
    child = subprocess.Popen([str(odd), "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with open(f"/proc/{child.pid}/stat") as f:
            assert ") (b c)" in f.read()  # the name the kernel shows
        with open(f"/proc/{child.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        assert process_start(child.pid) == int(fields[19]) >= process_start(os.getpid())
    finally:
        child.communicate(b"")
    assert process_start(child.pid) is None


def test_temp_files_of_a_killed_write_are_removed_when_the_folder_is_next_opened(tmp_path: Any,
                                                                                  capsys: pytest.CaptureFixture) -> None:
    """A process killed inside atomic_write leaves its temporary file; the next
    run in the folder removes such files (in the folder, runs/ and
    checkpoints/), says so, and leaves every other file alone."""
    from flatminima.experiments.checkpoint import atomic_write

    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "plots").mkdir()
    pid = os.fork()
    if pid == 0:  # the child dies mid-write, as under SIGKILL: no cleanup runs
        atomic_write(out / "checkpoints" / "00_sgd_seed0.pt", lambda f: (f.write(b"partial"), os._exit(0)))
    os.waitpid(pid, 0)
    (killed,) = (out / "checkpoints").iterdir()
    assert killed.name.startswith(".00_sgd_seed0.pt.") and killed.name.endswith(".tmp")
    (out / ".results.json.ab_12xyz.tmp").write_text("{")
    keep = [out / "notes.tmp", out / ".results.json.tmp", out / ".results.json.ABCDEFGH.tmp",
            out / "plots" / ".curves.png.abcdefgh.tmp"]
    for path in keep:
        path.write_text("mine")
    assert _tiny_compare(out) == 0
    err = capsys.readouterr().err
    assert err == (f"flatminima: removed 2 temporary file(s) left by an interrupted write: "
                   f"{out / '.results.json.ab_12xyz.tmp'}, {killed}\n")
    assert not killed.exists() and all(p.read_text() == "mine" for p in keep)


def _set(path: tuple, value: Any) -> Any:
    def edit(state: dict) -> None:
        node = state
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return edit


@pytest.mark.parametrize(("edit", "why"), [
    (_set(("epoch",), 99), "it says epoch 99 is done, and the run has epochs 1 to 3"),
    (_set(("epoch",), 0), "it says epoch 0 is done, and the run has epochs 1 to 3"),
    (_set(("steps",), 7), "it says 7 steps after epoch 1, and an epoch of this run has 1 steps (1 in all)"),
    (lambda s: s["history"].append(dict(s["history"][0])), "it records 2 epoch(s) of results for epoch 1"),
    (_set(("history", 0, "epoch"), 2), "result row 1 is {'epoch': 2, 'steps': 1}, expected epoch 1 after 1 steps"),
    (_set(("optimizer", "param_groups", 0, "rho"), -3.0),
     "its optimizer state does not load (ValueError: Invalid rho value: -3.0 (must be finite and >= 0))"),
    (lambda s: [_set((*where, "param_groups", 0, "rho"), 0.3)(s) for where in [("optimizer",), ("optimizer", "base")]],
     "param group 0 has rho=0.3 where the run's settings give 0.05"),  # valid, but not this run's
    (_set(("optimizer", "base", "param_groups", 0, "rho"), -3.0),  # the base part's copy: the library refuses it
     "its optimizer state does not load (ValueError: Invalid rho value: -3.0 (must be finite and >= 0))"),
    (_set(("optimizer", "base", "param_groups", 0, "momentum"), 0.5),
     "param group 0 has momentum=0.5 where the run's settings give 0.9"),
    (_set(("optimizer", "flatminima", "options", "max_grad_norm"), 1.0),
     "its optimizer options are {'max_grad_norm': 1.0, 'sync_perturbations': True} where the run's settings give "
     "{'max_grad_norm': None, 'sync_perturbations': True}"),
    (_set(("scheduler", "last_epoch"), 3), "its LR schedule is at step 3 from [0.1], where the run is at step 1 from [0.1]"),
    (_set(("optimizer", "base", "param_groups", 0, "lr"), 1.0),
     "its learning rates [1.0] are not the schedule's [0.07500000000000001] at step 1"),
], ids=["epoch 99", "epoch 0", "steps", "history length", "history row", "rho -3 loaded", "rho 0.3", "base rho -3",
        "momentum", "max_grad_norm", "schedule step", "lr"])
def test_a_resumed_checkpoint_must_match_the_run(tmp_path: Any, capsys: pytest.CaptureFixture, edit: Any,
                                                  why: str) -> None:
    """A checkpoint edited after epoch 1 of 3 (progress, results, method and
    base options, schedule) is refused on --resume with one line naming it,
    instead of marking the run done or training on with other settings."""
    from flatminima.experiments.checkpoint import load_checkpoint, save_checkpoint
    from flatminima.experiments.cli import main

    out = tmp_path / "out"
    assert _tiny_compare(out, "--methods", "sam", "--epochs", "3", "--stop-after", "1") == 0  # later flags win
    ckpt = out / "checkpoints" / "00_sam_seed0.pt"
    state = load_checkpoint(ckpt)
    edit(state)
    save_checkpoint(ckpt, {k: v for k, v in state.items() if k != "format"})
    capsys.readouterr()
    assert main(["compare", "--out", str(out), "--resume", "--progress", "none"]) == 2
    assert capsys.readouterr().err == (f"flatminima: error: checkpoint {ckpt} does not match this run: {why}; remove "
                                       "it to start the run afresh\n")
    assert not (out / "runs" / "00_sam_seed0.json").exists()


@pytest.mark.parametrize("keep", [False, True])
def test_ctrl_c_while_writing_the_outputs_says_what_the_folder_holds(tmp_path: Any, capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch, keep: bool) -> None:
    """Ctrl-C after training, while results.json and the tables are written:
    the message counts what is on disk (the finished run; its checkpoint only
    with --keep-checkpoints) instead of promising checkpoints."""
    from flatminima.experiments import runner

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "write_outputs", interrupted)
    out = tmp_path / "out"
    assert _tiny_compare(out, *(["--keep-checkpoints"] if keep else [])) == 130
    checkpoints = "1 checkpoint" if keep else "no checkpoints"
    assert capsys.readouterr().err == (
        f"\nflatminima: interrupted; {out} holds 1 finished run (runs/), {checkpoints} "
        f"(checkpoints/) and no results.json yet.\nContinue with: flatminima compare --out {out} --resume\n")
    assert len(list((out / "runs").glob("*.json"))) == 1
    assert len(list((out / "checkpoints").glob("*.pt"))) == int(keep)


def test_a_plain_optimizers_damaged_checkpoint_is_one_line(tmp_path: Any, capsys: pytest.CaptureFixture) -> None:
    """A baseline method's optimizer is torch's: its load_state_dict raises AttributeError on a
    state that is not a dict, which --resume reported as a traceback."""
    from flatminima.experiments.checkpoint import load_checkpoint, save_checkpoint
    from flatminima.experiments.cli import main

    out = tmp_path / "out"
    assert _tiny_compare(out, "--methods", "sgd", "--epochs", "3", "--stop-after", "1") == 0
    ckpt = out / "checkpoints" / "00_sgd_seed0.pt"
    state = load_checkpoint(ckpt)
    state["optimizer"] = 3
    save_checkpoint(ckpt, {k: v for k, v in state.items() if k != "format"})
    capsys.readouterr()
    assert main(["compare", "--out", str(out), "--resume", "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flatminima: error: checkpoint {ckpt} does not match this run: its optimizer state does "
                          "not load (AttributeError") and err.count("\n") == 1


def test_an_option_changed_by_hand_after_steps_is_checked_again() -> None:
    """The step re-checks only the option values that changed since the last check: a valid value
    changed to an invalid one is refused, and so is one equal to the old value but of another
    type (adaptive=True changed to 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=True, lr=0.1)
    x, y = helpers.batches(1, torch.float64)[0]
    closure = helpers.make_closure(opt, model, x[:, :4], y % 3)
    opt.step(closure)
    opt.step(closure)
    opt.param_groups[0]["adaptive"] = 1
    with pytest.raises(TypeError, match="adaptive"):
        opt.step(closure)
    opt.param_groups[0]["adaptive"] = True
    opt.step(closure)
    opt.param_groups[0]["rho"] = -0.05
    with pytest.raises(ValueError, match="rho"):
        opt.step(closure)
