"""Why LookSAM and ESAM fall behind in the study (RESULTS.md, "The study"): ``python -m benchmarks.study_checks``.

The study runs every method at its paper's defaults and tunes only the radius. Two of them lose
badly on MNIST-1D with the CNN, and this script checks that the cause is the method's setting, not
this library:

1. LookSAM (``alpha = 0.7``, ``k = 5``), clean labels: ours against pytorch_optimizer's independent
   LookSAM (its per-tensor form, used as its documentation shows) in the same loop, and both at
   ``alpha = 0.1``. The reuse step adds ``alpha ||g|| / ||g_v|| g_v``, a push of 0.7 times the
   gradient's norm along a direction up to k steps old, whatever the radius.
2. ESAM (``beta = 0.5``, ``gamma = 0.5``), 20% symmetric noise, the study's seed 1, through the
   study's own configuration (the same data order, noisy labels and initial weights): the paper's
   setting, without the data selection (``gamma = 1``) and without the random tensor subset
   (``beta = 1``). The selection keeps the samples whose loss rises most at ``w + eps``.

About 2 minutes on one core.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from ._env import flatminima  # noqa: F401  (falls back to src/ when not installed)
import flatminima
from flatminima.experiments import compare
from flatminima.experiments.data import Dataset, load_dataset
from flatminima.experiments.models import build_model
from flatminima.experiments.study import NOISES, PRESETS


def _looksam_run(data: Dataset, kind: str, alpha: float, epochs: int, seed: int = 0) -> tuple[float, float]:
    """Test and train accuracy (%) of one LookSAM run on clean MNIST-1D with the CNN; ``kind``:
    "sgd", "flatminima", "flatminima layerwise" or "pytorch_optimizer"."""
    import pytorch_optimizer as po

    x_all, y_all = data.x_train, data.y_train
    torch.manual_seed(seed)
    model = build_model("cnn1d", tuple(x_all.shape[1:]), 10, dataset="mnist1d")
    sgd: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    opt: Any
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), **sgd)
    elif kind == "pytorch_optimizer":
        opt = po.LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5, alpha=alpha, **sgd)
    else:
        opt = flatminima.create("looksam", model.parameters(), torch.optim.SGD, rho=0.05, k=5, alpha=alpha,
                                layerwise=kind.endswith("layerwise"), model=model, **sgd)
    order = torch.Generator().manual_seed(seed)
    steps, t = epochs * math.ceil(len(x_all) / 128), 0
    for _ in range(epochs):
        perm = torch.randperm(len(x_all), generator=order)
        for i in range(0, len(x_all), 128):
            x, y = x_all[perm[i:i + 128]], y_all[perm[i:i + 128]]
            for group in opt.param_groups:  # cosine, as in the study
                group["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * t / steps))
            t += 1

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if kind == "sgd":
                closure()
                opt.step()
            elif kind == "pytorch_optimizer":
                closure()  # its documented use: the clean pass, then step(closure)
                opt.step(closure)
            else:
                opt.step(closure)
    model.eval()
    with torch.no_grad():
        test = (model(data.x_test).argmax(1) == data.y_test).float().mean().item() * 100
        train = (model(x_all).argmax(1) == y_all).float().mean().item() * 100
    return test, train


def _esam_run(spec: str, seed: int, epochs: int) -> tuple[float, float, float]:
    """Test accuracy, train accuracy on the noisy labels and final training loss of one run of
    the study's "mnist1d-cnn, sym 20%" cell."""
    preset = PRESETS["full"]
    setup = next(s for s in preset.setups if s.name == "mnist1d-cnn")
    noise = next(n for n in NOISES if n.name == "sym 20%")
    cfg = preset.config(setup, noise, spec, seed)
    cfg.progress, cfg.epochs = "none", epochs
    result = compare(cfg, plots=False)
    final = result.runs[0].final
    return final["test_acc"], final["train_acc"], final["train_loss"]


def main(argv: list[str] | None = None) -> dict[str, list[tuple[str, float, float, float]]]:
    """Print both tables; return their rows (LookSAM: optimizer, alpha, test, train; ESAM: method,
    test, train, loss)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.study_checks", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20, help="epochs of every run (the study's: 20)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print("1. LookSAM, MNIST-1D CNN, clean labels, seed 0, rho 0.05, k 5, SGD(0.1, momentum 0.9, wd 5e-4), cosine")
    print(f"   {'optimizer':32s} {'alpha':>5s} {'test %':>7s} {'train %':>8s}")
    data = load_dataset("mnist1d", num_samples=10000)  # once: every LookSAM run trains on the same split
    runs = [("sgd", 0.0), ("flatminima", 0.7), ("flatminima layerwise", 0.7), ("pytorch_optimizer", 0.7),
            ("flatminima", 0.1), ("pytorch_optimizer", 0.1), ("flatminima", 0.0)]
    out: dict[str, list[tuple[str, float, float, float]]] = {"looksam": [], "esam": []}
    for kind, alpha in runs:
        test, train = _looksam_run(data, kind, alpha, a.epochs)
        out["looksam"].append((kind, alpha, test, train))
        print(f"   {kind:32s} {alpha if kind != 'sgd' else '-':>5} {test:7.1f} {train:8.1f}", flush=True)
    print("\n2. ESAM, the study's cell mnist1d-cnn, sym 20%, seed 1 (rho 0.05, the kept radius)")
    print(f"   {'method':32s} {'test %':>7s} {'train % (noisy)':>16s} {'train loss':>10s}")
    for spec in ("sgd", "esam:rho=0.05", "esam:rho=0.05,gamma=1.0", "esam:rho=0.05,beta=1.0"):
        test, train, loss = _esam_run(spec, 1, a.epochs)
        out["esam"].append((spec, test, train, loss))
        print(f"   {spec:32s} {test:7.1f} {train:16.1f} {loss:10.3f}", flush=True)
    print("\n   (a training loss of ln 10 = 2.303 is a model that predicts the uniform distribution)")
    return out


if __name__ == "__main__":
    main()
