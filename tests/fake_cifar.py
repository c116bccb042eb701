"""A tiny fake CIFAR folder for the tests: random pixels and labels in the
layouts the loader reads (flatminima.experiments.data, .cifar_binary)."""

from __future__ import annotations

from typing import Any


def cifar_both_layouts(root: Any, name: str, per_file: int = 3) -> tuple[Any, Any]:
    """The same random images and labels written in CIFAR's python layout and
    in its binary layout (CIFAR-100 records: coarse label, fine label, pixels)."""
    import pickle

    import numpy as np

    from flatminima.experiments.cifar_binary import LAYOUTS
    from flatminima.experiments.data import cifar_files

    classes, key = (10, b"labels") if name == "cifar10" else (100, b"fine_labels")
    binary = LAYOUTS[name]
    py_dir, bin_dir = root / "py", root / binary.folder
    py_dir.mkdir()
    bin_dir.mkdir()
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(classes)]
    py_batches = [f for f in cifar_files(name) if "meta" not in f]
    for py_name, bin_name in zip(py_batches, [*binary.train, *binary.test]):
        x = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        y = rng.integers(0, classes, per_file)
        (py_dir / py_name).write_bytes(pickle.dumps({b"data": x, key: y.tolist()}))
        labels = [y[:, None] // 5, y[:, None]] if name == "cifar100" else [y[:, None]]
        (bin_dir / bin_name).write_bytes(np.concatenate([*labels, x], axis=1).astype(np.uint8).tobytes())
    meta = "batches.meta" if name == "cifar10" else "meta"
    names_key = b"label_names" if name == "cifar10" else b"fine_label_names"
    (py_dir / meta).write_bytes(pickle.dumps({names_key: [n.encode() for n in names]}))
    (bin_dir / binary.names).write_text("\n".join(names) + "\n\n")
    return py_dir, bin_dir
