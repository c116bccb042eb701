"""What a checkpoint must agree with before a run continues from it.

A checkpoint is a file on disk, edited or damaged as easily as any other, and
it decides how the rest of the run goes. :func:`train_run` checks its run
fingerprint (the settings); here the rest is checked against the run:

* the progress: ``epoch`` lies in ``1 .. epochs`` of the run, ``steps`` is
  ``epoch`` times the steps of an epoch, and the history holds exactly one row
  per epoch done, numbered 1, 2, ..., each with its step count;
* the optimizer: its state dict loads through the optimizer's own checks (a
  flatminima method runs every option through the constructor's validation,
  so ``rho=-3`` is refused), and then every option of every param group, and
  a flatminima method's protocol options (``max_grad_norm``, ...), must be
  what the run's settings built; the learning rate alone may differ, as the
  LR schedule moves it, and it must be the schedule's value at ``steps``.

Every refusal is an :class:`ExperimentError` naming the checkpoint (one line
on the command line).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch

from .errors import ExperimentError

# Group keys the LR scheduler moves (checked against the schedule instead).
_SCHEDULED = frozenset({"lr", "initial_lr"})


def _refuse(path: str | os.PathLike[str], why: str) -> ExperimentError:
    return ExperimentError(f"checkpoint {path} does not match this run: {why}; remove it to start the run afresh")


def check_progress(state: Mapping[str, Any], path: str | os.PathLike[str], epochs: int,
                   steps_per_epoch: int) -> tuple[int, int]:
    """``(epoch, steps)`` of the checkpoint, consistent with each other, the
    run's ``epochs`` and the history it records."""
    epoch, steps, history = state.get("epoch"), state.get("steps"), state.get("history")
    if type(epoch) is not int or not 1 <= epoch <= epochs:
        raise _refuse(path, f"it says epoch {epoch!r} is done, and the run has epochs 1 to {epochs}")
    if type(steps) is not int or steps != epoch * steps_per_epoch:
        raise _refuse(path, f"it says {steps!r} steps after epoch {epoch}, and an epoch of this run has "
                            f"{steps_per_epoch} steps ({epoch * steps_per_epoch} in all)")
    if not isinstance(history, list) or len(history) != epoch:
        size = len(history) if isinstance(history, list) else type(history).__name__
        raise _refuse(path, f"it records {size} epoch(s) of results for epoch {epoch}")
    for i, row in enumerate(history, 1):
        if not isinstance(row, dict) or row.get("epoch") != i or row.get("steps") != i * steps_per_epoch:
            got = {k: row.get(k) for k in ("epoch", "steps")} if isinstance(row, dict) else type(row).__name__
            raise _refuse(path, f"result row {i} is {got}, expected epoch {i} after {i * steps_per_epoch} steps")
    return epoch, steps


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return type(a) is type(b) and a == b


def load_optimizer_and_schedule(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                                state: Mapping[str, Any], path: str | os.PathLike[str], steps: int) -> None:
    """Load the checkpoint's optimizer and LR scheduler into the run's freshly
    built ones, refusing what differs from the run's settings."""
    built = copy.deepcopy({k: v for k, v in opt.state_dict().items() if k != "state"})  # nothing loaded aliases it
    try:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    except (KeyError, ValueError, TypeError, AttributeError) as e:  # torch's own load: AttributeError on a non-dict
        raise _refuse(path, f"its optimizer state does not load ({type(e).__name__}: {e})") from None
    loaded = opt.state_dict()
    for i, (want, got) in enumerate(zip(built["param_groups"], loaded["param_groups"])):
        for key, value in want.items():
            if key != "params" and key not in _SCHEDULED and not _same(got.get(key), value):
                raise _refuse(path, f"param group {i} has {key}={got.get(key)!r} where the run's settings give "
                                    f"{value!r}")
    options = built.get("flatminima", {}).get("options")
    if options is not None and loaded["flatminima"]["options"] != options:
        raise _refuse(path, f"its optimizer options are {loaded['flatminima']['options']} where the run's settings "
                            f"give {options}")
    if sched.last_epoch != steps or sched.base_lrs != [g["initial_lr"] for g in built["param_groups"]]:
        raise _refuse(path, f"its LR schedule is at step {sched.last_epoch} from {sched.base_lrs}, where the run "
                            f"is at step {steps} from {[g['initial_lr'] for g in built['param_groups']]}")
    lrs = [g["lr"] for g in opt.param_groups]
    if not all(_same(a, b) for a, b in zip(lrs, sched.get_last_lr())):
        raise _refuse(path, f"its learning rates {lrs} are not the schedule's {sched.get_last_lr()} at step {steps}")


def restore_model_and_rng(model: torch.nn.Module, scaler: torch.amp.GradScaler | None, state: Mapping[str, Any],
                          path: str | os.PathLike[str], device: torch.device) -> None:
    """Load the checkpoint's weights, GradScaler and random number generator
    states, refusing in one line what does not fit (instead of torch's
    traceback from deep inside)."""
    try:
        model.load_state_dict(state["model"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        raise _refuse(path, f"its model or GradScaler state does not load ({type(e).__name__}: "
                            f"{' '.join(str(e).split())})") from None  # torch's text on one line
    rng = state.get("rng")
    wanted = {"torch": torch.get_rng_state()}
    if device.type == "cuda" and isinstance(rng, Mapping) and rng.get("cuda") is not None:
        wanted["cuda"] = torch.cuda.get_rng_state(device)
    for name, like in wanted.items():
        saved = rng.get(name) if isinstance(rng, Mapping) else None
        if not (isinstance(saved, torch.Tensor) and saved.dtype == torch.uint8 and saved.shape == like.shape):
            got = (f"a {saved.dtype} tensor of shape {list(saved.shape)}" if isinstance(saved, torch.Tensor)
                   else repr(saved)[:60])
            raise _refuse(path, f"its {name} random number generator state is {got}, not the {like.numel()} bytes "
                                "(a uint8 tensor) torch saves")
    try:
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in wanted:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    except (RuntimeError, ValueError, TypeError) as e:  # the right size, but not a generator's state
        raise _refuse(path, f"its random number generator state is not valid ({e})") from None
