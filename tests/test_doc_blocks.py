"""Every ```python block of README.md and docs/ runs.

The blocks of one page run in order in one namespace, as a reader would
paste them into one session, starting from the names a page's prose assumes
(``SETUP``: a small classifier ``model``, a batch ``x``, ``y``, a
``loss_fn``/``criterion``, a ``loader`` of batches and the usual imports).
A block preceded by ``<!-- doc-test: skip REASON -->`` is skipped with that
reason (it needs a GPU, torchrun or the CIFAR data). ``FAST`` shortens
what would only take longer (``epochs=10`` runs 1 epoch); nothing else of a
block is changed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from flatminima import registry

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"(?:<!-- doc-test: skip (?P<skip>[^>]*?) -->\s*\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)

SETUP = """
import torch
from torch import nn
import flatminima

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
net = model
x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
loader = [(torch.randn(16, 10), torch.randint(0, 3, (16,))) for _ in range(3)]
loss_fn = criterion = nn.functional.cross_entropy
opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
num_steps = steps = total_steps = 10
Net = lambda: nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
v = [torch.randn_like(p) for p in model.parameters()]
"""

TWO_MODELS = """
import copy
sgd_model, sam_model = model, copy.deepcopy(model)  # two trained models of one architecture
test_batches = [(torch.randn(16, 10), torch.randint(0, 3, (16,)))]
"""

#: what a page's prose assumes beyond SETUP
PAGE_SETUP = {
    "docs/sharpness.md": TWO_MODELS,
    "README.md": TWO_MODELS,
    "docs/lightning.md": "self = model  # the fragments come from a LightningModule's configure_optimizers",
    "docs/hf.md": """
import transformers
from accelerate.state import AcceleratorState, GradientState
from hf_models import bert, dataset

AcceleratorState._reset_state(True)  # a fresh process's accelerate, whatever ran before in this one
GradientState._reset_state()
transformers.logging.set_verbosity_error()
model = bert()
model.train()
train = val = dataset("bert")
loader = [{k: v.unsqueeze(0) for k, v in row.items()} for row in train]
training_args = transformers.TrainingArguments(
    "out", max_steps=2, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
""",
}


FAST = {"epochs=10": "epochs=1"}


def _fast(code: str) -> str:
    for slow, quick in FAST.items():
        code = code.replace(slow, quick)
    return code


def _blocks(page: Path) -> list[tuple[str, str | None]]:
    return [(m["code"], m["skip"]) for m in FENCE.finditer(page.read_text())]


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # what a block writes stays in the test's folder
    # a block may register a method (docs/composition.md): the other tests must not see it
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    namespace: dict[str, Any] = {"__name__": "__doc_block__"}
    exec(compile(SETUP, "<setup>", "exec"), namespace)
    exec(compile(PAGE_SETUP.get(str(page.relative_to(ROOT)), ""), "<page setup>", "exec"), namespace)
    skipped = []
    for i, (code, skip) in enumerate(_blocks(page)):
        if skip:
            skipped.append(f"block {i + 1}: {skip}")
            continue
        try:
            exec(compile(_fast(code), f"{page.name}[block {i + 1}]", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{page.relative_to(ROOT)} block {i + 1} fails: {type(err).__name__}: {err}\n{code}") from err
    if skipped and len(skipped) == len(_blocks(page)):
        pytest.skip("; ".join(skipped))
