"""The settings of an experiment: one dataclass, filled in three layers,
defaults < TOML file (``--config``) < command-line flags.

A TOML file uses the field names below as top-level keys (``-`` or ``_``)
and tables for the per-method hyperparameters and extra optimizer
arguments::

    dataset = "mnist1d"
    methods = ["sgd", "sam:rho=0.3", "asam"]
    seeds = 3                 # or a list: [0, 1, 2]
    epochs = 40
    noise = 0.3               # default 0: clean labels

    [hparams.asam]            # applies wherever asam appears
    rho = 2.0

    [optimizer_args]          # passed to the base optimizer
    dampening = 0.0

``ExperimentConfig`` is what :func:`flatminima.experiments.compare` and
:func:`flatminima.experiments.train_run` take, so a command line can be
replayed from Python: ``ExperimentConfig(**json.load(open("config.json"))["config"])``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# The default methods: plain SGD against three sharpness-aware methods. The
# radii are larger than the library defaults (tuned for clean data): they are
# set for the label-noise demo (`make demo`: `--noise 0.3`), where a larger
# neighbourhood is what keeps the noise from being memorised (as in the
# label-noise experiments of the SAM paper). See RESULTS.md.
DEFAULT_METHODS = ("sgd", "sam:rho=0.3", "asam:rho=3.0", "wsam:rho=0.3")


def _f(default: Any, kind: str, help: str, **extra: Any) -> Any:
    meta = {"kind": kind, "help": help, **extra}
    if isinstance(default, (list, dict)):
        def fresh_copy() -> Any:
            return type(default)(default)

        return field(default_factory=fresh_copy, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ExperimentConfig:
    """Every setting that decides the numbers of an experiment."""

    # ---- data
    dataset: str = _f("mnist1d", "str", "data set: mnist1d (generated locally), digits (scikit-learn), cifar10, cifar100 (from --data-dir)")
    data_dir: str | None = _f(None, "optional_str", "folder of the CIFAR batches (python or binary version), and where MNIST-1D is cached (default: $FLATMINIMA_DATA or ~/.cache/flatminima)")
    num_samples: int = _f(10000, "int", "MNIST-1D examples to generate (80%% train, 20%% test)")
    train_size: int | None = _f(None, "optional_int", "use only the first N training examples")
    test_size: int | None = _f(None, "optional_int", "use only the first N test examples")
    noise: float = _f(0.0, "float", "share of training labels replaced by a wrong class, in [0, 1); test labels stay "
                      "clean. 0 (clean labels) unless asked for: the label-noise demo asks for 0.3")
    noise_type: str = _f("symmetric", "str", "symmetric (a uniformly drawn wrong class), asymmetric (each of some classes to a similar one, a documented mapping per data set: mnist1d, digits, cifar10) or pairflip (class c -> c+1)")
    augment: bool = _f(False, "bool", "augment training batches: random shift (1-D), crop (+flip for CIFAR)")
    # ---- model
    model: str = _f("auto", "str", "mlp, resnet1d, cnn1d, cnn, wrn, or auto (mlp for mnist1d, cnn for digits, wrn for CIFAR)")
    width: int | None = _f(None, "optional_int", "model width: MLP hidden units (256), resnet1d/cnn channels (32), cnn1d channels (25), WRN widen factor (4)")
    depth: int | None = _f(None, "optional_int", "model depth: MLP hidden layers (2), resnet1d blocks per stage (1), WRN depth (16)")
    dropout: float = _f(0.0, "float", "dropout inside the WRN blocks")
    # ---- methods and optimizer
    methods: list[str] = _f(list(DEFAULT_METHODS), "methods", "methods to compare: registry names (see `flatminima list`), "
                            "'sgd', 'adamw', ... (a plain torch optimizer), 'base' (plain --optimizer), or 'all'; "
                            "NAME:key=value,... sets options inline")
    hparams: dict[str, dict[str, Any]] = _f({}, "hparams", "method hyperparameters, METHOD.KEY=VALUE or KEY=VALUE (every method that has KEY)")
    optimizer: str = _f("sgd", "str", "base optimizer: a torch.optim class name (sgd, adamw, ...)")
    # None: each optimizer gets its own default (methods.default_lr): one shared rate
    # would leave AdamW at chance with SGD's 0.1.
    lr: float | None = _f(None, "optional_float", "peak learning rate, for every optimizer of the run (default: each "
                          "optimizer's own, printed in the header: 0.1 for sgd, torch's default for the others, "
                          "e.g. 0.001 for adam and adamw)")
    momentum: float | None = _f(None, "optional_float", "momentum (default 0.9 for sgd; only for optimizers that take it)")
    nesterov: bool = _f(False, "bool", "Nesterov momentum (sgd)")
    weight_decay: float = _f(5e-4, "float", "weight decay")
    optimizer_args: dict[str, Any] = _f({}, "kv", "extra base-optimizer arguments, KEY=VALUE")
    # ---- schedule
    epochs: int = _f(40, "int", "training epochs")
    batch_size: int = _f(128, "int", "batch size (the global batch under torchrun)")
    schedule: str = _f("cosine", "str", "learning-rate schedule after warm-up: cosine or constant")
    warmup_epochs: float = _f(0.0, "float", "linear warm-up length in epochs (may be fractional)")
    min_lr: float = _f(0.0, "float", "learning rate at the end of the cosine schedule")
    label_smoothing: float = _f(0.0, "float", "label smoothing of the training loss, in [0, 1)")
    m_sharpness: int | None = _f(None, "optional_int", "m-sharpness: each chunk of M samples of a (per-process) batch "
                                 "gets its own eps, and the step averages the chunks' gradients (default: one eps "
                                 "per batch, across processes too)")
    amp: str = _f("off", "str", "mixed precision: off, bf16 (autocast) or fp16 (autocast and a GradScaler)")
    # ---- runs
    seeds: list[int] = _f([0, 1, 2], "seeds", "seeds: a count N (0..N-1) or a list; each seed fixes init, data order, augmentation and label noise")
    device: str = _f("auto", "str", "auto, cpu, cuda or cuda:N")
    threads: int = _f(1, "int", "CPU threads for torch; 0 = torch's choice. One is the default: the small "
                      "models here gain little from more, a shared CPU loses much, and results do not depend on the core count")
    deterministic: bool = _f(True, "bool", "deterministic algorithms (bit-exact reruns and resumes on CPU)")
    eval_batch_size: int = _f(1000, "int", "batch size of evaluation")

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ExperimentConfig:
        return build_config(self.to_dict(), changes)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
# Settings that may differ when a run is resumed (they do not change the numbers).
RESUME_FREE = frozenset({"data_dir", "device"})


# ------------------------------------------------------------------ value parsing
def parse_value(text: str) -> Any:
    """A value written on the command line: bool, None, int, float, tuple/list, else str.

    >>> [parse_value(t) for t in ["3", "0.5", "yes", "none", "(0.9, 0.99)", "cosine"]]
    [3, 0.5, True, None, (0.9, 0.99), 'cosine']
    """
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    import ast

    try:
        return ast.literal_eval(t)
    except (ValueError, SyntaxError):
        return t


def parse_assignment(text: str, what: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{what} must look like KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(value)


def parse_hparam_flags(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--hparam`` flags by method (``"*"``: every method that has the key).

    >>> parse_hparam_flags(["sam.rho=0.3", "gamma=0.8"])
    {'sam': {'rho': 0.3}, '*': {'gamma': 0.8}}
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, value = parse_assignment(item, "--hparam")
        method, dot, name = key.rpartition(".")
        out.setdefault(method if dot else "*", {})[name] = value
    return out


#: The most seeds a comparison takes: more is a typo, not an experiment.
MAX_SEEDS = 10_000


def parse_seeds(value: Any) -> list[int]:
    if isinstance(value, str):
        parts = [p for p in value.replace(",", " ").split() if p]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--seeds must be a count or a list of integers, got {value!r}") from None
        value = nums[0] if len(nums) == 1 else nums
    if isinstance(value, bool):
        raise ConfigError(f"seeds must be a count or a list of integers, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"--seeds (a count) must be >= 1, got {value}")
        if value > MAX_SEEDS:  # checked before the list is made: 10**11 seeds do not fit in memory
            raise ConfigError(f"--seeds {value}: at most {MAX_SEEDS} seeds (one run each per method); give a "
                              "smaller count, or a list of seeds such as 0,5,7")
        return list(range(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(value) > MAX_SEEDS:
            raise ConfigError(f"seeds: at most {MAX_SEEDS} seeds (one run each per method), got a list of {len(value)}")
        if len(set(value)) != len(value):
            raise ConfigError(f"seeds must be distinct, got {list(value)}")
        if min(value) < 0:
            raise ConfigError(f"seeds must be >= 0, got {list(value)}")
        return list(value)
    raise ConfigError(f"seeds must be a count or a non-empty list of integers, got {value!r}")


def _coerce(name: str, value: Any) -> Any:
    kind = FIELDS[name].metadata["kind"]
    flag = "--" + name.replace("_", "-")

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{flag} must be {expected}, got {value!r}")

    if kind.startswith("optional_"):
        if value is None:
            return None
        kind = kind[len("optional_"):]
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "seeds":
        return parse_seeds(value)
    if kind == "methods":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(m, str) for m in value):
            raise bad("a non-empty list of method names")
        return list(value)
    if kind == "kv":
        if not isinstance(value, Mapping):
            raise bad("a table of KEY = VALUE")
        return dict(value)
    if kind == "hparams":
        if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
            raise bad("a table of method tables, e.g. [hparams.sam] rho = 0.1")
        return {str(k): dict(v) for k, v in value.items()}
    raise AssertionError(kind)


def _normalise_keys(d: Mapping[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(FIELDS)}"
            raise ConfigError(f"unknown setting {key!r} in {source}{hint}")
        out[name] = value
    return out


def build_config(*layers: Mapping[str, Any], sources: tuple[str, ...] = ()) -> ExperimentConfig:
    """Defaults overlaid with each mapping in turn, coerced and validated.
    ``hparams`` and ``optimizer_args`` merge key by key; other settings replace."""
    values: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        source = sources[i] if i < len(sources) else "the settings"
        for name, value in _normalise_keys(layer, source).items():
            value = _coerce(name, value)
            if name == "hparams" and name in values:
                merged = {m: dict(kv) for m, kv in values[name].items()}
                for m, kv in value.items():
                    merged.setdefault(m, {}).update(kv)
                value = merged
            elif name == "optimizer_args" and name in values:
                value = {**values[name], **value}
            values[name] = value
    cfg = ExperimentConfig(**values)
    validate(cfg)
    return cfg


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML settings file; clear errors for a missing or malformed file."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading --config files on Python 3.10 needs tomli: pip install tomli") from None
    p = Path(path).expanduser()
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a folder, not a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML (not UTF-8 text: {e})") from None
    return data


# ------------------------------------------------------------------ validation
def validate(cfg: ExperimentConfig) -> None:
    """Range checks that need no imports beyond this package; method and
    optimizer names are checked by :func:`flatminima.experiments.methods.resolve_methods`."""
    from .data import DATASETS
    from .models import MODELS
    from .noise import check_noise

    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; choose from {', '.join(DATASETS)}")
    if cfg.model not in MODELS:
        raise ConfigError(f"unknown model {cfg.model!r}; choose from {', '.join(MODELS)}")
    check_noise(cfg.noise, cfg.noise_type, cfg.dataset)
    if cfg.dataset == "mnist1d" and cfg.model in ("cnn", "wrn"):
        raise ConfigError(f"model {cfg.model} needs images; dataset mnist1d holds 1-D signals (use mlp, cnn1d or resnet1d)")
    if cfg.dataset != "mnist1d" and cfg.model in ("resnet1d", "cnn1d"):
        raise ConfigError(f"model {cfg.model} needs 1-D signals; dataset {cfg.dataset} holds images (use cnn, wrn or mlp)")
    positive = ("num_samples", "epochs", "batch_size", "eval_batch_size")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_samples < 20:
        raise ConfigError(f"--num-samples must be >= 20, got {cfg.num_samples}")
    if cfg.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = torch's choice), got {cfg.threads}")
    for name in ("train_size", "test_size", "width", "depth"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    finite = ("weight_decay", "warmup_epochs", "min_lr", "label_smoothing", "dropout", "noise")
    for name in finite:
        v = getattr(cfg, name)
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"--lr must be a finite number > 0, got {cfg.lr}")
    if cfg.momentum is not None and not (0.0 <= cfg.momentum < 1.0):
        raise ConfigError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.lr is not None and cfg.min_lr > cfg.lr:  # against each optimizer's default lr: methods.optimizer_settings
        raise ConfigError(f"--min-lr ({cfg.min_lr}) must not exceed --lr ({cfg.lr})")
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"--warmup-epochs ({cfg.warmup_epochs}) must not exceed --epochs ({cfg.epochs})")
    if not cfg.label_smoothing < 1.0:
        raise ConfigError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not cfg.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.m_sharpness is not None and cfg.m_sharpness < 1:
        raise ConfigError(f"--m-sharpness must be >= 1, got {cfg.m_sharpness}")
    if cfg.amp not in ("off", "bf16", "fp16"):
        raise ConfigError(f"--amp must be off, bf16 or fp16, got {cfg.amp!r}")
    if cfg.schedule not in ("cosine", "constant"):
        raise ConfigError(f"--schedule must be cosine or constant, got {cfg.schedule!r}")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {dev!r}")


def noise_text(cfg: ExperimentConfig) -> str:
    """The label noise of ``cfg`` in words, for headers and plot titles.

    >>> noise_text(ExperimentConfig()), noise_text(ExperimentConfig(noise=0.3))
    ('clean labels', '30% symmetric label noise on the training labels')
    """
    return f"{cfg.noise:.0%} {cfg.noise_type} label noise on the training labels" if cfg.noise else "clean labels"


def config_differences(saved: Mapping[str, Any], current: ExperimentConfig) -> list[str]:
    """Settings (other than :data:`RESUME_FREE`) in which ``current`` differs from ``saved``."""
    now = current.to_dict()
    diffs = []
    for key in FIELDS:
        if key in RESUME_FREE:
            continue
        if key not in saved:
            diffs.append(f"{key}: (absent) -> {now[key]!r}")
        elif _jsonish(saved[key]) != _jsonish(now[key]):
            diffs.append(f"{key}: {saved[key]!r} -> {now[key]!r}")
    return diffs


def _jsonish(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonish(x) for x in v]
    if isinstance(v, list):
        return [_jsonish(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonish(x) for k, x in v.items()}
    return v
