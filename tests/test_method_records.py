"""The method records (methods_db.RECORDS) against the library's registry:
one record per registered method, each complete, with the registry's closure
form; and the registry's ``extra_copies`` (parameter-sized buffers at the
step's peak) measured.

These tests always run (no optional dependency, CPU only)."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import flatminima
import helpers
import methods_db
from methods_db import CASES, DEFAULT_CASES, RECORDS, MethodInfo, register_record
from reference import REFERENCES

RECORD_LIST = list(RECORDS.values())


def record_id(r: MethodInfo) -> str:
    return r.name


# ---------------------------------------------------------------- coverage


def test_every_registered_method_has_exactly_one_record() -> None:
    registered = flatminima.list_methods()
    assert len(registered) == len(set(registered))
    assert sorted(RECORDS) == sorted(registered), (
        f"missing records: {sorted(set(registered) - set(RECORDS))}; "
        f"records of unregistered methods: {sorted(set(RECORDS) - set(registered))}"
    )
    assert all(key == r.name for key, r in RECORDS.items())
    assert len(DEFAULT_CASES) == len(RECORDS)
    assert [c.method for c in DEFAULT_CASES] == list(RECORDS)


def test_a_second_record_for_a_method_is_refused() -> None:
    r = RECORDS["sam"]
    with pytest.raises(ValueError, match="already has a record"):
        register_record(r)
    assert len(RECORDS) == len(flatminima.list_methods())


def test_a_record_holds_only_its_own_entries() -> None:
    other = RECORDS["asam"].configs[0]
    with pytest.raises(ValueError, match="holds an entry for 'asam'"):
        MethodInfo("sam", configs=[other], equivalences=[], bad_args=[], state_copies_between_steps=0)


@pytest.mark.parametrize("record", RECORD_LIST, ids=record_id)
def test_record_is_complete(record: MethodInfo) -> None:
    assert record.configs, f"{record.name}: no configuration"
    assert record.bad_args, f"{record.name}: no bad argument"
    assert record.equivalences, f"{record.name}: no equivalence"
    assert record.reference is REFERENCES[record.name]
    assert isinstance(record.state_copies_between_steps, int) and record.state_copies_between_steps >= 0
    for c in record.configs:
        assert c.method == record.name and c in CASES
    assert record.default_config in DEFAULT_CASES
    for b in record.bad_args:
        assert isinstance(b.error, type) and issubclass(b.error, Exception) and b.match


def test_derived_tables_are_the_records() -> None:
    assert CASES == [c for r in RECORD_LIST for c in r.configs]
    assert methods_db.EQUIVALENCES == [e for r in RECORD_LIST for e in r.equivalences]
    assert methods_db.BAD_ARGS == [b for r in RECORD_LIST for b in r.bad_args]
    assert methods_db.STATE_COPIES_BETWEEN_STEPS == {r.name: r.state_copies_between_steps for r in RECORD_LIST}
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({e.id for e in methods_db.EQUIVALENCES}) == len(methods_db.EQUIVALENCES)


# ---------------------------------------------------------------- closure forms


@pytest.mark.parametrize("record", RECORD_LIST, ids=record_id)
def test_closure_forms_agree_with_the_registry(record: MethodInfo) -> None:
    """A configuration takes the registry's closure form unless it sets one;
    a form it sets differs from the registry's (an override, for
    hyperparameters that change the form: ESAM with gamma = 1 accepts
    PyTorch's). The default configuration reads the registry's form unless
    it overrides it."""
    form = flatminima.get_method(record.name).closure
    assert form in methods_db.CLOSURE_FORMS
    for c in record.configs:
        if c.closure_from_registry:
            assert c.closure == form, c.id
        else:
            assert c.closure != form, f"{c.id}: closure={c.closure!r} is the registry's; leave it unset"
    default = record.default_config
    assert default.closure == form or not default.closure_from_registry
    # at least one configuration runs the registry's own form
    assert any(c.closure == form for c in record.configs), record.name


@pytest.mark.parametrize("record", RECORD_LIST, ids=record_id)
def test_registry_closure_form_works_at_the_defaults(record: MethodInfo) -> None:
    """``get_method(name).closure`` is the form ``step`` takes at the
    method's defaults: a step with it runs; where it is the per-sample form,
    PyTorch's form is refused at the defaults (so the record is exact, not
    merely one form that happens to work)."""
    spec = flatminima.get_method(record.name)
    model = helpers.mlp()
    opt = flatminima.create(record.name, model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = helpers.batches(1)[0]
    w0 = helpers.params_of(model)
    opt.step(helpers.make_closure(opt, model, x, y, spec.closure))
    assert opt.step_count == 1
    if spec.closure == "per_sample":
        model2 = helpers.mlp()
        opt2 = flatminima.create(record.name, model2.parameters(), torch.optim.SGD, lr=0.1)
        with pytest.raises(ValueError, match="per-sample"):
            opt2.step(helpers.make_closure(opt2, model2, x, y, "loss"))
        helpers.assert_tree_equal(helpers.params_of(model2), w0)


# ---------------------------------------------------------------- passes_per_step


@pytest.mark.parametrize("record", RECORD_LIST, ids=record_id)
def test_passes_per_step_at_the_defaults(record: MethodInfo) -> None:
    """``MethodSpec.passes_per_step`` (closure calls per step, on average at
    the defaults) is the mean of the record's ``closure_calls_at_defaults``,
    and ``step(closure)`` at the registry's defaults makes those calls; a
    data-dependent method (None) makes 1 or 2 per step."""
    spec = flatminima.get_method(record.name)
    pattern = record.closure_calls_at_defaults
    model = helpers.mlp()
    opt = flatminima.create(record.name, model.parameters(), torch.optim.SGD, lr=0.1)
    calls: list[int] = []
    for x, y in helpers.batches(10):
        inner = helpers.make_closure(opt, model, x, y, spec.closure)
        n = [0]

        def closure(*args: Any, inner: Any = inner, n: list[int] = n) -> torch.Tensor:
            n[0] += 1
            return inner(*args)

        opt.step(closure)
        calls.append(n[0])
    if pattern is None:
        assert set(calls) <= {1, 2} and 1 <= spec.passes_per_step <= 2, calls
    else:
        assert calls == [pattern[i % len(pattern)] for i in range(len(calls))], (record.name, calls)
        assert spec.passes_per_step == pytest.approx(sum(pattern) / len(pattern)), (record.name, spec.passes_per_step)


# ---------------------------------------------------------------- extra_copies


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated by the ops run under the mode and
    still alive, and their peak. An op's output that aliases an input
    (in-place ops, out= variants, views: ``alias_info`` in its schema) is no
    allocation. Every allocation on the step's path is an op's output
    (autograd's backward included), so this is what the step adds to
    memory, freed storages leaving the count when they die."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        rets = func._schema.returns
        if len(rets) <= 1:
            fresh = [out] if rets and rets[0].alias_info is None else []
        else:
            fresh = [o for o, r in zip(out, rets) if r.alias_info is None]
        for t in tree_flatten(fresh)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = id(st)
                if key not in self.live:
                    self.live[key] = st.nbytes()
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, key)
        return out


#: steps measured: the peak over steps 2..STEPS (step 1 allocates the base
#: optimizer's and the method's state); 6 reaches the second perturbed step
#: of a period k = 5 (LookSAM's and SAM every k's default)
STEPS = 6
#: the big parameter tensor is WIDTH x WIDTH
WIDTH = 256


def _big_model() -> nn.Module:
    """One big parameter tensor (WIDTH x WIDTH): the small one (3 x WIDTH)
    and the activations of a batch of 8 stay under 5% of the parameters'
    bytes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=False), nn.Tanh(), nn.Linear(WIDTH, 3, bias=False))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, WIDTH, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(STEPS)]


def step_peaks(name: str | None) -> tuple[list[float], list[bool], float]:
    """Peak bytes that each ``step(closure)`` allocates (grads set to None
    before it), in units of the parameters' bytes, for steps 2..STEPS of
    ``name`` at the registry's defaults (None: plain SGD with momentum);
    whether each step perturbed; and the parameters' bytes."""
    model = _big_model()
    base_kwargs = {"lr": 0.05, "momentum": 0.9}
    if name is None:
        opt: Any = torch.optim.SGD(model.parameters(), **base_kwargs)
        form = "loss"
    else:
        opt = flatminima.create(name, model.parameters(), torch.optim.SGD, **base_kwargs)
        form = flatminima.get_method(name).closure
    pbytes = helpers.param_bytes(model)
    peaks, perturbed = [], []
    gc.disable()  # frees happen at refcount zero, at the same points every run
    try:
        for i, (x, y) in enumerate(_batches()):
            opt.zero_grad(set_to_none=True)
            closure = helpers.make_closure(opt, model, x, y, form)
            before = getattr(opt, "perturbed_steps", 0)
            mode = _LiveBytes()
            with mode:
                opt.step(closure)
            if i > 0:
                peaks.append(mode.peak / pbytes)
                perturbed.append(getattr(opt, "perturbed_steps", 0) > before)
    finally:
        gc.enable()
    return peaks, perturbed, pbytes


@pytest.fixture(scope="module")
def base_peak() -> float:
    peaks, _, _ = step_peaks(None)
    assert max(peaks) - min(peaks) < 1e-9  # every SGD step allocates the same
    assert 1.0 <= peaks[0] < 1.05, peaks  # the gradients, plus small activations
    return peaks[0]


@pytest.mark.parametrize("record", RECORD_LIST, ids=record_id)
def test_extra_copies_at_the_step_peak(record: MethodInfo, base_peak: float) -> None:
    """``MethodSpec.extra_copies`` ("parameter-sized buffers at the step's
    peak") = the parameter-sized buffers a ``step(closure)`` allocates at its
    peak beyond the plain base step (measured; the record's
    ``extra_memory``) + those the method keeps between steps
    (``state_copies_between_steps``, alive through the step)."""
    peaks, perturbed, _ = step_peaks(record.name)
    assert any(perturbed), f"{record.name}: no perturbed step in steps 2..{STEPS}"
    extra = [p - base_peak for p in peaks]
    measured = max(extra)
    copies = round(measured)
    assert abs(measured - copies) < 0.05, (record.name, extra)  # whole buffers, nothing fractional
    assert record.extra_memory is not None, f"{record.name}: set extra_memory={copies} in its record"
    assert copies == record.extra_memory, (record.name, extra)
    spec = flatminima.get_method(record.name)
    assert spec.extra_copies == record.extra_memory + record.state_copies_between_steps, (
        record.name,
        spec.extra_copies,
        record.extra_memory,
        record.state_copies_between_steps,
    )
