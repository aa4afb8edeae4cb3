"""The package's metadata: the version is written once (``maxfusion_kernels.__version__``, which
pyproject reads), and the licence pyproject names is the LICENSE file beside it."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

import maxfusion_kernels

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_version_is_written_once():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "maxfusion_kernels.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", maxfusion_kernels.__version__)


def test_an_installed_distribution_reports_that_version():
    try:
        installed = metadata.version("maxfusion")
    except metadata.PackageNotFoundError:
        pytest.skip("the maxfusion distribution is not installed beside this python")
    assert installed == maxfusion_kernels.__version__


def test_the_license_is_the_apache_2_text_pyproject_names():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text


def test_a_python_file_over_400_lines_says_why_it_is_one_file():
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if {".git", ".venv", "build", "dist"} & set(rel.parts):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > 400 and not any(ln.startswith("One file (over 400 lines) because")
                                        for ln in lines[:12]):
            long.append(f"{rel} ({len(lines)} lines)")
    assert not long, f"split these or say at the top of the docstring why not: {long}"
