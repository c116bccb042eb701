"""The docs match the signatures: every argument a docs/methods page's
argument table lists is an argument of that method's constructor (its
``__signature__``, built from the option declarations by ``_declare``), with
the default the table gives; and every option a method declares for itself
(not the shared ones, nor the protocol's) is in its page's table.

(Six pages once documented ``eps`` for ``norm_eps``; with Adam, ``eps=``
silently set Adam's own ``eps``.)
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import flatminima
from flatminima import _options

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs" / "methods").glob("*.md"))


def argument_rows(page: Path) -> list[tuple[list[str], str]]:
    """The rows of the page's "## Arguments" table: (names, default cell)."""
    text = page.read_text()
    match = re.search(r"^## Arguments\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"{page.name}: no '## Arguments' section"
    rows = []
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 2 or cells[0] == "argument" or set(cells[0]) <= {"-"}:
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        assert names, f"{page.name}: a row without a `name`: {line!r}"
        rows.append(([n for n in names if not n.startswith("**")], cells[1]))
    assert rows, f"{page.name}: an empty argument table"
    return rows


def spec_of(page: Path) -> flatminima.MethodSpec:
    specs = [flatminima.get_method(n) for n in flatminima.list_methods()]
    found = [s for s in specs if s.doc == f"docs/methods/{page.name}"]
    assert len(found) == 1, f"{page.name}: documents {len(found)} registered methods"
    return found[0]


def defaults_of(spec: flatminima.MethodSpec) -> dict[str, object]:
    """Constructor argument -> default, as ``create(name, ...)`` gives it (the preset applied)."""
    params = inspect.signature(spec.cls).parameters
    out = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {**out, **spec.preset}


def literal(cell: str) -> list[object] | None:
    """The default cell as values (``0.05, False``), or None when it is prose."""
    try:
        value = ast.literal_eval(f"({cell},)") if cell else None
    except (ValueError, SyntaxError):
        return None
    return list(value) if isinstance(value, tuple) else None


def test_every_registered_method_has_a_page() -> None:
    assert {spec_of(p).name for p in PAGES} == set(flatminima.list_methods())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_table_arguments_are_constructor_arguments(page: Path) -> None:
    spec = spec_of(page)
    defaults = defaults_of(spec)
    for names, cell in argument_rows(page):
        unknown = [n for n in names if n not in defaults]
        assert not unknown, (
            f"{page.name} documents {unknown}, which {spec.cls.__name__}'s constructor does not take "
            f"(its arguments: {sorted(defaults)}); a keyword it does not take goes to the base optimizer"
        )
        values = literal(cell)
        if values is not None and len(values) == len(names):
            got = dict(zip(names, values))
            want = {n: defaults[n] for n in names}
            assert got == want, f"{page.name}: documented defaults {got}, constructor's {want}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_own_options_are_documented(page: Path) -> None:
    spec = spec_of(page)
    listed = {n for names, _ in argument_rows(page) for n in names}
    own = [n for n in defaults_of(spec) if n not in _options.SHARED and n not in _options.PROTOCOL]
    missing = [n for n in own if n not in listed]
    assert not missing, f"{page.name} does not document {spec.cls.__name__}'s own option(s) {missing}"


def test_sam_page_lists_the_protocol_options() -> None:
    """The pages say "as for SAM" for the protocol's options: sam.md has a row for each."""
    listed = {n for names, _ in argument_rows(ROOT / "docs" / "methods" / "sam.md") for n in names}
    assert set(_options.PROTOCOL) <= listed, sorted(set(_options.PROTOCOL) - listed)
