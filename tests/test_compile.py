"""torch.compile (issue 5): a compiled model trains with every method exactly
as in eager mode, parameter values changed in place between the passes
cause no recompilation, and compiling the base optimizer's step or the
optimizer's own phases changes nothing either.

Kept short: ``backend="aot_eager"`` behind a counting backend (AOTAutograd
traces forward and backward, the ops run eagerly, no C++ is compiled), three
steps; one small inductor run. docs/compile.md has the measured numbers and
benchmarks/compile_probe.py the script behind them.

Exactness: aot_eager runs the ATen ops eager runs, in the same order, and
gave bit-identical weights for every configuration (float32 and float64), so
these tests compare with ``torch.equal``. Inductor generates its own kernels
(fusion, other summation orders): see test_inductor_matches_eager for its
tolerance.

Expected compilations are data, not method names: the eager run records,
for each forward call, what dynamo guards on (grad mode, input shape, the
parameters' ``requires_grad``); the compiled model compiles at most once per
distinct record, and exactly once when there is one. ESAM's clean pass sets
``requires_grad=False`` on the tensors its mask leaves out, and its data
selection runs a no-grad forward and a smaller batch: those are new records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import flatminima
import helpers
from methods_db import CASES, Case

STEPS = 3
ONE_PER_METHOD = helpers.one_case_per_method(CASES)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()  # drop the compiled code and the references it holds


def build(case: Case, net: nn.Module, **extra: Any) -> Any:
    return flatminima.create(
        case.method,
        helpers.two_groups(net, **case.second_group),
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
        **extra,
        **case.kwargs,
    )


def record_guards(model: nn.Module) -> set[tuple[Any, ...]]:
    """What dynamo guards on at each forward call of ``model`` (eager runs only:
    a hook on the compiled model would be traced itself)."""
    seen: set[tuple[Any, ...]] = set()

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.add((torch.is_grad_enabled(), tuple(args[0].shape), tuple(p.requires_grad for p in module.parameters())))

    model.register_forward_pre_hook(hook)
    return seen


def run(
    case: Case,
    step: Callable[[Any, nn.Module, torch.Tensor, torch.Tensor], Any],
    compile_model: str | None,
    *,
    dtype: torch.dtype = torch.float64,
    batchnorm: bool = False,
    pass_model: bool = False,
    compile_base: str | None = None,
    steps: int = STEPS,
) -> dict[str, Any]:
    """``steps`` steps of ``case`` from fixed weights and data; the model
    compiled with the backend ``compile_model`` (None: eager), the base
    optimizer's step with ``compile_base``."""
    model = helpers.mlp(dtype, seed=0, batchnorm=batchnorm)
    guards = record_guards(model) if compile_model is None else set()
    model_count = CompileCounterWithBackend(compile_model) if compile_model else None
    fwd = torch.compile(model, backend=model_count) if model_count else model
    opt = build(case, model, **({"model": fwd} if pass_model else {}))
    base_count = CompileCounterWithBackend(compile_base) if compile_base else None
    if base_count:
        opt.base_optimizer.step = torch.compile(opt.base_optimizer.step, backend=base_count)
    base_frames = []
    for i, (x, y) in enumerate(helpers.batches(steps, dtype, size=16)):
        torch.manual_seed(i)
        step(opt, fwd, x, y)
        base_frames.append(base_count.frame_count if base_count else 0)
    return {
        "state": [t.detach().clone() for t in model.state_dict().values()],
        "counters": dict(opt.counters),
        "guards": guards,
        "frames": model_count.frame_count if model_count else 0,
        "base_frames": base_frames,
    }


def closure_api(case: Case) -> Callable[..., Any]:
    return lambda opt, fwd, x, y: opt.step(helpers.make_closure(opt, fwd, x, y, case.closure))


def explicit_api(case: Case) -> Callable[..., Any]:
    return lambda opt, fwd, x, y: helpers.explicit_step(opt, fwd, x, y, case.closure)


def assert_same_training(eager: dict[str, Any], compiled: dict[str, Any], exact: bool = True) -> None:
    assert compiled["counters"] == eager["counters"]
    if exact:
        for a, b in zip(eager["state"], compiled["state"]):
            assert torch.equal(a, b), f"max abs diff {helpers.max_abs_diff([a], [b]):.3g}"


def assert_compiled_once_per_guard_set(eager: dict[str, Any], compiled: dict[str, Any]) -> None:
    records, frames = len(eager["guards"]), compiled["frames"]
    assert 1 <= frames <= records, f"{frames} compilations for {records} distinct guard records {sorted(eager['guards'])}"
    if records == 1:
        assert frames == 1


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_compiled_model_closure_api(case: Case) -> None:
    """step(closure) on a compiled model: eager's weights bit for bit, and no
    recompilation from the in-place perturbation and restore of the weights
    (six or more forward calls on changed values, one compilation)."""
    eager = run(case, closure_api(case), None)
    compiled = run(case, closure_api(case), "aot_eager")
    assert_same_training(eager, compiled)
    assert_compiled_once_per_guard_set(eager, compiled)


@pytest.mark.parametrize("case", ONE_PER_METHOD, ids=lambda c: c.id)
def test_compiled_model_explicit_api(case: Case) -> None:
    eager = run(case, explicit_api(case), None)
    compiled = run(case, explicit_api(case), "aot_eager")
    assert_same_training(eager, compiled)
    assert_compiled_once_per_guard_set(eager, compiled)


@pytest.mark.parametrize("case", ONE_PER_METHOD, ids=lambda c: c.id)
def test_compiled_batchnorm_model_as_model_argument(case: Case) -> None:
    """A BatchNorm model compiled and passed as ``model=``, so that its running
    statistics are restored after the perturbed pass (through the compiled
    module's buffers, which are the original module's): eager's weights and
    buffers, one compilation."""
    kw = {"batchnorm": True, "pass_model": True}
    eager = run(case, closure_api(case), None, **kw)
    compiled = run(case, closure_api(case), "aot_eager", **kw)
    assert_same_training(eager, compiled)
    assert_compiled_once_per_guard_set(eager, compiled)


#: the first configuration, and the first whose steps are not all perturbed
#: (second_step's other path). What the tests using these check is the base
#: class's business; tracing every method would cost half a minute.
TWO_PATHS = [CASES[0], next(c for c in CASES if c.closure == "loss" and c.closure_calls and 1 in c.closure_calls)]


@pytest.mark.parametrize("case", TWO_PATHS, ids=lambda c: c.id)
def test_compiled_base_optimizer_step(case: Case) -> None:
    """Model and base optimizer's step both compiled (PyTorch's
    compiled-optimizer recipe): eager's weights; the base step compiles at
    its first call (no momentum buffers yet) and its second, then never again."""
    eager = run(case, closure_api(case), None)
    compiled = run(case, closure_api(case), "aot_eager", compile_base="aot_eager")
    assert_same_training(eager, compiled)
    assert_compiled_once_per_guard_set(eager, compiled)
    assert compiled["base_frames"][1] <= 2
    assert compiled["base_frames"][-1] == compiled["base_frames"][1], compiled["base_frames"]


@pytest.mark.parametrize("case", TWO_PATHS, ids=lambda c: c.id)
def test_compiled_phases_keep_the_step_state(case: Case) -> None:
    """torch.compile(opt.first_step) / (opt.second_step): the phases run with
    graph breaks (the non-finite check syncs with the host, torch.optim's
    step breaks on purpose) and must give eager's step. This guards the
    step state against dynamo dropping attribute assignments made on an
    Optimizer inside a traced frame (docs/compile.md): a run where the
    phase bookkeeping got lost raises or differs here."""
    def phases(opt: Any, fwd: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        first = torch.compile(opt.first_step, backend="eager")
        second = torch.compile(opt.second_step, backend="eager")
        nn.functional.cross_entropy(fwd(x), y).backward()
        if first(zero_grad=True):
            nn.functional.cross_entropy(fwd(x), y).backward()
        second(zero_grad=True)

    plain = run(case, lambda opt, fwd, x, y: helpers.explicit_step(opt, fwd, x, y), None, steps=2)
    compiled = run(case, phases, None, steps=2)
    assert_same_training(plain, compiled)


def test_inductor_matches_eager() -> None:
    """The default backend, float32, the first configuration. Inductor fuses
    and reorders float32 arithmetic, so the weights differ by rounding: the
    probe measured at most 5.5e-7 after 10 steps for every method (1.5e-8
    for SAM; weights of size ~0.3 have an ulp of 3e-8), and this run differs
    by 1.5e-8. A real divergence (a wrong perturbation, a skipped or
    doubled step) moves them by lr * |g| ~ 1e-2."""
    import torch._inductor.config

    case = CASES[0]
    eager = run(case, closure_api(case), None, dtype=torch.float32)
    # Scalar C++ kernels: probing the CPU's vector ISAs compiles test programs,
    # about half of a cold compile (~8 s on 2 cores); the capture, AOTAutograd
    # and the lowering under test are the same.
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        compiled = run(case, closure_api(case), "inductor", dtype=torch.float32)
    assert_same_training(eager, compiled, exact=False)
    torch.testing.assert_close(compiled["state"], eager["state"], rtol=1e-5, atol=1e-6)
    assert_compiled_once_per_guard_set(eager, compiled)
