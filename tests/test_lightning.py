"""PyTorch Lightning drives every method through ``optimizer.step(closure=...)``
(docs/lightning.md).

Lightning's automatic optimization builds a closure (training_step, zero_grad,
backward) and hands it to the optimizer's ``step``: our optimizer calls it for
the clean pass and again at ``w + eps``. Each test compares a Lightning run
with a plain loop that calls ``opt.step(closure)`` itself on the same batches
from the same weights, bit for bit, or pins down what Lightning does where it
departs from that loop (gradient clipping, fp16 with a GradScaler, logging,
manual optimization).

Driven by methods_db: every configuration in PyTorch's closure form (ESAM's
per-sample form cannot be written as a Lightning training_step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

import flatminima  # noqa: E402
from flatminima.lightning import SharpnessAwareMixedPrecision  # noqa: E402
from helpers import assert_tree_equal, batches, mlp, one_case_per_method, pre_pass, two_groups  # noqa: E402
from methods_db import CASES, Case  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
]
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

LOSS_CASES = [c for c in CASES if c.closure == "loss"]
PER_METHOD = one_case_per_method(LOSS_CASES)
DTYPE = torch.float64
STEPS = 5
BASE = {"lr": 0.1, "momentum": 0.9}


def build_optimizer(case: Case, net: nn.Module, model: nn.Module | None, **options: Any) -> flatminima.SharpnessAware:
    return flatminima.create(
        case.method, two_groups(net, **case.second_group), torch.optim.SGD, model=model, **BASE, **case.kwargs, **options
    )


class Schedule:
    """A case's schedule with the state_dict API that Lightning demands of
    every scheduler (methods_db has a hand-made one without it)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.optimizer = scheduler.optimizer

    def step(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if hasattr(self.scheduler, "state_dict") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.scheduler, "load_state_dict"):
            self.scheduler.load_state_dict(state)


class Net(pl.LightningModule):
    """The tests' LightningModule: ``helpers.mlp`` and a flatminima optimizer
    built with ``model=self``; the schedule (if any) steps every batch."""

    def __init__(
        self,
        case: Case,
        data: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        dtype: torch.dtype = DTYPE,
        batchnorm: bool = False,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        interval: str = "step",
        **options: Any,
    ) -> None:
        super().__init__()
        self.net = mlp(dtype, seed=0, batchnorm=batchnorm)
        self.case, self.data, self.options = case, data, options
        self.scheduler = scheduler if scheduler is not None else case.scheduler
        self.interval = interval
        self.opt: flatminima.SharpnessAware | None = None
        self.training_step_losses: list[float] = []  # one per training_step call
        self.steps_run: list[int] = []  # global_step at each batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.training_step_losses.append(loss.item())
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.steps_run.append(self.global_step)
        torch.manual_seed(self.global_step)  # as plain_run does before each step

    def configure_optimizers(self) -> Any:
        self.opt = build_optimizer(self.case, self.net, model=self, **self.options)
        if self.scheduler is None:
            return self.opt
        schedule = {"scheduler": Schedule(self.scheduler(self.opt)), "interval": self.interval}
        return {"optimizer": self.opt, "lr_scheduler": schedule}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.data, batch_size=None, num_workers=0)


def fit(
    module: pl.LightningModule, max_steps: int = STEPS, ckpt_path: str | None = None, **trainer_options: Any
) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "enable_progress_bar": False,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **trainer_options,
    }
    trainer = pl.Trainer(**options)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def plain_run(
    case: Case,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    dtype: torch.dtype = DTYPE,
    batchnorm: bool = False,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    with_model: bool = True,
    after_backward: Callable[[flatminima.SharpnessAware], None] | None = None,
    autocast: bool = False,
    **options: Any,
):
    """What Lightning's loop should amount to: ``opt.step(closure)`` per batch.
    Returns the model, the optimizer, the clean losses ``step`` returned and
    the loss of every closure call."""
    net = mlp(dtype, seed=0, batchnorm=batchnorm)
    opt = build_optimizer(case, net, model=net if with_model else None, **options)
    scheduler = scheduler if scheduler is not None else case.scheduler
    sched = scheduler(opt) if scheduler is not None else None
    returned, calls = [], []
    for i, (x, y) in enumerate(data):

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False, enabled=autocast):
                loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            if after_backward is not None:
                after_backward(opt)
            calls.append(loss.item())
            return loss

        torch.manual_seed(i)
        returned.append(opt.step(closure).item())
        if sched is not None:
            sched.step()
    return net, opt, returned, calls


def same_tensors(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    return all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------


def test_every_method_runs_under_lightning() -> None:
    """Every registered method has a configuration in PyTorch's closure form,
    so the tests below cover the whole registry."""
    assert {c.method for c in LOSS_CASES} == set(flatminima.list_methods())


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c.id)
def test_automatic_optimization_is_the_plain_loop(case: Case) -> None:
    data = batches(STEPS, DTYPE, size=16)
    module = Net(case, data)
    trainer = fit(module)
    net, opt, _, calls = plain_run(case, data)

    assert trainer.optimizers[0] is module.opt
    assert trainer.global_step == STEPS
    assert module.opt.counters == opt.counters
    assert module.opt.step_count == STEPS
    # Lightning runs training_step once per closure call: twice on a perturbed step
    assert module.training_step_losses == calls
    passes = 0 if pre_pass(case.method) else opt.perturbed_steps  # pre-pass: one call per step
    assert len(calls) == STEPS + passes
    assert same_tensors(module.net, net)
    assert_tree_equal(module.opt.state_dict(), opt.state_dict())


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_batchnorm_running_stats(case: Case) -> None:
    """With ``model=self`` the running statistics come from the clean pass alone,
    as in the plain loop with ``model=net``; without it they would differ."""
    data = batches(STEPS, DTYPE, size=16)
    module = Net(case, data, batchnorm=True)
    fit(module)
    net, opt, _, _ = plain_run(case, data, batchnorm=True)
    assert module.opt.counters == opt.counters
    assert same_tensors(module.net, net)  # weights and every buffer

    unguarded, _, _, _ = plain_run(case, data, batchnorm=True, with_model=False)
    # a pre-pass method's only pass gives the statistics, with or without model=
    assert torch.equal(unguarded[1].running_mean, net[1].running_mean) == pre_pass(case.method)


def step_lr(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_lr_scheduler_steps_our_optimizer(interval: str, recwarn: pytest.WarningsRecorder) -> None:
    """A scheduler over our optimizer, stepped by Lightning every batch or
    every epoch (one batch an epoch here, so both give the plain loop's run)."""
    case = PER_METHOD[0]
    data = batches(STEPS, DTYPE, size=16)
    module = Net(case, data[:1] if interval == "epoch" else data, scheduler=step_lr, interval=interval)
    trainer = fit(module)
    net, opt, _, _ = plain_run(case, data[:1] * STEPS if interval == "epoch" else data, scheduler=step_lr)

    scheduler = trainer.lr_scheduler_configs[0].scheduler.scheduler
    assert scheduler.optimizer is module.opt and scheduler.last_epoch == STEPS
    want = BASE["lr"] * 0.5 ** (STEPS // 2)
    assert [g["lr"] for g in module.opt.param_groups] == [want, want]
    assert [g["lr"] for g in module.opt.base_optimizer.param_groups] == [want, want]
    assert same_tensors(module.net, net)
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


MAX_NORM = 0.05  # below the gradient norms of these batches: clipping is active


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_max_grad_norm_through_lightning(case: Case) -> None:
    """The recommended clipping: flatminima's ``max_grad_norm=`` clips the
    final update direction once per step, as in the plain loop."""
    data = batches(STEPS, DTYPE, size=16)
    module = Net(case, data, max_grad_norm=MAX_NORM)
    fit(module)
    net, opt, _, _ = plain_run(case, data, max_grad_norm=MAX_NORM)
    assert module.opt.counters == opt.counters
    assert same_tensors(module.net, net)

    unclipped, _, _, _ = plain_run(case, data)
    assert not same_tensors(unclipped, net)


def lightning_clip(opt: torch.optim.Optimizer) -> None:
    """What Lightning's ``gradient_clip_val`` does after every closure call
    (Precision._wrap_closure -> _after_closure -> clip_grad_by_norm)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, MAX_NORM)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_gradient_clip_val_clips_each_pass(case: Case) -> None:
    """Lightning's ``gradient_clip_val`` clips inside its closure wrapper, so it
    clips the clean gradient (before eps is formed from it) and the perturbed
    gradient separately, not the update: docs/lightning.md recommends
    ``max_grad_norm=`` instead."""
    data = batches(STEPS, DTYPE, size=16)
    module = Net(case, data)
    fit(module, gradient_clip_val=MAX_NORM)
    net, opt, _, _ = plain_run(case, data, after_backward=lightning_clip)
    assert module.opt.counters == opt.counters
    assert same_tensors(module.net, net)

    unclipped, _, _, _ = plain_run(case, data)
    assert not same_tensors(unclipped, net)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_checkpoint_resume(case: Case, tmp_path) -> None:
    """A checkpoint that ModelCheckpoint writes after step 3 (trainer.save_checkpoint
    underneath), resumed with fit(ckpt_path=), restores the optimizer's state
    (method state, counters, base optimizer), the schedule and the BatchNorm
    buffers: 3 + 3 steps equal 6 straight, bit for bit. Step 3 ends an epoch
    (3 batches an epoch): a plain DataLoader cannot resume mid-epoch, and a
    checkpoint saved after fit() has returned resumes with a misplaced epoch
    (Lightning's loop state, with any optimizer; docs/lightning.md)."""
    data = batches(3, DTYPE, size=16)
    straight = Net(case, data, batchnorm=True, scheduler=step_lr)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    fit(straight, max_steps=6, enable_checkpointing=True, callbacks=[saver])
    path = tmp_path / "step=3.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["optimizer_states"][0]["flatminima"]["counters"]["steps"] == 3

    resumed = Net(case, data, batchnorm=True, scheduler=step_lr)
    fit(resumed, max_steps=6, ckpt_path=str(path))
    assert resumed.opt.step_count == 6
    assert resumed.steps_run == [3, 4, 5]
    assert resumed.training_step_losses == straight.training_step_losses[-len(resumed.training_step_losses) :]
    assert resumed.opt.counters == straight.opt.counters
    assert same_tensors(resumed.net, straight.net)
    assert_tree_equal(resumed.opt.state_dict(), straight.opt.state_dict())
    assert resumed.opt.param_groups[0]["lr"] == straight.opt.param_groups[0]["lr"] == BASE["lr"] * 0.5**3


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_bf16_mixed_is_autocast(case: Case) -> None:
    """precision="bf16-mixed" (no GradScaler) goes through step(closure): the
    plain loop with the forward under CPU autocast, bit for bit."""
    data = batches(STEPS, torch.float32, size=16)
    module = Net(case, data, dtype=torch.float32)
    fit(module, precision="bf16-mixed")
    net, opt, _, _ = plain_run(case, data, dtype=torch.float32, autocast=True)
    assert module.opt.counters == opt.counters
    assert same_tensors(module.net, net)

    fp32, _, _, _ = plain_run(case, data, dtype=torch.float32)
    assert not same_tensors(fp32, net)


def test_fp16_grad_scaler_is_refused() -> None:
    """With a GradScaler ("16-mixed" on GPU; forced here on CPU) Lightning's own
    plugin runs the closure once itself, then calls ``scaler.step(optimizer)``
    without the closure: our step() refuses loudly, before touching the
    weights, rather than taking a plain base-optimizer step. (The plugin below
    makes "16-mixed" work.)"""
    case = PER_METHOD[0]
    data = batches(STEPS, torch.float32, size=16)
    module = Net(case, data, dtype=torch.float32)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match="SharpnessAwareMixedPrecision"):
        fit(module, plugins=[MixedPrecision("16-mixed", "cpu")])
    assert module.opt.step_count == 0
    assert len(module.training_step_losses) == 1  # the clean pass only
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


def fp16_scaler() -> torch.amp.GradScaler:
    """A scale that overflows the fp16 backward at first, then backs off."""
    return torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=2)


@pytest.mark.filterwarnings("ignore:.*non-finite gradient:RuntimeWarning")
@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_fp16_with_a_precision_plugin(case: Case) -> None:
    """With the plugin above, "16-mixed" is the plain loop's
    ``opt.step(closure, scaler=scaler)`` under fp16 autocast, bit for bit,
    overflow skips and the scale's backoff and growth included."""
    data = batches(STEPS, torch.float32, size=16)
    module = Net(case, data, dtype=torch.float32, batchnorm=True)
    trainer = fit(module, plugins=[SharpnessAwareMixedPrecision("16-mixed", "cpu", scaler=fp16_scaler())])

    net = mlp(torch.float32, seed=0, batchnorm=True)
    opt = build_optimizer(case, net, model=net)
    scaler = fp16_scaler()
    for i, (x, y) in enumerate(data):

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.half, cache_enabled=False):
                loss = nn.functional.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            return loss

        torch.manual_seed(i)
        opt.step(closure, scaler=scaler)

    assert module.opt.counters == opt.counters
    assert 0 < opt.skipped_steps < STEPS
    assert trainer.precision_plugin.scaler.get_scale() == scaler.get_scale()
    assert same_tensors(module.net, net)


class LoggingNet(Net):
    """Logs the loss in training_step (which runs once per pass) and the value
    that ``optimizer.step`` returns in the ``optimizer_step`` hook (the clean
    loss)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("training_step_loss", loss)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        loss = optimizer.step(closure=optimizer_closure)
        self.log("clean_loss", loss)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_logging_the_clean_loss(case: Case) -> None:
    data = batches(STEPS, DTYPE, size=16)
    module = LoggingNet(case, data)
    trainer = fit(module)
    _, _, returned, calls = plain_run(case, data)
    metrics = trainer.callback_metrics
    assert metrics["clean_loss"].item() == returned[-1]
    # what training_step logged last is the last pass's loss (at w + eps on a perturbed step)
    assert metrics["training_step_loss"].item() == calls[-1]


class ManualNet(Net):
    """Manual optimization, two ways: ``optimizer.step(closure)`` with a
    closure that calls manual_backward (Lightning counts the step), or the
    explicit first_step/second_step (Lightning sees no optimizer step)."""

    def __init__(self, *args: Any, explicit: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.explicit = explicit

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()
        if not self.explicit:

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(self.net(x), y)
                self.manual_backward(loss)
                return loss

            opt.step(closure=closure)
            return
        raw = opt.optimizer
        if raw.pre_pass:  # Momentum-SAM's order: first_step before its only backward (at w + eps)
            raw.first_step(zero_grad=True)
            self.manual_backward(nn.functional.cross_entropy(self.net(x), y))
            raw.second_step(zero_grad=True)
            return
        raw.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.net(x), y))
        if raw.first_step(zero_grad=True):
            with raw.perturbed_pass():  # BatchNorm stats from the clean pass only
                self.manual_backward(nn.functional.cross_entropy(self.net(x), y))
        raw.second_step(zero_grad=True)


@pytest.mark.parametrize("explicit", [False, True], ids=["step-closure", "first-second-step"])
@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_manual_optimization(case: Case, explicit: bool) -> None:
    data = batches(STEPS, DTYPE, size=16)
    module = ManualNet(case, data, batchnorm=True, explicit=explicit)
    trainer = fit(module, max_steps=-1, max_epochs=1)
    net, opt, _, _ = plain_run(case, data, batchnorm=True)
    # the explicit API bypasses LightningOptimizer.step: global_step stays 0
    assert trainer.global_step == (0 if explicit else STEPS)
    assert module.opt.counters == opt.counters
    assert same_tensors(module.net, net)


class BareStepNet(ManualNet):
    """Lightning's usual manual pattern: manual_backward, then ``opt.step()``
    without a closure. LightningOptimizer then passes its do-nothing closure
    as ``closure=``: both of our "passes" run no backward."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.net(x), y))
        opt.step()


def test_manual_step_without_closure_is_refused() -> None:
    """Without the guard, .grad would still hold eps and the step would descend along it."""
    case = PER_METHOD[0]
    module = BareStepNet(case, batches(STEPS, DTYPE, size=16), explicit=False)
    w0 = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match="the perturbed pass left no gradient"):
        fit(module, max_steps=-1, max_epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(w0, module.parameters()))
