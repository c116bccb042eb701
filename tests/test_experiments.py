"""The experiment tool's importable pieces (flatminima.experiments): label
noise, data loaders (a tiny CIFAR folder written here), augmentation,
models, schedules, determinism, bit-exact resume, every registered method,
the summary. Tiny settings: each training run takes a fraction of a second."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import flatminima

pytest.importorskip("mnist1d")
pytest.importorskip("sklearn")

from flatminima.experiments import (  # noqa: E402
    ConfigError,
    DataError,
    ExperimentError,
    RunResult,
    build_config,
    compare,
    corrupt_labels,
    load_dataset,
    summarize,
    train_run,
)
from flatminima.experiments import augment as A  # noqa: E402
from flatminima.experiments.data import cifar_files  # noqa: E402
from flatminima.experiments.models import WideResNet, build_model, count_parameters  # noqa: E402
from flatminima.experiments.report import Column, active_columns, register_column, table  # noqa: E402
from flatminima.experiments.train import lr_factor, noisy_labels  # noqa: E402

TIMING = {"epoch_seconds", "steps_per_sec", "train_seconds"}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("fm_data"))


def tiny(data_dir: str, **kw):
    settings = dict(num_samples=300, epochs=2, batch_size=32, width=16, threads=1, data_dir=data_dir, seeds=[0])
    settings.update(kw)
    return build_config(settings)


def same_numbers(a: RunResult, b: RunResult) -> None:
    assert len(a.history) == len(b.history)
    for ra, rb in zip(a.history, b.history):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}


# --------------------------------------------------------------------------- label noise
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.77])
def test_symmetric_noise_rate_is_exact(rate: float) -> None:
    y = torch.arange(1000) % 10
    before = y.clone()
    noisy, mask = corrupt_labels(y, rate, "symmetric", 10, seed=3)
    assert torch.equal(y, before)  # the input is left alone
    assert int(mask.sum()) == round(rate * 1000)
    assert torch.equal(noisy != y, mask)  # every chosen label changed, no other did
    assert noisy.min() >= 0 and noisy.max() < 10
    again, mask2 = corrupt_labels(y, rate, "symmetric", 10, seed=3)
    assert torch.equal(again, noisy) and torch.equal(mask2, mask)
    if rate:
        other, _ = corrupt_labels(y, rate, "symmetric", 10, seed=4)
        assert not torch.equal(other, noisy)


def test_pairflip_noise_flips_each_class_to_the_next() -> None:
    y = torch.tensor([c for c in range(5) for _ in range(10 + c)])  # classes of 10..14 examples
    noisy, mask = corrupt_labels(y, 0.4, "pairflip", 5, seed=0)
    for c in range(5):
        members = y == c
        assert int(mask[members].sum()) == round(0.4 * int(members.sum()))
        assert torch.all(noisy[members & mask] == (c + 1) % 5)
        assert torch.all(noisy[members & ~mask] == c)


@pytest.mark.parametrize(("dataset", "mapping"), [
    ("digits", {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}),
    ("mnist1d", {1: 4, 4: 1, 9: 4, 2: 5, 5: 1}),
    ("cifar10", {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}),
])
def test_asymmetric_noise_flips_to_the_documented_similar_class(dataset: str, mapping: dict[int, int]) -> None:
    y = torch.tensor([c for c in range(10) for _ in range(20 + c)])  # classes of 20..29 examples
    noisy, mask = corrupt_labels(y, 0.4, "asymmetric", 10, seed=1, dataset=dataset)
    for c in range(10):
        members = y == c
        if c in mapping:  # round(0.4 N_c) of the class go to its similar class, the rest stay
            assert int(mask[members].sum()) == round(0.4 * int(members.sum()))
            assert torch.all(noisy[members & mask] == mapping[c])
        else:  # classes without a similar class stay clean
            assert not bool(mask[members].any())
        assert torch.all(noisy[members & ~mask] == c)


def test_asymmetric_noise_needs_a_data_set_with_a_mapping(data_dir: str) -> None:
    with pytest.raises(ConfigError, match="pass dataset=.*pairflip"):
        corrupt_labels(torch.arange(10), 0.2, "asymmetric", 10)
    with pytest.raises(ConfigError, match="'cifar100' has no class-to-similar-class mapping.*pairflip"):
        corrupt_labels(torch.arange(100), 0.2, "asymmetric", 100, dataset="cifar100")
    with pytest.raises(ConfigError, match="'cifar100' has no class-to-similar-class mapping"):
        build_config(dict(dataset="cifar100", noise=0.2, noise_type="asymmetric"))
    with pytest.raises(ConfigError, match="maps classes up to 8, but the labels have 5 classes"):
        corrupt_labels(torch.arange(5), 0.2, "asymmetric", 5, dataset="digits")
    # through a run: the data set's own mapping
    cfg = tiny(data_dir, noise=0.4, noise_type="asymmetric")
    data = load_dataset("mnist1d", data_dir, num_samples=300)
    noisy, mask = noisy_labels(data, cfg, seed=0)
    assert bool(mask.any()) and set(data.y_train[mask].tolist()) <= {1, 4, 9, 2, 5}
    assert all({1: 4, 4: 1, 9: 4, 2: 5, 5: 1}[c] == n for c, n in zip(data.y_train[mask].tolist(), noisy[mask].tolist()))


@pytest.mark.parametrize(("rate", "kind", "words"), [
    (1.0, "symmetric", "[0, 1)"), (-0.1, "symmetric", "[0, 1)"), (1.5, "symmetric", "1.5"),
    ("0.3", "symmetric", "'0.3'"), (0.6, "pairflip", "0.5"), (0.2, "pairwise", "noise-type"),
])
def test_bad_noise_settings(rate, kind, words: str) -> None:
    with pytest.raises(ConfigError, match="noise") as e:
        corrupt_labels(torch.arange(10), rate, kind, 10)
    assert words in str(e.value)


def test_noise_touches_training_labels_only(data_dir: str) -> None:
    cfg = tiny(data_dir, noise=0.4, epochs=1)
    data = load_dataset("mnist1d", data_dir, num_samples=300)
    y_test, y_train = data.y_test.clone(), data.y_train.clone()
    noisy, mask = noisy_labels(data, cfg, seed=0)
    assert int(mask.sum()) == round(0.4 * len(y_train))
    assert torch.equal(noisy != y_train, mask)
    run = train_run(cfg, "sgd", 0, data=data)
    assert torch.equal(data.y_test, y_test) and torch.equal(data.y_train, y_train)  # clean labels kept
    assert run.info["corrupted"] == round(0.4 * len(y_train))
    f = run.final
    assert f["memorised"] is not None
    assert math.isclose(f["gap"], f["train_fit_acc"] - f["test_acc"])
    clean = train_run(tiny(data_dir, noise=0.0, epochs=1), "sgd", 0, data=data)
    assert clean.info["corrupted"] == 0 and clean.final["memorised"] is None
    assert clean.final["train_fit_acc"] == clean.final["train_clean_acc"]


# --------------------------------------------------------------------------- data
def write_cifar(folder: Path, name: str = "cifar10", per_file: int = 6, classes: int = 10) -> dict:
    """A tiny folder in the python-pickle layout of CIFAR (random pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    labels = {}
    for f in cifar_files(name):
        if f in ("batches.meta", "meta"):
            names_key = b"label_names" if name == "cifar10" else b"fine_label_names"
            obj = {names_key: [f"class{i}".encode() for i in range(classes)]}
        else:
            y = rng.integers(0, classes, per_file).tolist()
            labels[f] = y
            obj = {b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8), key: y, b"batch_label": f.encode()}
        with open(folder / f, "wb") as fh:
            pickle.dump(obj, fh)
    return labels


def test_cifar10_loader_reads_the_pickle_layout(tmp_path: Path) -> None:
    labels = write_cifar(tmp_path / "cifar-10-batches-py")
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the folder or its parent
        d = load_dataset("cifar10", where)
        assert d.x_train.shape == (30, 3, 32, 32) and d.x_train.dtype == torch.uint8
        assert d.x_test.shape == (6, 3, 32, 32)
        assert d.y_train.tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
        assert d.y_test.tolist() == labels["test_batch"]
        assert d.num_classes == 10 and d.class_names[3] == "class3"
        x = d.prepare(d.x_train[:4])
        assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and abs(float(x.mean())) < 2


def test_cifar100_loader(tmp_path: Path) -> None:
    labels = write_cifar(tmp_path, "cifar100", per_file=8, classes=100)
    d = load_dataset("cifar100", tmp_path, train_size=5)
    assert d.num_classes == 100 and len(d.y_train) == 5 and d.y_test.tolist() == labels["test"]


def test_cifar_errors_name_the_path_and_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10", None)
    with pytest.raises(DataError, match="does not exist") as e:
        load_dataset("cifar10", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
    folder = tmp_path / "c10"
    write_cifar(folder)
    (folder / "data_batch_3").unlink()
    (folder / "batches.meta").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", folder)
    assert str(folder) in str(e.value) and "data_batch_3, batches.meta" in str(e.value)
    write_cifar(folder)
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_2.*not a CIFAR python pickle"):
        load_dataset("cifar10", folder)
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DataError, match=r"data_batch_2.*\(N, 3072\)"):
        load_dataset("cifar10", folder)


def test_cifar_wrn_trains_with_crop_and_flip(tmp_path: Path) -> None:
    write_cifar(tmp_path, per_file=4)
    cfg = build_config(dict(dataset="cifar10", data_dir=str(tmp_path), model="wrn", depth=10, width=1, epochs=1,
                            batch_size=8, augment=True, noise=0.25, threads=1))
    run = train_run(cfg, "sam", 0)
    assert run.completed and run.info["model_info"]["model"] == "wrn" and math.isfinite(run.final["test_loss"])


def test_mnist1d_is_generated_once_and_cached(tmp_path: Path) -> None:
    d1 = load_dataset("mnist1d", tmp_path, num_samples=100)
    files = list(tmp_path.glob("mnist1d_100_*.npz"))
    assert len(files) == 1
    d2 = load_dataset("mnist1d", tmp_path, num_samples=100)
    assert torch.equal(d1.x_train, d2.x_train) and torch.equal(d1.y_test, d2.y_test)
    assert d1.x_train.shape == (80, 40) and len(d1.y_test) == 20
    state = np.random.get_state()[1].copy()
    files[0].unlink()
    load_dataset("mnist1d", tmp_path, num_samples=100)
    assert np.array_equal(np.random.get_state()[1], state)  # the generator's global seeding is undone


def test_digits_cnn_and_resnet1d(data_dir: str) -> None:
    run = train_run(build_config(dict(dataset="digits", epochs=1, train_size=256, threads=1, augment=True)), "asam", 0)
    assert run.info["model_info"]["model"] == "cnn" and run.info["train_examples"] == 256
    run = train_run(tiny(data_dir, model="resnet1d", width=4, epochs=1, augment=True), "sgd", 0)
    assert run.completed and run.info["model_info"]["model"] == "resnet1d"


# --------------------------------------------------------------------------- pieces
def test_augmentations_are_reproducible_and_shape_preserving() -> None:
    x = torch.arange(1, 2 * 40 + 1, dtype=torch.float32).view(2, 40)
    s1 = A.augment(x, "shift", torch.Generator().manual_seed(0))
    s2 = A.augment(x, "shift", torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2) and s1.shape == x.shape
    for row in s1:  # a shifted copy: consecutive values, zero-filled at one end, shift <= 4
        nz = row[row != 0]
        assert torch.all(torch.diff(nz) == 1) and len(nz) >= 36
        assert torch.all(row[: 40 - len(nz)] == 0) or torch.all(row[len(nz):] == 0)
    img = torch.rand(5, 3, 32, 32)
    out = A.augment(img, "crop+flip", torch.Generator().manual_seed(1))
    assert out.shape == img.shape
    assert torch.equal(A.random_crop(img, 0, torch.Generator()), img)
    flipped = A.random_flip(img, torch.Generator().manual_seed(2))
    assert all(torch.equal(f, i) or torch.equal(f, i.flip(-1)) for f, i in zip(flipped, img))


def test_models_and_wrn_sizes() -> None:
    assert abs(count_parameters(WideResNet(16, 4, 10)) - 2.75e6) < 0.05e6  # WRN-16-4: 2.7M parameters
    with pytest.raises(ConfigError, match="6n\\+4"):
        build_model("wrn", (3, 32, 32), 10, depth=15)
    with pytest.raises(ConfigError, match="needs images"):
        build_model("cnn", (40,), 10)
    # the MNIST-1D paper's CNN: 3 strided convolutions of 25 channels, 25 x 5 features for 40 samples
    cnn1d = build_model("cnn1d", (40,), 10)
    assert count_parameters(cnn1d) == (25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (125 * 10 + 10)
    assert cnn1d(torch.zeros(3, 40)).shape == (3, 10)
    with pytest.raises(ConfigError, match="cnn1d needs 1-D signals.*\\(8, 8\\)"):
        build_model("cnn1d", (8, 8), 10)
    with pytest.raises(ConfigError, match="cnn1d needs 1-D signals; dataset digits"):
        build_config(dict(dataset="digits", model="cnn1d"))
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("vit", (40,), 10)
    assert build_model("auto", (40,), 10, dataset="mnist1d")(torch.zeros(2, 40)).shape == (2, 10)


def test_lr_schedule_warmup_then_cosine() -> None:
    f = lr_factor(total_steps=110, warmup_steps=10, schedule="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert lr_factor(100, 0, "constant", 0.0)(50) == 1.0


# --------------------------------------------------------------------------- runs
def test_same_seed_same_numbers_other_seed_other_numbers(data_dir: str) -> None:
    cfg = tiny(data_dir, augment=True)
    a, b = train_run(cfg, "sam:rho=0.2", 0), train_run(cfg, "sam:rho=0.2", 0)
    same_numbers(a, b)
    c = train_run(cfg, "sam:rho=0.2", 1)
    assert c.history[-1]["train_loss"] != a.history[-1]["train_loss"]


@pytest.mark.parametrize(("method", "model"), [("sgd", "mlp"), ("asam", "resnet1d"), ("wsam", "mlp")])
def test_resume_is_bit_exact(tmp_path: Path, data_dir: str, method: str, model: str) -> None:
    cfg = tiny(data_dir, epochs=3, model=model, width=4 if model == "resnet1d" else 16, augment=True, warmup_epochs=1)
    full = train_run(cfg, method, 0)
    ckpt = tmp_path / "run.pt"
    first = train_run(cfg, method, 0, checkpoint=ckpt, stop_after=1)
    assert not first.completed and len(first.history) == 1 and ckpt.is_file()
    rest = train_run(cfg, method, 0, checkpoint=ckpt, resume=True)
    assert rest.completed
    same_numbers(full, rest)
    with pytest.raises(ExperimentError, match="another run"):
        train_run(cfg.replace(lr=0.05), method, 0, checkpoint=ckpt, resume=True)


def test_every_registered_method_trains(data_dir: str) -> None:
    """Methods come from the registry: one added there appears here with no
    code in the experiment tool (with the closure form its record asks for)."""
    cfg = tiny(data_dir, epochs=1, num_samples=100)
    for name in flatminima.list_methods():
        run = train_run(cfg, name, 0)
        f = run.final
        assert run.completed and math.isfinite(f["test_loss"]) and 1.0 <= f["passes_per_step"] <= 4.0, name


def test_plain_optimizers_and_options(data_dir: str) -> None:
    cfg = tiny(data_dir, epochs=1, optimizer="adamw", lr=1e-3, weight_decay=0.01)
    run = train_run(cfg, "base", 0)
    assert run.label == "adamw" and run.final["passes_per_step"] == 1.0
    run = train_run(cfg, "sam:rho=0.1,betas=(0.8,0.9)", 0)
    assert run.final["passes_per_step"] == 2.0
    with pytest.raises(ConfigError, match="unknown option 'rhoo'"):
        train_run(cfg, "sam:rhoo=0.1", 0)
    with pytest.raises(ConfigError, match="--momentum does not apply to adamw"):
        train_run(cfg.replace(momentum=0.9), "base", 0)


def test_compare_api_matches_summary(tmp_path: Path, data_dir: str) -> None:
    cfg = tiny(data_dir, epochs=1, seeds=[0, 1], methods=["sgd", "sam"])
    res = compare(cfg, out=tmp_path / "o", plots=False)
    rows = {r["method"]: r for r in res.summary()}
    accs = [r.final["test_acc"] for r in res.runs if r.label == "sam"]
    assert rows["sam"]["test_acc"] == pytest.approx(np.mean(accs))
    assert rows["sam"]["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    assert rows["sgd"]["cost"] == 1.0
    assert rows["sam"]["cost"] == pytest.approx(rows["sgd"]["steps_per_sec"] / rows["sam"]["steps_per_sec"])


def test_summary_columns_hook() -> None:
    def run(label: str, seed: int, acc: float, extra: dict) -> RunResult:
        row = {"epoch": 1, "test_acc": acc, "test_loss": 1.0, "train_clean_acc": acc, "memorised": None, "gap": 0.0,
               "epoch_seconds": 1.0, "steps": 10, "steps_per_sec": 10.0, "passes_per_step": 1.0}
        return RunResult(label, label, seed, 1, [row], True, extras=extra)

    runs = [run("a", 0, 50.0, {"my_measure": 2.0}), run("a", 1, 60.0, {"my_measure": 4.0}), run("b", 0, 70.0, {})]
    summary = summarize(runs, ["a", "b"], baseline="a")
    assert summary[0]["test_acc"] == 55.0 and summary[0]["test_acc_std"] == pytest.approx(math.sqrt(50))
    assert summary[1]["seeds"] == 1 and summary[0]["memorised"] is None
    keys = [c.key for c in active_columns(summary)]
    assert "my_measure" in keys and "memorised" not in keys  # an unclaimed extra gets a column
    register_column(Column("my_measure", "mine", "{:.2f}"))
    headers, rows = table(summary, pm=" +- ")
    assert "mine" in headers and rows[0][headers.index("mine")] == "3.00 +- 1.41"
    assert rows[1][headers.index("test acc")] == "70.0"  # one seed: no spread
    from flatminima.experiments import report

    report.COLUMNS[:] = [c for c in report.COLUMNS if c.key != "my_measure"]


# --------------------------------------------------------------------------- m-sharpness and AMP
def test_m_sharpness_gives_each_chunk_its_own_eps(data_dir: str) -> None:
    """--m-sharpness M: the library's ``step(closure, chunks=...)`` on chunks of
    M samples. M >= the batch is one chunk (the plain run, bit for bit); a
    smaller M is another run with the same cost in passes; every method runs."""
    cfg = tiny(data_dir, epochs=1)
    plain = train_run(cfg, "sam", 0)
    same_numbers(plain, train_run(cfg.replace(m_sharpness=32), "sam", 0))
    chunked = train_run(cfg.replace(m_sharpness=8), "sam", 0)
    assert chunked.final["train_loss"] != plain.final["train_loss"]
    assert chunked.final["passes_per_step"] == pytest.approx(2.0)
    small = tiny(data_dir, epochs=1, num_samples=100, m_sharpness=8)
    for name in flatminima.list_methods():
        if flatminima.get_method(name).cls.pre_pass:  # one eps from the momentum, before any pass
            with pytest.raises(ConfigError, match=f"--m-sharpness does not apply to {name}"):
                train_run(small, name, 0)
            continue
        run = train_run(small, name, 0)
        assert run.completed and math.isfinite(run.final["test_loss"]) and 1.0 <= run.final["passes_per_step"] <= 4.0, name
    assert train_run(small, "sgd", 0).final["passes_per_step"] == 1.0  # a plain baseline takes one step per batch


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_and_resumes_bit_exact(tmp_path: Path, data_dir: str, amp: str) -> None:
    """--amp: autocast (and a GradScaler for fp16, saved in the checkpoint):
    a resumed run is the uninterrupted run; the numbers differ from fp32."""
    cfg = tiny(data_dir, epochs=2, amp=amp)
    full = train_run(cfg, "sam", 0)
    assert full.completed and math.isfinite(full.final["test_loss"])
    assert full.final["train_loss"] != train_run(cfg.replace(amp="off"), "sam", 0).final["train_loss"]
    ckpt = tmp_path / "run.pt"
    train_run(cfg, "sam", 0, checkpoint=ckpt, stop_after=1)
    same_numbers(full, train_run(cfg, "sam", 0, checkpoint=ckpt, resume=True))
    plain = train_run(cfg, "sgd", 0)  # the plain baseline under the same precision
    assert plain.completed and math.isfinite(plain.final["test_loss"])


def test_m_sharpness_and_amp_errors(data_dir: str) -> None:
    with pytest.raises(ConfigError, match="--m-sharpness must be >= 1, got 0"):
        tiny(data_dir, m_sharpness=0)
    with pytest.raises(ConfigError, match="--amp must be off, bf16 or fp16, got 'fp8'"):
        tiny(data_dir, amp="fp8")
