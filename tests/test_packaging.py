"""Packaging (issue #16 item 7): the sdist holds every tracked file its
tests need (conftest.py, the helpers, the method database, test data, the
pages and configs the tests read), its tests collect and run from the
unpacked tree, and ``flatminima --version`` shows the package's version.

The wheel in a torch-only venv is checked by hand (README.md, "Development"):
a venv with torch of its own is too slow to make in a test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import flatminima
from flatminima.experiments.cli import main

ROOT = Path(__file__).resolve().parent.parent
#: Tracked files an sdist does not need: the repository's own machinery.
NOT_SHIPPED = {".gitignore", ".ci/run"}
#: What the tests import or read, by name: must ship even outside a git checkout.
NEEDED = ["conftest.py", "pyproject.toml", "tests/conftest.py", "tests/helpers.py", "tests/methods_db.py",
          "tests/reference.py", "tests/fake_cifar.py", "tests/sharpness_helpers.py", "tests/hf_models.py",
          "tests/data/legacy_state_dicts.pt", "configs/cifar10-wrn16-8-sam.toml", "README.md", "RESULTS.md",
          "docs/cli.md", "src/flatminima/py.typed"]


def test_version_flag_shows_the_package_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"flatminima {flatminima.__version__}\n"


def _in_git() -> bool:
    return bool(shutil.which("git")) and (ROOT / ".git").exists()


def _source_copy(dest: Path) -> Path:
    """The tree's source files copied to ``dest``, without build leftovers: an
    old ``*.egg-info/SOURCES.txt`` would put its files in the sdist whatever
    MANIFEST.in says."""
    if _in_git():  # tracked files and new ones not ignored
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
        for name in listed:
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
        return dest
    leftovers = shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "dist", ".pytest_cache", ".hypothesis",
                                       "runs", ".venv")
    shutil.copytree(ROOT, dest, ignore=leftovers, dirs_exist_ok=True)
    return dest


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist built from a copy of this tree (setuptools' PEP 517 backend, offline), unpacked."""
    pytest.importorskip("setuptools")
    source = _source_copy(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("sdist")
    built = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"],
                           cwd=source, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    name = built.stdout.strip().splitlines()[-1]
    with tarfile.open(out / name) as tar:
        tar.extractall(out, filter="data")
    (tree,) = [p for p in out.iterdir() if p.is_dir()]
    return tree


def test_the_sdist_ships_what_its_tests_need(sdist: Path) -> None:
    shipped = {p.relative_to(sdist).as_posix() for p in sdist.rglob("*") if p.is_file()}
    assert set(NEEDED) <= shipped, sorted(set(NEEDED) - shipped)
    assert {f"tests/{p.name}" for p in (ROOT / "tests").glob("*.py")} <= shipped
    pkg_info = (sdist / "PKG-INFO").read_text()
    assert f"\nVersion: {flatminima.__version__}\n" in pkg_info
    if _in_git():  # a checkout: every tracked file, less the machinery
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        missing = {f for f in tracked.splitlines() if (ROOT / f).is_file()} - NOT_SHIPPED - shipped
        assert not missing, sorted(missing)


def test_the_sdists_tests_collect_and_run_from_the_unpacked_tree(sdist: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(sdist / "src")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "tests/test_method_records.py", "tests/test_cifar_recipe.py", "-k", "papers_settings"],
                          cwd=sdist, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed" in done.stdout and "error" not in done.stdout.lower()
