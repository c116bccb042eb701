"""One training run: a configuration, a method and a seed.

``train_run(cfg, "sam:rho=0.3", seed=0)`` returns a :class:`RunResult`
whose ``history`` holds one row of metrics per epoch; the ``compare``
command prints and writes exactly these numbers.

Reproducibility: a seed fixes the initial weights (the same for every
method), the label noise, the data order (``DistributedSampler`` seeded per
epoch), the augmentation and dropout (generators seeded per epoch and
rank). On the CPU with ``deterministic=True`` two runs agree bit for bit,
and so does a run resumed from a checkpoint: one is written (atomically)
after every epoch with the model, the optimizer (its ``state_dict`` holds
every state of a sharpness-aware method), the LR scheduler, the RNG states
and the history so far.

Metrics of a row (accuracies in %):

``train_loss``/``train_acc``
    mean loss and accuracy of the clean passes of the epoch, against the
    labels trained on (noisy), with label smoothing;
``test_loss``/``test_acc``
    cross-entropy and accuracy on the (clean) test set, in eval mode;
``train_clean_acc``
    accuracy on the training inputs against their *clean* labels;
``train_fit_acc``
    accuracy on the training inputs against the labels trained on;
``memorised``
    share of the corrupted training examples predicted with their wrong
    label (None without label noise);
``gap``
    generalization gap, ``train_fit_acc - test_acc``;
``epoch_seconds``/``steps_per_sec``
    wall time of the epoch's optimizer steps (evaluation excluded);
``passes_per_step``
    forward/backward passes (closure calls) per optimizer step: 1 for a
    plain optimizer, 2 for SAM, less for methods that skip the second pass.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data.distributed import DistributedSampler

import flatminima

from .augment import augment
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RESUME_FREE, ExperimentConfig
from .data import Dataset, load_dataset
from .distributed import DistInfo, dist_info, resolve_device
from .errors import ConfigError, ExperimentError, MethodFailed
from .methods import Method, build_optimizer, optimizer_settings, resolve_methods
from .models import build_model, count_parameters, resolve_model_name
from .noise import corrupt_labels
from .resume import check_progress, load_optimizer_and_schedule, restore_model_and_rng

SEED_INIT, SEED_ORDER, SEED_AUGMENT, SEED_DROPOUT = 1, 2, 3, 4


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from integers (independent streams per purpose)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)[0]
    return int(state) & 0x7FFFFFFF


# --------------------------------------------------------------------------- results
@dataclass
class RunResult:
    label: str
    method: str
    seed: int
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)
    completed: bool = False
    extras: dict[str, Any] = field(default_factory=dict)  # from metric hooks (e.g. sharpness)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's metrics, the run's mean steps per second and the extras."""
        if not self.history:
            return dict(self.extras)
        out = dict(self.history[-1])
        seconds = sum(r["epoch_seconds"] for r in self.history)
        out["train_seconds"] = seconds
        out["steps_per_sec"] = out["steps"] / seconds if seconds > 0 else math.nan
        out.update(self.extras)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "method": self.method, "seed": self.seed, "epochs": self.epochs,
            "completed": self.completed, "final": self.final, "extras": self.extras, "info": self.info,
            "history": self.history,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunResult:
        return cls(d["label"], d["method"], d["seed"], d["epochs"], list(d["history"]), d["completed"],
                   dict(d.get("extras", {})), dict(d.get("info", {})))


@dataclass
class RunContext:
    """What a metric hook sees at the end of a run."""

    config: ExperimentConfig
    method: Method
    seed: int
    data: Dataset
    train_labels: Tensor  # the (noisy) labels trained on
    corrupted: Tensor
    device: torch.device
    loss_fn: nn.Module


#: ``hook(model, ctx) -> {"column": value}``: extra final metrics of a run
#: (e.g. sharpness); each key becomes a column of the compare table.
MetricHook = Callable[[nn.Module, RunContext], Mapping[str, float]]

#: ``callback(event)``: the metrics of a run as they happen, one dict per
#: event (see :func:`train_run`): ``{"event": "step", ...}`` after every
#: optimizer step, ``{"event": "epoch", ...}`` with the epoch's row, and
#: ``{"event": "end", ...}`` with the final extras. Called in the main process only.
Callback = Callable[[dict[str, Any]], None]


class Reporter(Protocol):
    def run_start(self, result: RunResult, steps_per_epoch: int, start_epoch: int) -> None: ...
    def step(self, epoch: int, step: int, loss: float, acc: float) -> None: ...
    def epoch_end(self, row: Mapping[str, Any]) -> None: ...
    def run_end(self, result: RunResult) -> None: ...


# --------------------------------------------------------------------------- pieces
def lr_factor(total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine down to ``min_ratio`` (or constant).

    >>> f = lr_factor(100, 10, "cosine", 0.0)
    >>> [round(f(step), 3) for step in (0, 9, 10, 55, 99)]
    [0.1, 1.0, 1.0, 0.5, 0.0]
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, x: Tensor, labels: Tensor | None, batch_size: int) -> tuple[Tensor, float]:
    """Predicted classes of ``x`` and the mean cross-entropy against ``labels`` (eval mode)."""
    was_training = model.training
    model.eval()
    preds, loss = [], 0.0
    for i in range(0, len(x), batch_size):
        out = model(data.prepare(x[i : i + batch_size])).float()
        preds.append(out.argmax(1))
        if labels is not None:
            loss += F.cross_entropy(out, labels[i : i + batch_size], reduction="sum").item()
    model.train(was_training)
    return torch.cat(preds), loss / max(1, len(x))


def evaluate(model: nn.Module, data: Dataset, x_train: Tensor, y_noisy: Tensor, corrupted: Tensor,
             x_test: Tensor, batch_size: int) -> dict[str, Any]:
    """Test loss/accuracy and the training-set accuracies of a row (see the module docstring)."""
    y_test = data.y_test.to(x_test.device)
    y_clean = data.y_train.to(x_train.device)
    test_pred, test_loss = predict(model, data, x_test, y_test, batch_size)
    train_pred, _ = predict(model, data, x_train, None, batch_size)

    def pct(hits: Tensor) -> float:
        return 100.0 * int(hits.sum()) / hits.numel() if hits.numel() else math.nan

    test_acc = pct(test_pred == y_test)
    fit = pct(train_pred == y_noisy)
    return {
        "test_loss": test_loss,
        "test_acc": test_acc,
        "train_clean_acc": pct(train_pred == y_clean),
        "train_fit_acc": fit,
        "memorised": pct(train_pred[corrupted] == y_noisy[corrupted]) if bool(corrupted.any()) else None,
        "gap": fit - test_acc,
    }


@contextmanager
def torch_settings(cfg: ExperimentConfig, device: torch.device) -> Iterator[None]:
    """Threads and deterministic algorithms for the run; restored afterwards."""
    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # On CUDA some kernels have no deterministic version: warn, don't fail.
            torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1], warn_only=prev[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[3], prev[4]


def run_fingerprint(cfg: ExperimentConfig, method: Method, seed: int, info: DistInfo) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE | {"methods", "seeds"}}
    return {"label": method.label, "seed": int(seed), "world_size": info.world_size, "config": config}


def noisy_labels(data: Dataset, cfg: ExperimentConfig, seed: int) -> tuple[Tensor, Tensor]:
    """The labels trained on and the mask of corrupted ones (the test labels are untouched)."""
    if cfg.noise > 0:
        return corrupt_labels(data.y_train, cfg.noise, cfg.noise_type, data.num_classes, seed, dataset=data.name)
    return data.y_train.clone(), torch.zeros(len(data.y_train), dtype=torch.bool)


def _autocast(amp: str, device: torch.device) -> Callable[[], Any]:
    """The forward's precision context for ``--amp``."""
    if amp == "off":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _chunks(x: Tensor, y: Tensor, m: int | None) -> list[tuple[Tensor, Tensor]]:
    """The batch as chunks of ``m`` samples for m-sharpness (one chunk without ``m``)."""
    if m is None or m >= len(y):
        return [(x, y)]
    return list(zip(x.split(m), y.split(m)))


def _plain_step(opt: torch.optim.Optimizer, closure: Callable[[], Tensor], scaler: Any) -> None:
    """A base optimizer's step (the plain baselines), with the GradScaler's protocol under fp16."""
    if scaler is None:
        # torch's stub types the closure as returning float; returning the loss
        # tensor is the documented usage (torch.optim's own optimizers accept it).
        opt.step(closure)  # type: ignore[arg-type]
        return
    closure()
    scaler.step(opt)
    scaler.update()


class _Sized(TorchDataset[int]):
    """A stand-in data set of ``n`` items: DistributedSampler only needs its length."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def closure_form(method: Method) -> str:
    """How the optimizer wants its closure: ``"loss"`` (PyTorch's form: zero
    the gradients, forward, backward, return the loss) or ``"per_sample"``
    (``closure(indices=None)`` returns the unreduced losses of the batch, or
    of the samples ``indices``, and the optimizer runs backward). Read from
    the method's registry record (:attr:`flatminima.registry.MethodSpec.closure`)."""
    if method.plain:
        return "loss"
    form = flatminima.get_method(method.name).closure
    if form not in ("loss", "per_sample"):
        raise ExperimentError(f"method {method.name!r} declares an unknown closure form {form!r}")
    return form


def model_from_info(info: Mapping[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """The (untrained) model described by a checkpoint's ``model_info``, on
    ``device``; one too large to allocate is a :class:`ConfigError`."""
    try:
        return build_model(info["model"], info["input_shape"], info["num_classes"], dataset=info["dataset"],
                           width=info["width"], depth=info["depth"], dropout=info["dropout"]).to(device)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        # Built from checked settings, a model fails for its size: a tensor too large to allocate
        # ("can't allocate memory"), or one whose size overflows.
        shape = ", ".join(f"{k} {info[k]}" for k in ("width", "depth") if info.get(k) is not None)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot build the model {info['model']}{f' ({shape})' if shape else ''} on {device}, too "
                          f"large for its memory ({why}); give a smaller --width or --depth") from None


def load_data(cfg: ExperimentConfig) -> Dataset:
    return load_dataset(cfg.dataset, cfg.data_dir, num_samples=cfg.num_samples,
                        train_size=cfg.train_size, test_size=cfg.test_size)


# --------------------------------------------------------------------------- the run
def train_run(
    cfg: ExperimentConfig,
    method: Method | str,
    seed: int,
    *,
    data: Dataset | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    reporter: Reporter | None = None,
    metric_hooks: Sequence[MetricHook] = (),
    callback: Callback | None = None,
) -> RunResult:
    """Train one model; see the module docstring.

    Args:
        cfg: the settings (``cfg.methods``/``cfg.seeds`` are not used here).
        method: a :class:`Method` or its text (``"sam:rho=0.3"``, ``"sgd"``).
        seed: the seed of the run.
        data: the data set (loaded from ``cfg`` when None).
        checkpoint: file written after every epoch (rank 0), atomically.
        resume: continue from ``checkpoint`` when it exists.
        stop_after: stop once this many epochs are done (as if interrupted;
            the result has ``completed=False``); resume later.
        reporter: progress callbacks.
        metric_hooks: extra final metrics, computed once training is done.
        callback: called (in the main process) with a dict per event, each
            with ``event``, ``label``, ``method`` and ``seed``:

            * ``"step"``, after every optimizer step: ``epoch`` (from 1),
              ``batch`` (from 1 in the epoch), ``step`` (optimizer steps so
              far), ``lr`` (the step's learning rate), ``loss`` and ``acc``
              (the batch's clean pass, against the labels trained on, acc in
              %), ``passes`` (forward/backward passes of the step; under
              torchrun the values of the main process's shard);
            * ``"epoch"``, after every epoch: the row that ``history`` gets;
            * ``"end"``, once the run is complete: ``epochs`` and ``extras``
              (the metric hooks' values).
    """
    if isinstance(method, str):
        method = resolve_methods(cfg.replace(methods=[method]))[0]
    info = dist_info()
    device = resolve_device(cfg.device, info)
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({info.world_size})")
    if data is None:
        data = load_data(cfg)
    result = RunResult(method.label, method.name, int(seed), cfg.epochs)
    with torch_settings(cfg, device):
        y_noisy, corrupted = noisy_labels(data, cfg, seed)
        torch.manual_seed(derive_seed(seed, SEED_INIT))  # the same initial weights for every method
        model_info = {"model": resolve_model_name(cfg.model, data.name), "input_shape": list(data.input_shape),
                      "num_classes": data.num_classes, "dataset": data.name, "width": cfg.width,
                      "depth": cfg.depth, "dropout": cfg.dropout}
        model = model_from_info(model_info, device)
        net: nn.Module = model
        if info.enabled:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = build_optimizer(method, model, cfg, module=net)
        autocast = _autocast(cfg.amp, device)
        scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
        loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

        x_train, x_test = data.x_train.to(device), data.x_test.to(device)
        y_noisy_d, corrupted_d = y_noisy.to(device), corrupted.to(device)
        sampler: DistributedSampler[int] = DistributedSampler(
            _Sized(len(x_train)), num_replicas=info.world_size, rank=info.rank,
            shuffle=True, seed=derive_seed(seed, SEED_ORDER), drop_last=False,
        )
        local_batch = cfg.batch_size // info.world_size
        n_local = len(sampler)
        steps_per_epoch = math.ceil(n_local / local_batch)
        drop_tail = steps_per_epoch > 1 and n_local % local_batch == 1  # a batch of 1 breaks BatchNorm
        steps_per_epoch -= int(drop_tail)
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_factor(cfg.epochs * steps_per_epoch, warmup, cfg.schedule,
                           cfg.min_lr / optimizer_settings(method, cfg)[1]["lr"])
        )
        result.info = {"model_info": model_info, "device": str(device), "world_size": info.world_size, "parameters": count_parameters(model),
                       "model": type(model).__name__, "steps_per_epoch": steps_per_epoch,
                       "train_examples": len(x_train), "test_examples": len(x_test),
                       "corrupted": int(corrupted.sum()), "threads": torch.get_num_threads()}

        fingerprint = run_fingerprint(cfg, method, seed, info)
        start_epoch, steps = 0, 0
        if resume and checkpoint is not None and Path(checkpoint).is_file():
            state = load_checkpoint(checkpoint)
            if state.get("run") != fingerprint:
                raise ExperimentError(f"checkpoint {checkpoint} belongs to another run or other settings; "
                                      "remove it or resume with the settings it was written with")
            start_epoch, steps = check_progress(state, checkpoint, cfg.epochs, steps_per_epoch)
            load_optimizer_and_schedule(opt, sched, state, checkpoint, steps)
            restore_model_and_rng(model, scaler, state, checkpoint, device)
            result.history = list(state["history"])

        if stop_after is not None and start_epoch >= stop_after and start_epoch < cfg.epochs:
            return result  # already as far as asked
        if reporter is not None:
            reporter.run_start(result, steps_per_epoch, start_epoch)
        log_every = max(1, steps_per_epoch // 25)
        emit = callback if callback is not None and info.is_main else None
        who = {"label": method.label, "method": method.name, "seed": int(seed)}
        form = closure_form(method)
        # build_optimizer gives a sharpness-aware method a flatminima optimizer
        # (its step takes scaler= and chunks=), a plain one a torch optimizer.
        sam_opt = cast(flatminima.SharpnessAware, opt) if method.sharpness_aware else None
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            order = torch.tensor(list(iter(sampler)), dtype=torch.long)
            batches = list(order.split(local_batch))[:steps_per_epoch]
            gen = torch.Generator().manual_seed(derive_seed(seed, SEED_AUGMENT, epoch, info.rank))
            torch.manual_seed(derive_seed(seed, SEED_DROPOUT, epoch, info.rank))
            model.train()
            stats = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, hits
            seen = 0
            passes: list[float] = [0]  # forward/backward passes (closure calls) this epoch
            _sync(device)
            t0 = time.perf_counter()
            for b, idx in enumerate(batches):
                idx = idx.to(device)
                xb, yb = data.prepare(x_train[idx]), y_noisy_d[idx]
                if cfg.augment:
                    xb = augment(xb, data.augmentation, gen)
                chunks = _chunks(xb, yb, cfg.m_sharpness if method.sharpness_aware else None)
                recorded: set[int] = set()

                def record(i: int, out: Tensor, loss: Tensor, n: int) -> None:
                    if i not in recorded:  # the chunk's clean pass (a sharpness-aware step calls it again)
                        recorded.add(i)
                        with torch.no_grad():
                            stats[0] += loss.detach().double() * n
                            stats[1] += (out.argmax(1) == chunks[i][1]).sum()

                def closure(i: int = 0) -> Tensor:
                    passes[0] += len(chunks[i][1]) / len(yb)  # a chunk's pass counts its share of the batch
                    opt.zero_grad(set_to_none=True)
                    xs, ys = chunks[i]
                    with autocast():
                        out = net(xs)
                        loss = loss_fn(out.float(), ys)
                    (loss if scaler is None else scaler.scale(loss)).backward()
                    record(i, out, loss, len(ys))
                    return loss

                def per_sample_closure(i: int = 0, indices: Tensor | None = None) -> Tensor:
                    passes[0] += len(chunks[i][1]) / len(yb)
                    xs, ys = chunks[i]
                    if indices is not None:
                        xs, ys = xs[indices], ys[indices]
                    with autocast():
                        out = net(xs)
                        losses = F.cross_entropy(out.float(), ys, reduction="none", label_smoothing=cfg.label_smoothing)
                    if indices is None:
                        record(i, out, losses.mean(), len(ys))
                    return losses

                def batch_per_sample_closure(indices: Tensor | None = None) -> Tensor:
                    return per_sample_closure(0, indices)

                fn = per_sample_closure if form == "per_sample" else closure
                if emit is not None:  # the batch's numbers are the step's change of the running sums
                    before, passes_before, lr_now = stats.tolist(), passes[0], opt.param_groups[0]["lr"]
                try:
                    if sam_opt is None:
                        _plain_step(opt, closure, scaler)
                    elif len(chunks) > 1:
                        sam_opt.step(fn, scaler=scaler, chunks=len(chunks))
                    else:
                        sam_opt.step(closure if form == "loss" else batch_per_sample_closure, scaler=scaler)
                except (ValueError, TypeError) as e:
                    if b == 0 and epoch == start_epoch:  # a method that cannot run with these settings
                        raise MethodFailed(f"method {method.label!r} failed at its first step: {e}") from e
                    raise
                sched.step()
                steps += 1
                seen += len(yb)
                if emit is not None:
                    after = stats.tolist()
                    emit({"event": "step", **who, "epoch": epoch + 1, "batch": b + 1, "step": steps, "lr": lr_now,
                          "loss": (after[0] - before[0]) / len(yb), "acc": 100.0 * (after[1] - before[1]) / len(yb),
                          "passes": passes[0] - passes_before})
                if reporter is not None and ((b + 1) % log_every == 0 or b + 1 == len(batches)):
                    s = stats.tolist()
                    reporter.step(epoch + 1, b + 1, s[0] / seen, 100.0 * s[1] / seen)
            _sync(device)
            seconds = time.perf_counter() - t0
            if info.enabled:
                totals = torch.tensor([stats[0].item(), stats[1].item(), float(seen)], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(totals)
                loss_sum, hits, seen = totals.tolist()
            else:
                loss_sum, hits = stats.tolist()
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": opt.param_groups[0]["lr"],
                "train_loss": loss_sum / seen,
                "train_acc": 100.0 * hits / seen,
            }
            row.update(evaluate(model, data, x_train, y_noisy_d, corrupted_d, x_test, cfg.eval_batch_size))
            row.update(epoch_seconds=seconds, steps=steps, steps_per_sec=len(batches) / seconds if seconds > 0 else math.nan,
                       passes_per_step=passes[0] / len(batches))
            for key in ("skipped_steps",):
                if hasattr(opt, key):
                    row[key] = int(getattr(opt, key))
            result.history.append(row)
            if checkpoint is not None and info.is_main:
                save_checkpoint(checkpoint, {
                    "run": fingerprint, "epoch": epoch + 1, "steps": steps, "history": result.history,
                    "label": method.label, "seed": int(seed), "config": cfg.to_dict(), "model_info": model_info,
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": None if scaler is None else scaler.state_dict(),
                    "rng": {"torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                })
            if reporter is not None:
                reporter.epoch_end(row)
            if emit is not None:
                emit({"event": "epoch", **who, **row})
            if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.epochs:
                return result  # completed=False: resume from the checkpoint
        result.completed = True
        if metric_hooks:
            ctx = RunContext(cfg, method, int(seed), data, y_noisy, corrupted, device, loss_fn)
            for hook in metric_hooks:
                result.extras.update({k: float(v) for k, v in hook(model, ctx).items()})
        if reporter is not None:
            reporter.run_end(result)
        if emit is not None:
            emit({"event": "end", **who, "epochs": cfg.epochs, "extras": dict(result.extras)})
    return result
