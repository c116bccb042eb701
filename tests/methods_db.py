"""The database of methods that drives the common tests: ONE ``MethodInfo``
record per registered method name (in the style of PyTorch's ``OptimizerInfo``,
torch/testing/_internal/common_optimizers.py).

A record holds everything a test needs to know about a method: its plain
reference (tests/reference.py), its configurations (``Case``), the special
cases its formula promises (``Equivalence``), the arguments it must refuse
(``BadArg``: error type + message regex) and its memory expectations. Tests
iterate over the records (or over the flat lists derived from them below) and
never branch on method names.

Adding a method = one ``register_record(MethodInfo(...))`` call (plus its
reference in tests/reference.py). A minimal record::

    register_record(
        MethodInfo(
            "momentum_sam",
            configs=[Case("momentum_sam", "momentum_sam", {"rho": 0.05}, {"rho": 0.05, "norm_eps": 1e-12}, norm_kind="l2")],
            equivalences=[Equivalence("momentum_sam-rho0-is-base", "momentum_sam", {"rho": 0.0}, None)],
            bad_args=[BadArg("momentum_sam", {"rho": -1.0}, ValueError, r"Invalid rho value: -1\\.0")],
            state_copies_between_steps=1,  # e.g. a momentum buffer kept between steps
            extra_memory=1,  # the saved w; test_method_records prints the measured value if wrong
        )
    )

``closure_calls_at_defaults`` defaults to (2,) (a SAM-like step) and the
configurations' closure form to the registry's. tests/test_method_records.py
checks that every registered method has exactly one record, that each record
is complete, and that the records agree with the registry (closure form,
passes_per_step, extra_copies = extra_memory + state_copies_between_steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

import flatminima
from reference import REFERENCES, Reference

CLOSURE_FORMS = ("loss", "per_sample")


@dataclass(frozen=True)
class Case:
    """One method configuration.

    ``kwargs`` go to ``flatminima.create(method, ...)``; ``ref_hparams`` are
    the per-group hyperparameters the reference sees (the method's full
    definition, written out, not read from the library).
    """

    id: str
    method: str
    kwargs: dict[str, Any]
    ref_hparams: dict[str, Any]
    reference: type[Reference] = field(default=None)  # type: ignore[assignment]
    #: the radius the first step promises (tests/test_reference.py): "l2":
    #: ||eps|| = rho; "asam": ||T_w^-1 eps|| = rho with T_w = |w| + eta, eta
    #: read from the group's ref_hparams; None: no such promise, not checked.
    #: With several groups: sum over groups of (norm_g / rho_g)^2 = 1.
    norm_kind: str | None = None
    #: method options of the second param group in multi-group tests (its
    #: reference group gets ref_hparams updated with the same options). A
    #: case with a rho always gets a different rho there: {"rho": rho / 2}
    #: (0.05 when rho is 0) is added unless second_group sets "rho" itself.
    second_group: dict[str, Any] = field(default=None)  # type: ignore[assignment]
    #: LR schedule of the run: a factory ``scheduler(optimizer)`` returning an
    #: object with ``.step()``. A test that runs the case for several steps
    #: builds one over the library optimizer and one over the reference's
    #: base optimizer and steps both after every optimizer step
    #: (``build_schedulers`` below). None: constant lr.
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    #: the closure form the case needs (helpers.make_closure / explicit_step):
    #: "loss": PyTorch's (zero grads, forward, backward, return the loss);
    #: "per_sample": ``closure(indices=None)`` returns the unreduced per-sample
    #: losses of the batch or of the samples ``indices``, and the optimizer
    #: calls backward (ESAM's data selection). None (the default): the
    #: registry's form, ``flatminima.get_method(method).closure`` (the form at
    #: the method's defaults); set it only where the configuration's
    #: hyperparameters change the form (``closure_from_registry`` then is
    #: False; tests/test_method_records.py checks that such an override
    #: really differs from the registry's). Tests that write PyTorch-form
    #: closures by hand run only the "loss" cases.
    closure: str | None = None
    #: closure calls that ``step(closure)`` makes at steps 1, 2, 3, ...: the
    #: pattern repeats (SAM: (2,); SAM every 3 steps: (2, 1, 1)). None: the
    #: count depends on the data (then each step makes 1 or 2 calls, 2 exactly
    #: when it perturbs). tests/test_closure_calls.py checks it.
    closure_calls: tuple[int, ...] | None = (2,)
    #: True when ``closure`` was read from the registry (not set by the case)
    closure_from_registry: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.reference is None:
            object.__setattr__(self, "reference", REFERENCES[self.method])
        if self.norm_kind not in (None, "l2", "asam"):
            raise ValueError(f"{self.id}: unknown norm_kind {self.norm_kind!r}")
        if self.closure is None:
            object.__setattr__(self, "closure", flatminima.get_method(self.method).closure)
            object.__setattr__(self, "closure_from_registry", True)
        if self.closure not in CLOSURE_FORMS:
            raise ValueError(f"{self.id}: unknown closure form {self.closure!r}")
        rho = self.ref_hparams.get("rho")
        second = {} if rho is None else {"rho": rho / 2 if rho else 0.05}
        object.__setattr__(self, "second_group", {**second, **(self.second_group or {})})


@dataclass(frozen=True)
class Equivalence:
    """``method(**kwargs)`` must equal ``other(**other_kwargs)`` bit for bit
    (``other=None``: the plain base optimizer)."""

    id: str
    method: str
    kwargs: dict[str, Any]
    other: str | None
    other_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadArg:
    """``create(method, ..., **kwargs)`` must raise ``error`` whose message
    matches the regular expression ``match`` (``re.search``, as
    ``pytest.raises(match=...)``)."""

    method: str
    kwargs: dict[str, Any]
    error: type[Exception]
    match: str


@dataclass(frozen=True)
class MethodInfo:
    """Everything the common tests know about one registered method."""

    #: the registered method name (``flatminima.list_methods()``)
    name: str
    #: its configurations (``Case.method == name``; ``asam+gc``, SAM with
    #: adaptive and centralize set by hand, belongs to the "sam" record)
    configs: tuple[Case, ...]
    #: special cases of its formula (``Equivalence.method == name``)
    equivalences: tuple[Equivalence, ...]
    #: arguments ``create(name, ...)`` must refuse (``BadArg.method == name``)
    bad_args: tuple[BadArg, ...]
    #: parameter-sized tensors kept in ``opt.state`` / ``opt.method_state``
    #: *between* steps, per parameter (0 for SAM: nothing survives a step);
    #: tests/test_resume.py checks it
    state_copies_between_steps: int
    #: parameter-sized buffers that ``step(closure)`` allocates at its peak
    #: beyond the plain base optimizer's step, at the registry's defaults
    #: (tests/test_method_records.py measures it; with the buffers kept
    #: between steps it makes the registry's ``extra_copies``:
    #: ``extra_copies == extra_memory + state_copies_between_steps``).
    #: None fails that test, which then prints the measured value.
    extra_memory: int | None = None
    #: closure calls that ``step(closure)`` makes at steps 1, 2, 3, ... at the
    #: registry's defaults (``create(name, ...)`` with no method options),
    #: repeating as ``Case.closure_calls``; its mean is the registry's
    #: ``passes_per_step``. None: data-dependent (1 or 2 per step).
    #: tests/test_method_records.py checks both.
    closure_calls_at_defaults: tuple[int, ...] | None = (2,)
    #: the plain reference (tests/reference.py); default REFERENCES[name]
    reference: type[Reference] = field(default=None)  # type: ignore[assignment]
    #: id of the default configuration (capability tests, DEFAULT_CASES);
    #: default: the configuration whose id is ``name``
    default: str = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for attr in ("configs", "equivalences", "bad_args"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        if self.reference is None:
            object.__setattr__(self, "reference", REFERENCES[self.name])
        if self.default is None:
            object.__setattr__(self, "default", self.name)
        for item in (*self.configs, *self.equivalences, *self.bad_args):
            if item.method != self.name:
                raise ValueError(f"record {self.name!r} holds an entry for {item.method!r}: {item}")
        if [c.id for c in self.configs].count(self.default) != 1:
            raise ValueError(f"record {self.name!r}: no single configuration with id {self.default!r}")

    @property
    def default_config(self) -> Case:
        return next(c for c in self.configs if c.id == self.default)


#: method name -> its record, in registration order of the records
RECORDS: dict[str, MethodInfo] = {}

#: every configuration, equivalence and bad argument of every record, in
#: record order (derived: register_record keeps them in sync)
CASES: list[Case] = []
EQUIVALENCES: list[Equivalence] = []
BAD_ARGS: list[BadArg] = []
#: one default configuration per registered method name (for capability tests)
DEFAULT_CASES: list[Case] = []
#: method name -> parameter-sized tensors the method keeps in its own state
#: (``opt.state`` / ``opt.method_state``) *between* steps, per parameter
#: (0 for SAM: nothing survives a step). test_resume.py checks it.
STATE_COPIES_BETWEEN_STEPS: dict[str, int] = {}


def register_record(info: MethodInfo) -> MethodInfo:
    """Add a method's record and extend the derived module-level tables."""
    if info.name in RECORDS:
        raise ValueError(f"method {info.name!r} already has a record")
    taken = {c.id for c in CASES} | {e.id for e in EQUIVALENCES}
    ids = [c.id for c in info.configs] + [e.id for e in info.equivalences]
    clash = (taken & set(ids)) | {i for i in ids if ids.count(i) > 1}
    if clash:
        raise ValueError(f"record {info.name!r}: ids already used: {sorted(clash)}")
    RECORDS[info.name] = info
    CASES.extend(info.configs)
    EQUIVALENCES.extend(info.equivalences)
    BAD_ARGS.extend(info.bad_args)
    DEFAULT_CASES.append(info.default_config)
    STATE_COPIES_BETWEEN_STEPS[info.name] = info.state_copies_between_steps
    return info


def records() -> Iterable[MethodInfo]:
    return RECORDS.values()


# --------------------------------------------------------------------------
# schedules used by configurations


class DecayLR:
    """A hand-made schedule, ``lr *= factor`` after every step. Unlike torch's
    schedulers it sets no ``"initial_lr"`` in the groups (GSAM then takes its
    ``lr_max`` from the first step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: float = 0.7) -> None:
        self.optimizer, self.factor = optimizer, factor

    def step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= self.factor


def linear_decay(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.25, total_iters=5)


def build_schedulers(case: Case, opt: torch.optim.Optimizer, ref_base: torch.optim.Optimizer) -> list[Any]:
    """The case's LR schedulers over the library optimizer and over the
    reference's base optimizer (empty without a schedule): step each after
    every optimizer step."""
    return [] if case.scheduler is None else [case.scheduler(opt), case.scheduler(ref_base)]


# --------------------------------------------------------------------------
# SAM, ASAM, GCSAM

register_record(
    MethodInfo(
        "sam",
        configs=[
            Case("sam", "sam", {"rho": 0.05}, {"rho": 0.05}, norm_kind="l2"),
            Case("sam-rho0.3", "sam", {"rho": 0.3}, {"rho": 0.3}, norm_kind="l2"),
            Case(
                "asam+gc",
                "sam",
                {"rho": 0.5, "adaptive": True, "centralize": True},
                {"rho": 0.5, "adaptive": True, "eta": 0.01, "centralize": True},
                norm_kind="asam",
            ),
        ],
        equivalences=[Equivalence("sam-rho0-is-base", "sam", {"rho": 0.0}, None)],
        bad_args=[
            BadArg("sam", {"rho": -0.1}, ValueError, r"Invalid rho value: -0\.1"),
            BadArg("sam", {"rho": float("nan")}, ValueError, "rho"),
            BadArg("sam", {"rho": "0.05"}, TypeError, "rho must be a real number"),
            BadArg("sam", {"adaptive": 1}, TypeError, "adaptive must be a bool"),
            BadArg("sam", {"max_grad_norm": -1.0}, ValueError, r"Invalid max_grad_norm value: -1\.0"),
        ],
        state_copies_between_steps=0,
        extra_memory=1,
    )
)
register_record(
    MethodInfo(
        "asam",
        configs=[
            Case("asam-eta0.01", "asam", {"rho": 0.5, "eta": 0.01}, {"rho": 0.5, "adaptive": True, "eta": 0.01}, norm_kind="asam"),
            Case("asam-eta0", "asam", {"rho": 2.0, "eta": 0.0}, {"rho": 2.0, "adaptive": True, "eta": 0.0}, norm_kind="asam"),
        ],
        equivalences=[Equivalence("asam-rho0-is-base", "asam", {"rho": 0.0}, None)],
        bad_args=[BadArg("asam", {"eta": -1.0}, ValueError, r"Invalid eta value: -1\.0")],
        state_copies_between_steps=0,
        extra_memory=1,
        # no configuration with id "asam" in the database: the first one is the default
        default="asam-eta0.01",
    )
)
register_record(
    MethodInfo(
        "gcsam",
        configs=[Case("gcsam", "gcsam", {"rho": 0.05}, {"rho": 0.05, "centralize": True}, norm_kind="l2")],
        equivalences=[Equivalence("gcsam-rho0-is-base", "gcsam", {"rho": 0.0}, None)],
        bad_args=[BadArg("gcsam", {"norm_eps": 0.0}, ValueError, r"Invalid norm_eps value: 0\.0")],
        state_copies_between_steps=0,
        extra_memory=1,
    )
)


# --------------------------------------------------------------------------
# WSAM, GSAM, Fisher SAM, FriendlySAM, VaSSO

_GSAM = {"rho_min": None, "alpha": 0.4, "adaptive": False, "eta": 0.01, "lr_max": None, "lr_min": None, "norm_eps": 1e-12}

register_record(
    MethodInfo(
        "wsam",
        configs=[
            Case("wsam", "wsam", {"rho": 0.05, "gamma": 0.9}, {"rho": 0.05, "gamma": 0.9, "decouple": True}, norm_kind="l2"),
            Case(
                "wsam-coupled",
                "wsam",
                {"rho": 0.1, "gamma": 0.8, "decouple": False},
                {"rho": 0.1, "gamma": 0.8, "decouple": False},
                norm_kind="l2",
                second_group={"gamma": 0.6},
            ),
            Case(
                "wsam-adaptive",
                "wsam",
                {"rho": 0.5, "gamma": 0.9, "adaptive": True},
                {"rho": 0.5, "gamma": 0.9, "decouple": True, "adaptive": True, "eta": 0.01},
                norm_kind="asam",
            ),
            Case(
                "wsam-adaptive-coupled-eta0",
                "wsam",
                {"rho": 2.0, "gamma": 0.7, "decouple": False, "adaptive": True, "eta": 0.0},
                {"rho": 2.0, "gamma": 0.7, "decouple": False, "adaptive": True, "eta": 0.0},
                norm_kind="asam",
            ),
            Case(
                "wsam-mixed-groups",
                "wsam",
                {"rho": 0.1, "gamma": 0.85},
                {"rho": 0.1, "gamma": 0.85, "decouple": True},
                norm_kind="l2",
                second_group={"gamma": 0.0},  # no sharpness term in the second group
            ),
            Case(
                "wsam-mixed-modes",
                "wsam",
                {"rho": 0.1, "gamma": 0.85},
                {"rho": 0.1, "gamma": 0.85, "decouple": True},
                norm_kind="l2",
                second_group={"decouple": False, "gamma": 0.5},
                scheduler=linear_decay,
            ),
        ],
        equivalences=[
            Equivalence("wsam-gamma0-coupled-is-base", "wsam", {"gamma": 0.0, "decouple": False}, None),
            Equivalence("wsam-gamma0-decoupled-is-base", "wsam", {"gamma": 0.0, "decouple": True}, None),
            Equivalence(
                "wsam-gamma0.5-coupled-is-sam", "wsam", {"rho": 0.1, "gamma": 0.5, "decouple": False}, "sam", {"rho": 0.1}
            ),
            Equivalence(
                "wsam-adaptive-gamma0.5-coupled-is-asam",
                "wsam",
                {"rho": 0.5, "gamma": 0.5, "decouple": False, "adaptive": True},
                "asam",
                {"rho": 0.5},
            ),
        ],
        bad_args=[
            BadArg("wsam", {"gamma": 1.0}, ValueError, r"Invalid gamma value: 1\.0"),
            BadArg("wsam", {"gamma": -0.1}, ValueError, r"Invalid gamma value: -0\.1"),
            BadArg("wsam", {"decouple": 1}, TypeError, "decouple must be a bool"),
            BadArg("wsam", {"rho": -0.5}, ValueError, r"Invalid rho value: -0\.5"),
            BadArg("wsam", {"eta": -0.01, "adaptive": True}, ValueError, r"Invalid eta value: -0\.01"),
        ],
        state_copies_between_steps=0,
        extra_memory=2,
    )
)
register_record(
    MethodInfo(
        "gsam",
        configs=[
            Case("gsam", "gsam", {"rho": 0.05, "alpha": 0.4}, {**_GSAM, "rho": 0.05}, norm_kind="l2"),
            Case(
                "gsam-adaptive",
                "gsam",
                {"rho": 0.5, "alpha": 0.2, "adaptive": True},
                {**_GSAM, "rho": 0.5, "alpha": 0.2, "adaptive": True},
                norm_kind="asam",
                second_group={"rho": 0.25, "alpha": 1.0},
            ),
            # explicit lr range: constant lr inside it, so rho_t is strictly between rho_min and rho
            Case(
                "gsam-lr-range",
                "gsam",
                {"rho": 0.1, "rho_min": 0.02, "alpha": 0.3, "lr_max": 0.2, "lr_min": 0.0},
                {**_GSAM, "rho": 0.1, "rho_min": 0.02, "alpha": 0.3, "lr_max": 0.2, "lr_min": 0.0},
                second_group={"rho": 0.05, "rho_min": 0.01, "alpha": 0.0},
            ),
            # lr_max from the scheduler's initial_lr, lr_min = 0, rho_t follows the decay
            Case(
                "gsam-schedule",
                "gsam",
                {"rho": 0.1, "rho_min": 0.02, "alpha": 0.3},
                {**_GSAM, "rho": 0.1, "rho_min": 0.02, "alpha": 0.3},
                norm_kind="l2",  # the first step is at lr = lr_max: rho_t = rho
                second_group={"rho": 0.05, "rho_min": 0.05},
                scheduler=linear_decay,
            ),
            # no initial_lr: lr_max is the lr recorded at the first step
            Case(
                "gsam-recorded-lr-max",
                "gsam",
                {"rho": 0.1, "rho_min": 0.0, "alpha": 0.5, "lr_min": 0.001},
                {**_GSAM, "rho": 0.1, "rho_min": 0.0, "alpha": 0.5, "lr_min": 0.001},
                norm_kind="l2",
                second_group={"rho": 0.08},
                scheduler=DecayLR,
            ),
        ],
        equivalences=[
            Equivalence("gsam-alpha0-is-sam", "gsam", {"rho": 0.1, "alpha": 0.0}, "sam", {"rho": 0.1}),
            Equivalence(
                "gsam-alpha0-rho_min=rho-is-sam", "gsam", {"rho": 0.1, "rho_min": 0.1, "alpha": 0.0}, "sam", {"rho": 0.1}
            ),
            Equivalence(
                "gsam-adaptive-alpha0-is-asam", "gsam", {"rho": 0.5, "alpha": 0.0, "adaptive": True}, "asam", {"rho": 0.5}
            ),
        ],
        bad_args=[
            BadArg("gsam", {"alpha": -0.1}, ValueError, r"Invalid alpha value: -0\.1"),
            BadArg("gsam", {"rho": 0.05, "rho_min": 0.1}, ValueError, r"Invalid rho_min value: 0\.1"),
            BadArg("gsam", {"rho_min": -0.01}, ValueError, r"Invalid rho_min value: -0\.01"),
            BadArg("gsam", {"lr_max": 0.1, "lr_min": 0.2}, ValueError, r"Invalid lr_min value: 0\.2"),
            BadArg("gsam", {"lr_max": -1.0}, ValueError, r"Invalid lr_max value: -1\.0"),
            BadArg("gsam", {"rho_min": "0.01"}, TypeError, "rho_min must be a real number"),
        ],
        state_copies_between_steps=0,
        extra_memory=2,
    )
)
register_record(
    MethodInfo(
        "fisher_sam",
        configs=[
            Case("fisher_sam", "fisher_sam", {"rho": 0.1, "eta": 1.0}, {"rho": 0.1, "eta": 1.0, "norm_eps": 1e-12}),
            Case(
                "fisher_sam-eta100",
                "fisher_sam",
                {"rho": 0.05, "eta": 100.0},
                {"rho": 0.05, "eta": 100.0, "norm_eps": 1e-12},
                second_group={"eta": 0.0},
            ),
        ],
        equivalences=[
            Equivalence("fisher_sam-eta0-is-sam", "fisher_sam", {"rho": 0.1, "eta": 0.0}, "sam", {"rho": 0.1}),
            Equivalence("fisher_sam-rho0-is-base", "fisher_sam", {"rho": 0.0}, None),
        ],
        bad_args=[
            BadArg("fisher_sam", {"eta": -1.0}, ValueError, r"Invalid eta value: -1\.0"),
            BadArg("fisher_sam", {"rho": float("inf")}, ValueError, "Invalid rho value: inf"),
        ],
        state_copies_between_steps=0,
        extra_memory=1,
    )
)
register_record(
    MethodInfo(
        "friendly_sam",
        configs=[
            Case(
                "friendly_sam",
                "friendly_sam",
                {"rho": 0.05, "sigma": 1.0, "lam": 0.9},
                {"rho": 0.05, "sigma": 1.0, "lam": 0.9, "norm_eps": 1e-12},
                norm_kind="l2",
            ),
            Case(
                "friendly_sam-rho0.2",
                "friendly_sam",
                {"rho": 0.2, "sigma": 0.5, "lam": 0.6},
                {"rho": 0.2, "sigma": 0.5, "lam": 0.6, "norm_eps": 1e-12},
                norm_kind="l2",
                second_group={"sigma": 0.0, "lam": 0.3},
            ),
        ],
        equivalences=[
            Equivalence("friendly_sam-sigma0-is-sam", "friendly_sam", {"rho": 0.1, "sigma": 0.0}, "sam", {"rho": 0.1}),
            Equivalence("friendly_sam-rho0-is-base", "friendly_sam", {"rho": 0.0}, None),
        ],
        bad_args=[
            BadArg("friendly_sam", {"sigma": -1.0}, ValueError, r"Invalid sigma value: -1\.0"),
            BadArg("friendly_sam", {"lam": 1.0}, ValueError, r"Invalid lam value: 1\.0"),
            BadArg("friendly_sam", {"lam": -0.1}, ValueError, r"Invalid lam value: -0\.1"),
        ],
        state_copies_between_steps=1,
        extra_memory=2,
    )
)
register_record(
    MethodInfo(
        "vasso",
        configs=[
            Case("vasso", "vasso", {"rho": 0.05, "theta": 0.9}, {"rho": 0.05, "theta": 0.9, "norm_eps": 1e-12}, norm_kind="l2"),
            Case(
                "vasso-theta0.4",
                "vasso",
                {"rho": 0.2, "theta": 0.4},
                {"rho": 0.2, "theta": 0.4, "norm_eps": 1e-12},
                norm_kind="l2",
                second_group={"theta": 1.0},
            ),
        ],
        equivalences=[
            Equivalence("vasso-theta1-is-sam", "vasso", {"rho": 0.1, "theta": 1.0}, "sam", {"rho": 0.1}),
            Equivalence("vasso-rho0-is-base", "vasso", {"rho": 0.0}, None),
        ],
        bad_args=[
            BadArg("vasso", {"theta": 0.0}, ValueError, r"Invalid theta value: 0\.0"),
            BadArg("vasso", {"theta": 1.5}, ValueError, r"Invalid theta value: 1\.5"),
            BadArg("vasso", {"norm_eps": -1e-7}, ValueError, "Invalid norm_eps value: -1e-07"),
        ],
        state_copies_between_steps=1,
        extra_memory=2,
    )
)


# --------------------------------------------------------------------------
# LookSAM, SAM every k, ESAM, AE-SAM (issue 4, "cheaper sharpness").
# The periods are chosen so that test_resume's checkpoint (after 4 steps) falls
# in the middle of a period for some cases (k = 3) and on a boundary for
# others (k = 2); test_resume_at_every_phase resumes at every phase of each
# periodic pattern.

_LOOK = {"rho": 0.05, "k": 2, "alpha": 0.7, "layerwise": False, "norm_eps": 1e-12}
_SAM_OPTS = {"adaptive": False, "eta": 0.01, "centralize": False, "norm_eps": 1e-12}
_AE = {**_SAM_OPTS, "rho": 0.05, "sam_fraction": 0.5, "decay": 0.9, "gain": 0.05}
#: ESAM's mask seed. With beta = 0.5 the draw must perturb the first parameter
#: tensor in the first steps: several protocol tests (test_errors'
#: test_grad_only_in_perturbed_pass_is_checked, test_groups'
#: test_add_param_group) use a loss that depends on one tensor or expect a
#: perturbation of the first group; tests/test_closure_calls.py checks that
#: this seed does so.
ESAM_SEED = 74
_ESAM = {"rho": 0.05, "beta": 0.5, "gamma": 1.0, "seed": ESAM_SEED, "norm_eps": 1e-12}

register_record(
    MethodInfo(
        "looksam",
        configs=[
            Case("looksam", "looksam", {"rho": 0.05, "k": 2, "alpha": 0.7}, dict(_LOOK), norm_kind="l2",
                 second_group={"alpha": 0.3}, closure_calls=(2, 1)),
            Case("looksam-k3", "looksam", {"rho": 0.1, "k": 3, "alpha": 1.0}, {**_LOOK, "rho": 0.1, "k": 3, "alpha": 1.0},
                 norm_kind="l2", second_group={"alpha": 0.0}, closure_calls=(2, 1, 1)),
            Case("looksam-layerwise", "looksam", {"rho": 0.05, "k": 3, "alpha": 0.7, "layerwise": True},
                 {**_LOOK, "k": 3, "layerwise": True}, norm_kind="l2", second_group={"alpha": 0.4},
                 closure_calls=(2, 1, 1)),
            Case("looksam-layerwise-k2-schedule", "looksam", {"rho": 0.2, "k": 2, "alpha": 1.5, "layerwise": True},
                 {**_LOOK, "rho": 0.2, "alpha": 1.5, "layerwise": True}, norm_kind="l2", second_group={"alpha": 0.5},
                 scheduler=linear_decay, closure_calls=(2, 1)),
        ],
        equivalences=[
            Equivalence("looksam-k1-is-sam", "looksam", {"rho": 0.1, "k": 1, "alpha": 0.7}, "sam", {"rho": 0.1}),
            Equivalence(
                "looksam-layerwise-k1-is-sam", "looksam", {"rho": 0.1, "k": 1, "alpha": 0.7, "layerwise": True}, "sam",
                {"rho": 0.1},
            ),
            Equivalence(
                "looksam-alpha0-is-sam_every_k", "looksam", {"rho": 0.1, "k": 3, "alpha": 0.0}, "sam_every_k",
                {"rho": 0.1, "k": 3},
            ),
        ],
        bad_args=[
            BadArg("looksam", {"k": 0}, ValueError, "Invalid k value: 0"),
            BadArg("looksam", {"k": 2.5}, TypeError, "k must be an int"),
            BadArg("looksam", {"alpha": -0.1}, ValueError, r"Invalid alpha value: -0\.1"),
            BadArg("looksam", {"layerwise": 1}, TypeError, "layerwise must be a bool"),
            BadArg("looksam", {"norm_eps": 0.0}, ValueError, r"Invalid norm_eps value: 0\.0"),
        ],
        state_copies_between_steps=1,
        extra_memory=2,
        closure_calls_at_defaults=(2, 1, 1, 1, 1),  # k = 5
    )
)
register_record(
    MethodInfo(
        "esam",
        configs=[
            # ESAM with PyTorch's closure form: stochastic weight perturbation
            # only. gamma = 1 (no data selection) is what allows this form: at
            # the defaults (gamma = 0.5) the registry's form is per_sample.
            Case("esam", "esam", {"rho": 0.05, "beta": 0.5, "gamma": 1.0, "seed": ESAM_SEED}, dict(_ESAM),
                 second_group={"beta": 0.8}, closure="loss"),
            # ESAM with per-sample losses (the registry's form): data selection,
            # one extra (no-grad) forward
            Case("esam-sds", "esam", {"rho": 0.1, "beta": 0.6, "gamma": 0.5, "seed": 11},
                 {**_ESAM, "rho": 0.1, "beta": 0.6, "gamma": 0.5, "seed": 11}, second_group={"beta": 0.9},
                 closure_calls=(3,)),
            Case("esam-sds-beta1", "esam", {"rho": 0.05, "beta": 1.0, "gamma": 0.75, "seed": 5},
                 {**_ESAM, "beta": 1.0, "gamma": 0.75, "seed": 5}, norm_kind="l2", closure_calls=(3,)),
            # beta = gamma = 1 with per-sample losses: SAM, and no extra forward
            Case("esam-beta1-gamma1-per-sample", "esam", {"rho": 0.05, "beta": 1.0, "gamma": 1.0},
                 {**_ESAM, "beta": 1.0, "gamma": 1.0}, norm_kind="l2", closure_calls=(2,)),
        ],
        equivalences=[
            # no mask, no selection, no extra forward (tests/test_closure_calls.py counts the calls)
            Equivalence("esam-beta1-gamma1-is-sam", "esam", {"rho": 0.1, "beta": 1.0, "gamma": 1.0}, "sam", {"rho": 0.1}),
        ],
        bad_args=[
            BadArg("esam", {"beta": 0.0}, ValueError, r"Invalid beta value: 0\.0"),
            BadArg("esam", {"beta": 1.5}, ValueError, r"Invalid beta value: 1\.5"),
            BadArg("esam", {"gamma": 0.0}, ValueError, r"Invalid gamma value: 0\.0"),
            BadArg("esam", {"gamma": 1.2}, ValueError, r"Invalid gamma value: 1\.2"),
            BadArg("esam", {"seed": -1}, ValueError, "Invalid seed value: -1"),
            BadArg("esam", {"seed": "1"}, TypeError, "seed must be an int or None"),
            BadArg("esam", {"rho": -0.05}, ValueError, r"Invalid rho value: -0\.05"),
        ],
        state_copies_between_steps=0,
        extra_memory=1,
        closure_calls_at_defaults=(3,),  # gamma = 0.5: clean, no-grad forward, selected
    )
)
register_record(
    MethodInfo(
        "sam_every_k",
        configs=[
            Case("sam_every_k", "sam_every_k", {"rho": 0.05, "k": 2}, {**_SAM_OPTS, "rho": 0.05, "k": 2}, norm_kind="l2",
                 closure_calls=(2, 1)),
            Case("sam_every_k-k3-asam", "sam_every_k", {"rho": 0.5, "k": 3, "adaptive": True},
                 {**_SAM_OPTS, "rho": 0.5, "k": 3, "adaptive": True}, norm_kind="asam", closure_calls=(2, 1, 1)),
        ],
        equivalences=[
            Equivalence("sam_every_k-k1-is-sam", "sam_every_k", {"rho": 0.1, "k": 1}, "sam", {"rho": 0.1}),
            Equivalence(
                "sam_every_k-adaptive-k1-is-asam", "sam_every_k", {"rho": 0.5, "k": 1, "adaptive": True}, "asam",
                {"rho": 0.5},
            ),
            Equivalence("sam_every_k-rho0-is-base", "sam_every_k", {"rho": 0.0, "k": 2}, None),
        ],
        bad_args=[
            BadArg("sam_every_k", {"k": 0}, ValueError, "Invalid k value: 0"),
            BadArg("sam_every_k", {"k": True}, TypeError, "k must be an int"),
            BadArg("sam_every_k", {"rho": -1.0}, ValueError, r"Invalid rho value: -1\.0"),
        ],
        state_copies_between_steps=0,
        extra_memory=1,
        closure_calls_at_defaults=(2, 1, 1, 1, 1),  # k = 5
    )
)
register_record(
    MethodInfo(
        "ae_sam",
        configs=[
            Case("ae_sam", "ae_sam", {"rho": 0.05, "sam_fraction": 0.5}, dict(_AE), norm_kind="l2", closure_calls=None),
            Case("ae_sam-r0.3-asam", "ae_sam",
                 {"rho": 0.5, "sam_fraction": 0.3, "decay": 0.8, "gain": 0.3, "adaptive": True},
                 {**_AE, "rho": 0.5, "sam_fraction": 0.3, "decay": 0.8, "gain": 0.3, "adaptive": True},
                 norm_kind="asam", closure_calls=None),
        ],
        equivalences=[
            Equivalence("ae_sam-r1-is-sam", "ae_sam", {"rho": 0.1, "sam_fraction": 1.0}, "sam", {"rho": 0.1}),
            Equivalence("ae_sam-r0-is-base", "ae_sam", {"rho": 0.1, "sam_fraction": 0.0}, None),
        ],
        bad_args=[
            BadArg("ae_sam", {"sam_fraction": 1.5}, ValueError, r"Invalid sam_fraction value: 1\.5"),
            BadArg("ae_sam", {"decay": 1.0}, ValueError, r"Invalid decay value: 1\.0"),
            BadArg("ae_sam", {"gain": 0.0}, ValueError, r"Invalid gain value: 0\.0"),
            BadArg("ae_sam", {"eta": -0.1}, ValueError, r"Invalid eta value: -0\.1"),
        ],
        state_copies_between_steps=0,
        extra_memory=1,
        closure_calls_at_defaults=None,  # the policy decides
    )
)
register_record(
    MethodInfo(
        "momentum_sam",
        configs=[
            # no radius promise at the first step: there is no momentum yet, so no perturbation
            Case("momentum_sam", "momentum_sam", {"rho": 0.3}, {"rho": 0.3, "norm_eps": 1e-12}, closure_calls=(1,)),
            Case("momentum_sam-rho0.05", "momentum_sam", {"rho": 0.05, "norm_eps": 1e-8},
                 {"rho": 0.05, "norm_eps": 1e-8}, closure_calls=(1,)),
        ],
        equivalences=[Equivalence("momentum_sam-rho0-is-base", "momentum_sam", {"rho": 0.0}, None)],
        bad_args=[
            BadArg("momentum_sam", {"rho": -1.0}, ValueError, r"Invalid rho value: -1\.0"),
            BadArg("momentum_sam", {"norm_eps": 0.0}, ValueError, r"Invalid norm_eps value: 0\.0"),
        ],
        state_copies_between_steps=0,  # the momentum is the base optimizer's own state
        extra_memory=1,
        closure_calls_at_defaults=(1,),
    )
)
