"""Data sets for the experiments, read from disk or generated locally.

Nothing is ever downloaded:

* ``mnist1d``: MNIST-1D (Greydanus 2020) *generated* with
  ``mnist1d.data.make_dataset`` and the package's default arguments (only
  ``num_samples`` changes), then cached as ``.npz`` in the data folder
  (``--data-dir``, else ``$FLATMINIMA_DATA``, else
  ``$XDG_CACHE_HOME/flatminima`` or ``~/.cache/flatminima``).
* ``digits``: scikit-learn's bundled 8x8 digits (1797 images), split 80/20
  with a fixed stratified split.
* ``cifar10`` / ``cifar100``: the python-pickle version of CIFAR (read through an unpickler that allows
  only what those batches hold: a crafted file cannot run code), read from
  ``--data-dir`` (the extracted ``cifar-10-batches-py`` / ``cifar-100-python``
  folder, or a folder that contains it); or the binary version
  (``cifar-10-batches-bin`` / ``cifar-100-binary``, no pickle at all: see
  :mod:`.cifar_binary`).

``load_dataset(name, ...)`` returns a :class:`Dataset` with clean labels;
label noise is added by :mod:`flatminima.experiments.noise`.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor

from . import cifar_binary
from .checkpoint import atomic_write
from .errors import ConfigError, DataError

DATASETS = ("mnist1d", "digits", "cifar10", "cifar100")

# Per-channel statistics of the CIFAR training sets (on [0, 1] pixels).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclass
class Dataset:
    """A train/test split held in memory, with the *clean* training labels.

    ``x_*`` are float32 tensors already normalised, or uint8 images
    ``(N, C, H, W)`` that :meth:`prepare` converts batch by batch (so that
    CIFAR stays 150 MB instead of 600 MB).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    augmentation: str = "none"  # "shift" (1-D signals), "crop", "crop+flip" (images)
    mean: tuple[float, ...] | None = None  # applied by prepare() to uint8 images
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def prepare(self, x: Tensor) -> Tensor:
        """A batch as the model's float input (on ``x``'s device)."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
            if self.mean is not None:
                shape = (1, -1) + (1,) * (x.dim() - 2)
                mean = torch.tensor(self.mean, device=x.device).view(shape)
                std = torch.tensor(self.std, device=x.device).view(shape)
                x = (x - mean) / std
        return x

    def subset(self, train_size: int | None = None, test_size: int | None = None) -> Dataset:
        """The first ``train_size`` training and ``test_size`` test examples."""
        out = self
        if train_size is not None and train_size < len(self.y_train):
            out = replace(out, x_train=out.x_train[:train_size], y_train=out.y_train[:train_size])
        if test_size is not None and test_size < len(self.y_test):
            out = replace(out, x_test=out.x_test[:test_size], y_test=out.y_test[:test_size])
        return out

    def describe(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test examples, inputs {shape}, "
                f"{self.num_classes} classes")


def default_data_dir() -> Path:
    """Where generated data (MNIST-1D) is cached when no ``--data-dir`` is given."""
    env = os.environ.get("FLATMINIMA_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "flatminima"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    num_samples: int = 10000,
    train_size: int | None = None,
    test_size: int | None = None,
) -> Dataset:
    """Load (or generate) a data set by name; see the module docstring."""
    if name == "mnist1d":
        data = load_mnist1d(num_samples, data_dir)
    elif name == "digits":
        data = load_digits()
    elif name in ("cifar10", "cifar100"):
        data = load_cifar(name, data_dir)
    else:
        raise ConfigError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return data.subset(train_size, test_size)


# --------------------------------------------------------------------------- MNIST-1D
def mnist1d_args(num_samples: int) -> dict:
    """``mnist1d``'s default generation arguments with ``num_samples`` set."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # where get_dataset() would download from; unused
    args["num_samples"] = int(num_samples)
    return args


def _import_mnist1d():
    # mnist1d imports matplotlib.pyplot; the backend is left to the caller (pyplot
    # picks one only when a figure is made, Agg without a display), and the
    # `flatminima` command sets Agg for its own process (cli.main).
    try:
        from mnist1d import data as mnist1d_data
    except ImportError as e:
        raise DataError(
            f"MNIST-1D is generated by the mnist1d package, which could not be imported ({e}); "
            "install the extra: pip install 'flatminima[cli]'"
        ) from None
    return mnist1d_data


def generate_mnist1d(num_samples: int) -> dict[str, np.ndarray]:
    """Generate MNIST-1D with ``mnist1d.data.make_dataset`` (never ``get_dataset``,
    which downloads). The generator seeds numpy's and Python's global RNGs;
    their states are restored afterwards."""
    mnist1d_data = _import_mnist1d()
    from mnist1d.utils import ObjectView

    args = mnist1d_args(num_samples)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = mnist1d_data.make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "args": np.array(json.dumps(args, sort_keys=True)),
        "x": d["x"].astype(np.float32),
        "y": d["y"].astype(np.int64),
        "x_test": d["x_test"].astype(np.float32),
        "y_test": d["y_test"].astype(np.int64),
    }


def load_mnist1d(num_samples: int = 10000, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """MNIST-1D with ``num_samples`` examples (80% train, 20% test), cached on disk."""
    if not isinstance(num_samples, int) or num_samples < 20:
        raise ConfigError(f"--num-samples must be an integer >= 20, got {num_samples!r}")
    folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    # Keyed by the package version (cheap to read; importing mnist1d takes
    # over a second): the generator and its default arguments come with it.
    try:
        from importlib.metadata import version

        tag = version("mnist1d")
    except Exception:
        tag = "unknown"
    path = folder / f"mnist1d_{num_samples}_v{tag}.npz"
    arrays = None
    if path.is_file():
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception as e:  # a damaged cache: regenerate it
            warnings.warn(f"ignoring unreadable MNIST-1D cache {path} ({e}); regenerating it", stacklevel=2)
    if arrays is None:
        arrays = generate_mnist1d(num_samples)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_savez(path, arrays)
        except OSError as e:
            warnings.warn(f"could not cache MNIST-1D in {folder} ({e}); it will be generated again next time", stacklevel=2)
    return Dataset(
        "mnist1d",
        torch.from_numpy(arrays["x"]),
        torch.from_numpy(arrays["y"]),
        torch.from_numpy(arrays["x_test"]),
        torch.from_numpy(arrays["y_test"]),
        num_classes=10,
        augmentation="shift",
        source=f"generated by mnist1d.data.make_dataset (default args, num_samples={num_samples}), cached in {path}",
    )


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # allow_pickle spelled out (its default) so the typed stubs do not read
    # ``**arrays`` as possibly binding it; atomic, with a checkpoint's permissions
    atomic_write(path, lambda f: np.savez(f, allow_pickle=True, **arrays))


# --------------------------------------------------------------------------- digits
def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, standardised, fixed stratified 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DataError(f"the digits data set comes with scikit-learn, which could not be imported ({e}); "
                        "install the extra: pip install 'flatminima[cli]'") from None
    d = sk_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return Dataset(
        "digits",
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
        num_classes=10,
        augmentation="crop",
        source="sklearn.datasets.load_digits (bundled), stratified 80/20 split, random_state=0",
    )


# --------------------------------------------------------------------------- CIFAR
class _CifarSpec(TypedDict):
    title: str
    folder: str
    archive: str
    train: list[str]
    test: list[str]
    meta: str
    label_key: str
    names_key: str
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_CIFAR: dict[str, _CifarSpec] = {
    "cifar10": _CifarSpec(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ),
    "cifar100": _CifarSpec(
        title="CIFAR-100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=["train"],
        test=["test"],
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    ),
}


def cifar_files(name: str) -> list[str]:
    """The files the python-pickle layout of ``name`` holds."""
    spec = _CIFAR[name]
    return [*spec["train"], *spec["test"], spec["meta"]]


def find_cifar_dir(name: str, data_dir: str | os.PathLike[str] | None) -> Path:
    """The folder holding the CIFAR pickles (or, failing them, the binary
    batches): ``data_dir`` itself or its standard sub-folder; a clear
    :class:`DataError` otherwise."""
    spec = _CIFAR[name]
    layout = (
        f"the python version of {spec['title']} as extracted from {spec['archive']}: "
        f"{', '.join(cifar_files(name))}"
    )
    if data_dir is None:
        raise DataError(f"{spec['title']} is read from a local folder (nothing is downloaded): "
                        f"give --data-dir, a folder holding {layout}")
    binary = cifar_binary.LAYOUTS[name]
    layout += f"; or the binary version from {binary.archive}: {', '.join(binary.files)}"
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{spec['title']}: data folder {root} does not exist; it must hold {layout}")
    for files, sub in ((cifar_files(name), spec["folder"]), (binary.files, binary.folder)):
        for folder in (root, root / sub):
            if all((folder / f).is_file() for f in files):
                return folder
    # Report against the folder that looks most like the right one.
    folder = root / spec["folder"] if (root / spec["folder"]).is_dir() else root
    if (root / binary.folder).is_dir() or any((root / f).is_file() for f in binary.files):
        folder = root / binary.folder if (root / binary.folder).is_dir() else root
        missing = [f for f in binary.files if not (folder / f).is_file()]
    else:
        missing = [f for f in cifar_files(name) if not (folder / f).is_file()]
    raise DataError(f"{spec['title']}: folder {folder} is missing {', '.join(missing)}; it must hold {layout}")


class _CifarUnpickler(pickle.Unpickler):
    """Reads what the official CIFAR python batches hold (dicts, lists, bytes,
    str, ints, numpy arrays) and nothing else: a pickle naming any other
    callable is refused before anything of it runs (a data folder is not
    trusted code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds; refused")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            raw = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise DataError(f"cannot read {path}: not a CIFAR python pickle ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"cannot read {path}: expected a pickled dict, found {type(raw).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in raw.items()}


def _read_cifar_part(path: Path, label_key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    for key in ("data", label_key):
        if key not in d:
            raise DataError(f"{path} has no {key!r} entry (found {', '.join(sorted(d)) or 'nothing'})")
    x = np.asarray(d["data"])
    labels = d[label_key]
    # Read as they are, not cast: numpy would turn "3", b"3" or 3.7 into the label 3 without a word.
    y = np.asarray(labels) if isinstance(labels, (list, tuple, np.ndarray)) else np.asarray([labels], dtype=object)
    if y.dtype.kind not in "iu" and y.size:
        first = y.flat[0].item() if isinstance(y.flat[0], np.generic) else y.flat[0]
        raise DataError(f"{path}: {label_key!r} must be a list of integer class indices, found {first!r} "
                        f"({type(first).__name__}); replace the file with the one from the official archive")
    y = y.astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {x.dtype} {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{path} holds no images; a CIFAR batch holds thousands: replace it with the one from the "
                        "official archive")
    if y.shape != (x.shape[0],):
        raise DataError(f"{path}: {x.shape[0]} images but {y.size} labels")
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"{path}: labels must lie in [0, {classes - 1}], found {y.min()}..{y.max()}")
    return x.reshape(-1, 3, 32, 32), y


def load_cifar(name: str, data_dir: str | os.PathLike[str] | None) -> Dataset:
    """CIFAR-10 or CIFAR-100 from the python-pickle or the binary layout in ``data_dir``."""
    spec = _CIFAR[name]
    folder = find_cifar_dir(name, data_dir)
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if all((folder / f).is_file() for f in cifar_files(name)):
        for split in ("train", "test"):
            xs, ys = zip(*(_read_cifar_part(folder / f, spec["label_key"], spec["classes"]) for f in spec[split]))
            parts[split] = (np.concatenate(xs), np.concatenate(ys))
        meta = _unpickle(folder / spec["meta"])
        names = meta.get(spec["names_key"])
        class_names = None
        if isinstance(names, (list, tuple)) and len(names) == spec["classes"]:
            class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        kind = "python pickles"
    else:  # find_cifar_dir found the binary version
        binary = cifar_binary.LAYOUTS[name]
        for split, files in (("train", binary.train), ("test", binary.test)):
            xs, ys = zip(*(cifar_binary.read_part(folder / f, binary, spec["classes"]) for f in files))
            parts[split] = (np.concatenate(xs), np.concatenate(ys))
        class_names = cifar_binary.read_names(folder / binary.names, spec["classes"])
        kind = "binary batches"
    return Dataset(
        name,
        torch.from_numpy(parts["train"][0]),
        torch.from_numpy(parts["train"][1]),
        torch.from_numpy(parts["test"][0]),
        torch.from_numpy(parts["test"][1]),
        num_classes=spec["classes"],
        augmentation="crop+flip",
        mean=spec["mean"],
        std=spec["std"],
        class_names=class_names,
        source=f"{spec['title']} {kind} in {folder}",
    )
