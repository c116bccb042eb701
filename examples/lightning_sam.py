"""flatminima inside PyTorch Lightning's automatic optimization.

    python examples/lightning_sam.py                        # SAM, fp32, ~2 s of training on a CPU
    python examples/lightning_sam.py --method looksam --precision bf16-mixed
    python examples/lightning_sam.py --precision 16-mixed   # fp16 + GradScaler, through the plugin below

Needs ``pip install lightning`` (it is in the ``dev`` extra). Why nothing
special is needed: with automatic optimization Lightning wraps
training_step + zero_grad + backward into a closure and calls
``optimizer.step(closure=closure)``. That is PyTorch's closure convention,
which every flatminima optimizer follows: it calls the closure at ``w``
(clean pass), moves to ``w + eps``, calls it again (perturbed pass), comes
back and lets the base optimizer step. So training_step runs twice on a
perturbed step (once on the steps that LookSAM / SAM-every-k / AE-SAM do
without the second pass).

What to know (docs/lightning.md has the details and the tests that back them):

* ``model=self`` makes the optimizer restore BatchNorm running statistics
  after the perturbed pass, as without Lightning.
* LR schedulers returned from configure_optimizers step our optimizer (its
  param groups are the base optimizer's).
* Clipping: use flatminima's ``max_grad_norm=`` (clips the final update once).
  Lightning's ``gradient_clip_val`` clips inside its closure wrapper, i.e.
  the clean and the perturbed gradients separately, not the update.
* Precision: "32-true", "64-true", "bf16-mixed" (and "bf16-true") work as
  they are. "16-mixed" (fp16 with a GradScaler) needs the small plugin below:
  Lightning's own MixedPrecision runs the closure once itself and calls
  ``scaler.step(optimizer)`` without it, and our ``step()`` raises "needs a
  closure". The plugin hands the closure and the scaler to
  ``step(closure, scaler=...)`` instead. (Given precision="16-mixed" on
  CPU, Lightning switches to "bf16-mixed"; this script passes the plugin.)
* ``accumulate_grad_batches`` must stay 1: only the last micro-batch would go
  through the perturbed pass, and without a zero_grad, so eps would leak into
  its gradient. configure_optimizers below refuses it.
* training_step's self.log sees both passes; log the clean loss from the
  ``optimizer_step`` hook, as below (``optimizer.step`` returns it).
* Manual optimization: ``opt.step(closure=...)`` with a closure that calls
  ``self.manual_backward``, or ``first_step``/``second_step`` on
  ``self.optimizers().optimizer`` (see docs/lightning.md). Never Lightning's
  usual ``self.manual_backward(loss); opt.step()``: Lightning then passes a
  do-nothing closure, and the step silently descends along ``eps`` instead
  of the perturbed gradient.
* ESAM's data selection (``gamma < 1``) needs per-sample losses from its
  closure, which a Lightning training_step cannot give: use ESAM with
  ``gamma=1`` here, or its explicit API in manual optimization.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch
from torch import nn

import lightning.pytorch as pl

import flatminima
from flatminima.lightning import SharpnessAwareMixedPrecision  # fp16 ("16-mixed") for flatminima


def make_data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """A 3-class problem labelled by a fixed random teacher network, 10% label noise."""
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(20, 32, generator=g), torch.randn(32, 3, generator=g)]
    g.manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(1)
    noisy = torch.rand(n, generator=g) < 0.1
    y[noisy] = torch.randint(0, 3, (int(noisy.sum()),), generator=g)
    return torch.utils.data.TensorDataset(x, y)


class LitMLP(pl.LightningModule):
    def __init__(self, method: str = "sam", lr: float = 0.05, epochs: int = 8, steps_per_epoch: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 3))

    def training_step(self, batch, batch_idx):
        # Called once per pass: at w and, on a perturbed step, again at w + eps.
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        # Lightning's default hook is just `optimizer.step(closure=optimizer_closure)`;
        # overriding it lets us log the clean loss that flatminima's step returns.
        loss = optimizer.step(closure=optimizer_closure)
        self.log("train_loss", loss, on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        if self.trainer.accumulate_grad_batches != 1:
            raise ValueError("sharpness-aware optimizers need accumulate_grad_batches=1 under Lightning")
        opt = flatminima.create(
            self.hparams.method,
            self.parameters(),
            torch.optim.SGD,
            lr=self.hparams.lr,
            momentum=0.9,
            weight_decay=5e-4,
            model=self,  # BatchNorm running stats come from the clean pass only
            max_grad_norm=5.0,  # flatminima's clipping, rather than gradient_clip_val
            # ESAM's default gamma=0.5 needs per-sample losses from the closure: not with Lightning
            **({"gamma": 1.0} if self.hparams.method == "esam" else {}),
        )
        total = self.hparams.epochs * self.hparams.steps_per_epoch
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="sam", choices=flatminima.list_methods())
    parser.add_argument("--precision", default="32-true", help='"32-true", "bf16-mixed", ...')
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()

    torch.set_num_threads(1)  # a tiny MLP: more threads only add overhead (10x on a busy 2-core machine)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # torch 2.13 vs lightning 2.6, harmless
    pl.seed_everything(0, verbose=False)

    batch_size = 64
    train = torch.utils.data.DataLoader(make_data(2048, seed=1), batch_size=batch_size, shuffle=True)
    val = torch.utils.data.DataLoader(make_data(1024, seed=2), batch_size=512)
    model = LitMLP(args.method, epochs=args.epochs, steps_per_epoch=len(train))
    if args.precision == "16-mixed":
        precision = {"plugins": [SharpnessAwareMixedPrecision("16-mixed", "cpu")]}
    else:
        precision = {"precision": args.precision}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        **precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, train, val)
    opt = trainer.optimizers[0]  # our optimizer itself, not a wrapper
    metrics = trainer.callback_metrics
    print(
        f"{args.method} ({args.precision}): train loss {metrics['train_loss']:.3f}, "
        f"val acc {100 * metrics['val_acc']:.1f}% after {opt.step_count} steps, "
        f"{opt.perturbed_steps} with the perturbed pass, {opt.skipped_steps} skipped "
        f"({time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    main()
