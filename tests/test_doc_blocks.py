"""Every ```python block of README.md and docs/ runs.

The blocks of one page run in order in one namespace, as a reader would
paste them into one session, starting from the names a page's prose assumes
(``SETUP``: a small classifier ``model``, a batch ``x``, ``y``, a
``loss_fn``/``criterion``, a ``loader`` of batches and the usual imports).
A block preceded by ``<!-- doc-test: skip REASON -->`` is skipped with that
reason (it needs a GPU, torchrun or the CIFAR data).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

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
"""


def _blocks(page: Path) -> list[tuple[str, str | None]]:
    return [(m["code"], m["skip"]) for m in FENCE.finditer(page.read_text())]


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # what a block writes stays in the test's folder
    namespace: dict[str, Any] = {"__name__": "__doc_block__"}
    exec(compile(SETUP, "<setup>", "exec"), namespace)
    skipped = []
    for i, (code, skip) in enumerate(_blocks(page)):
        if skip:
            skipped.append(f"block {i + 1}: {skip}")
            continue
        try:
            exec(compile(code, f"{page.name}[block {i + 1}]", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{page.relative_to(ROOT)} block {i + 1} fails: {type(err).__name__}: {err}\n{code}") from err
    if skipped and len(skipped) == len(_blocks(page)):
        pytest.skip("; ".join(skipped))
