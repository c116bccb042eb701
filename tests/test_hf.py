"""flatminima.hf: SharpnessAwareTrainer (transformers) and accelerate, against the real libraries.

Tiny BERT and GPT-2 models are built from configs (tests/hf_models.py); the
eight samples of the data set are one full batch, so a Trainer step over any
split into micro-batches is comparable with a full-batch ``step(closure)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from hf_models import N, build, dataset, full_batch, max_diff, plain_loop, weights

import flatminima
from flatminima.hf import SharpnessAwareTrainer, prepare

transformers.logging.set_verbosity_error()

#: the option that makes each method take its data-selection-free, loss-closure form
METHOD_OPTIONS: dict[str, dict[str, Any]] = {"esam": {"gamma": 1.0, "seed": 0}, "looksam": {"k": 2}, "sam_every_k": {"k": 2}}


def _args(out: Path, bs: int, ga: int, steps: int, **kw: Any) -> Any:
    base: dict[str, Any] = dict(
        per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=steps, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", use_cpu=True, report_to="none", logging_steps=1,
        save_strategy="no", seed=0, max_grad_norm=0.0, disable_tqdm=True, dataloader_drop_last=True,
    )
    base.update(kw)
    return transformers.TrainingArguments(str(out), **base)


def _train(tmp: Path, kind: str, method: str = "sam", bs: int = N, ga: int = 1, steps: int = 3,
           options: dict[str, Any] | None = None, resume: Any = None, **kw: Any) -> SharpnessAwareTrainer:
    model = build(kind)
    trainer = SharpnessAwareTrainer(model=model, args=_args(tmp, bs, ga, steps, **kw), train_dataset=dataset(kind),
                                    method=method, method_options=options)
    if kind == "bert":
        trainer.model_accepts_loss_kwargs = False  # BERT ignores num_items_in_batch: let the Trainer divide by ga
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("bs,ga", [(8, 1), (4, 2), (2, 4)])
def test_accumulated_micro_batches_are_one_full_batch_step(tmp_path: Path, kind: str, bs: int, ga: int) -> None:
    ref, _, _ = plain_loop(kind, "sam", 3, {})
    trainer = _train(tmp_path, kind, bs=bs, ga=ga)
    assert max_diff(weights(trainer.model), weights(ref)) < 1e-6
    assert max_diff(weights(trainer.model), weights(build(kind))) > 1e-3  # it trained
    opt = trainer.sharpness_aware_optimizer
    assert (opt.step_count, opt.perturbed_steps, opt.skipped_steps) == (3, 3, 0)


@pytest.mark.parametrize("method", flatminima.list_methods())
def test_every_method_under_the_trainer_is_its_full_batch_step(tmp_path: Path, method: str) -> None:
    options = METHOD_OPTIONS.get(method, {})
    ref, ref_opt, _ = plain_loop("bert", method, 4, options)
    trainer = _train(tmp_path, "bert", method, bs=4, ga=2, steps=4, options=options)
    assert max_diff(weights(trainer.model), weights(ref)) < 1e-6
    opt = trainer.sharpness_aware_optimizer
    assert type(opt) is type(ref_opt)
    assert opt.counters == ref_opt.counters


def test_max_grad_norm_clips_the_direction_once_and_is_logged(tmp_path: Path) -> None:
    ref, _, _ = plain_loop("bert", "sam", 3, {"max_grad_norm": 0.05})
    trainer = _train(tmp_path, "bert", bs=4, ga=2, max_grad_norm=0.05)
    assert trainer.sharpness_aware_optimizer.max_grad_norm == 0.05
    assert max_diff(weights(trainer.model), weights(ref)) < 1e-6
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 3 and all(abs(n - 0.05) < 1e-6 for n in norms)  # the clipped direction's norm


def test_conflicting_max_grad_norms_are_refused(tmp_path: Path) -> None:
    model = build("bert")
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, lr=0.1, max_grad_norm=2.0)
    trainer = SharpnessAwareTrainer(model=model, args=_args(tmp_path, 8, 1, 1, max_grad_norm=1.0),
                                    train_dataset=dataset("bert"), optimizers=(opt, None))
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0 and the optimizer's max_grad_norm=2.0 differ"):
        trainer.train()


def test_logs_sharpness_and_step_counts(tmp_path: Path) -> None:
    _, _, losses = plain_loop("bert", "sam", 3, {})
    trainer = _train(tmp_path, "bert", bs=4, ga=2)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["perturbed_steps"] for h in logs] == [1, 2, 3]
    assert [h["skipped_steps"] for h in logs] == [0, 0, 0]
    expected = [losses[2 * i + 1] - losses[2 * i] for i in range(3)]  # L(w + eps) - L(w) of each step
    assert [h["sharpness"] for h in logs] == pytest.approx(expected, abs=1e-6)
    assert [h["loss"] for h in logs] == pytest.approx(losses[0::2], abs=1e-6)  # the clean loss


def test_a_flatminima_optimizer_given_to_the_trainer(tmp_path: Path) -> None:
    model = build("bert")
    opt = flatminima.create("asam", model.parameters(), torch.optim.SGD, lr=0.1)
    trainer = SharpnessAwareTrainer(model=model, args=_args(tmp_path, 4, 2, 3), train_dataset=dataset("bert"),
                                    optimizers=(opt, None))
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    ref, _, _ = plain_loop("bert", "asam", 3, {})
    assert trainer.sharpness_aware_optimizer is opt
    assert max_diff(weights(model), weights(ref)) < 1e-6


def test_resume_from_checkpoint_continues_bit_for_bit(tmp_path: Path) -> None:
    opts = {"momentum": 0.9}  # state in the base optimizer, which the checkpoint must carry
    straight = _train(tmp_path / "a", "bert", "looksam", bs=4, ga=2, steps=6, options={**opts, "k": 2}, optim="sgd",
                      save_strategy="steps", save_steps=3)
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert ckpt.is_dir()
    resumed = _train(tmp_path / "a", "bert", "looksam", bs=4, ga=2, steps=6, options={**opts, "k": 2},
                     save_strategy="steps", save_steps=3, resume=str(ckpt))
    for a, b in zip(weights(straight.model), weights(resumed.model)):
        assert torch.equal(a, b)
    sa, sb = straight.sharpness_aware_optimizer, resumed.sharpness_aware_optimizer
    assert sa.counters == sb.counters == {"steps": 6, "perturbed_steps": 3, "skipped_steps": 0}
    for pa, pb in zip(sa.base_optimizer.state.values(), sb.base_optimizer.state.values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])


def test_bf16_autocast(tmp_path: Path) -> None:
    trainer = _train(tmp_path, "bert", bf16=True)
    ref, _, _ = plain_loop("bert", "sam", 3, {}, bf16=True)
    fp32, _, _ = plain_loop("bert", "sam", 3, {})
    assert max_diff(weights(fp32), weights(ref)) > 1e-4  # bf16 made a difference: the check can fail
    assert max_diff(weights(trainer.model), weights(ref)) < 1e-6
    assert trainer.sharpness_aware_optimizer.perturbed_steps == 3


def test_fp16_through_the_accelerators_scaler(tmp_path: Path) -> None:
    """accelerate builds no fp16 scaler on CPU: one is given to the accelerator, as on a GPU.
    With a power-of-two scale the scaled run is the unscaled one, bit for bit."""
    unscaled = _train(tmp_path / "u", "bert", bs=4, ga=2)
    model = build("bert")
    trainer = SharpnessAwareTrainer(model=model, args=_args(tmp_path / "s", 4, 2, 3), train_dataset=dataset("bert"))
    trainer.model_accepts_loss_kwargs = False
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    trainer.accelerator.scaler = scaler
    trainer.train()
    for a, b in zip(weights(unscaled.model), weights(model)):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0**13  # update() once per step


def test_esam_data_selection_is_refused_with_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"gamma=0.5\) selects samples .* use gamma=1.0"):
        _train(tmp_path, "bert", "esam")


def test_a_plain_trainer_names_the_sharpness_aware_one(tmp_path: Path) -> None:
    model = build("bert")
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 8, 1, 1), train_dataset=dataset("bert"),
                                   optimizers=(opt, None))
    with pytest.raises(ValueError, match=r"needs a closure.*Hugging Face Trainer: use flatminima.hf.SharpnessAwareTrainer"):
        trainer.train()
    w = weights(build("bert"))
    assert max_diff(weights(model), w) == 0.0  # nothing stepped


# ---------------------------------------------------------------------- accelerate
def _accelerate_run(ga: int, micro: int, scaler: Any = None, plain: bool = False) -> tuple[list[torch.Tensor], int, Any]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ga)
    model = build("bert")
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    model, opt = (accelerator.prepare if plain else lambda *o: prepare(accelerator, *o, scaler=scaler))(model, opt)
    data = dataset("bert")
    calls = 0
    model.train()
    for i in range(0, 2 * N, micro):
        batch = full_batch([data[j % N] for j in range(i, i + micro)])

        def closure(batch: dict[str, torch.Tensor] = batch) -> torch.Tensor:
            nonlocal calls
            calls += 1
            opt.zero_grad()  # the PyTorch closure form: a no-op while the window is replayed
            loss = model(**batch).loss
            accelerator.backward(loss)
            return loss

        with accelerator.accumulate(model):
            opt.step(closure)
    return weights(model), calls, opt


@pytest.mark.parametrize("ga,micro", [(1, 8), (2, 4), (4, 2)])
def test_accelerate_accumulate_gives_one_step_over_the_window(ga: int, micro: int) -> None:
    ref, _, _ = plain_loop("bert", "sam", 2, {})
    w, calls, opt = _accelerate_run(ga, micro)
    assert calls == 2 * 2 * ga  # every micro-batch's closure ran in both passes of its window's step
    assert opt.sharpness_aware.perturbed_steps == 2
    assert max_diff(w, weights(ref)) < 1e-6


def test_accelerate_fp16_with_an_explicit_scaler_equals_the_unscaled_run() -> None:
    unscaled, _, _ = _accelerate_run(2, 4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    scaled, _, opt = _accelerate_run(2, 4, scaler=scaler)
    for a, b in zip(unscaled, scaled):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0**12 and not opt.step_was_skipped


def test_accelerate_prepare_alone_is_refused_before_anything_steps() -> None:
    with pytest.raises(ValueError, match=r"prepared by accelerator.prepare alone.*flatminima.hf.prepare"):
        _accelerate_run(2, 4, plain=True)


def test_accelerate_step_without_closure_names_the_pattern() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = build("bert")
    _, opt = prepare(accelerator, model, flatminima.SAM(model.parameters(), torch.optim.SGD, lr=0.1))
    with pytest.raises(ValueError, match=r"needs optimizer.step\(closure\).*accelerator.accumulate\(model\)"):
        opt.step()


# ---------------------------------------------------------------------- torchrun
def test_trainer_under_torchrun_is_per_replica_sam(tmp_path: Path) -> None:
    """Two CPU processes under torchrun: every rank ends with the weights of the single-process
    run of per-replica eps on the same shards (``step(closure, chunks=2)``, chunk r = rank r's
    micro-batches), as plain DDP does (tests/test_ddp.py)."""
    script = Path(__file__).with_name("hf_ddp_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), str(Path(__file__).parent)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for a, b in zip(runs[0]["weights"], runs[1]["weights"]):
        assert torch.equal(a, b)
    model = build("bert")
    model.train()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    for step in range(len(runs[0]["batches"])):
        shards = [runs[r]["batches"][step] for r in range(2)]  # each rank's micro-batches of this step

        def closure(i: int, shards: list[list[dict[str, torch.Tensor]]] = shards) -> torch.Tensor:
            opt.zero_grad()
            total = torch.zeros(())
            for micro in shards[i]:
                loss = model(**micro).loss / len(shards[i])
                loss.backward()
                total = total + loss.detach()
            return total

        opt.step(closure, chunks=2)
    assert max_diff(runs[0]["weights"], weights(model)) < 1e-6
    sync = runs[0]["no_sync_weights"]  # one global eps (sync_perturbations=True) differs: the check can fail
    assert max_diff(sync, weights(model)) > 1e-6


def test_the_example_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import runpy

    example = Path(__file__).parents[1] / "examples" / "hf_trainer.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--method", "looksam", "--steps", "5"])
    runpy.run_path(str(example), run_name="__main__")
    assert "LookSAM: 5 steps, 1 perturbed, 0 skipped" in capsys.readouterr().out
