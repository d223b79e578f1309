"""The bundled weights are package data (``refine_cli._bundled``), found through the import system.

``pyproject.toml`` maps the package ``refine_cli._bundled`` onto the top-level ``weights/`` folder, so
a wheel install carries the checkpoints and an editable install resolves them in the checkout; the
wheel itself is checked end to end by ``.ci/run`` (fresh venv, ``refine run --method cascade``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from refine_cli import weights
from refine_cli.errors import WeightsError

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
BUNDLED_RECORDS = [r for r in weights.list_records() if r.bundled]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_bundled_folder_is_the_mapped_package():
    spec = importlib.util.find_spec(weights.BUNDLED_PACKAGE)
    assert spec is not None and spec.submodule_search_locations, "refine_cli._bundled is not importable"
    package_dir = Path(next(iter(spec.submodule_search_locations))).resolve()
    assert weights.bundled_dir().resolve() == package_dir
    # editable install: the finder maps the name onto the checkout's weights/; wheel install: the
    # folder is refine_cli/_bundled/ beside the installed refine_cli package
    import refine_cli

    installed = Path(refine_cli.__file__).resolve().parent / "_bundled"
    assert package_dir in {installed, (REPO / "weights").resolve()}


def test_the_lookup_goes_through_the_import_system(tmp_path, monkeypatch):
    (tmp_path / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location(
        weights.BUNDLED_PACKAGE, tmp_path / "__init__.py", submodule_search_locations=[str(tmp_path)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, weights.BUNDLED_PACKAGE, module)
    assert weights.bundled_dir() == tmp_path
    assert weights.bundled_path(weights.get_record(weights.DEFAULT_CASCADEPSP_LITE)) == (
        tmp_path / f"{weights.DEFAULT_CASCADEPSP_LITE}.pt")


def test_a_missing_bundled_package_says_how_to_fix_it(monkeypatch):
    monkeypatch.setitem(sys.modules, weights.BUNDLED_PACKAGE, None)  # import raises ModuleNotFoundError
    with pytest.raises(WeightsError, match=r"pip install -e \."):
        weights.bundled_dir()
    assert weights.bundled_path(weights.get_record(weights.DEFAULT_CASCADEPSP)) is None  # nothing bundled


@pytest.mark.parametrize("record", BUNDLED_RECORDS, ids=lambda r: r.name)
def test_every_bundled_record_resolves_through_the_package_and_verifies(record):
    path = weights.bundled_path(record)
    assert path is not None and path.is_file(), f"{record.bundled} is missing from {weights.bundled_dir()}"
    assert path.parent == weights.bundled_dir()
    assert path.stat().st_size == record.size
    assert _sha256(path) == record.sha256
    sidecar = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["sha256"] == record.sha256
    assert weights.local_file(record.name) == (path, "bundled")  # empty REFINE_HOME (conftest)
    assert weights.verify(record.name).sha256 == record.sha256


def test_pyproject_lists_every_subpackage_and_ships_every_weights_file():
    packages = set(SETUPTOOLS["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "refine_cli").rglob("__init__.py")}
    missing = sorted(on_disk - packages)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    assert SETUPTOOLS["package-dir"][weights.BUNDLED_PACKAGE] == "weights"
    patterns = SETUPTOOLS["package-data"][weights.BUNDLED_PACKAGE]
    shipped = [f for f in (REPO / "weights").iterdir() if f.is_file() and f.suffix != ".py"]
    missed = [f.name for f in shipped if not any(fnmatch.fnmatch(f.name, p) for p in patterns)]
    assert not missed, f"weights/ files that the wheel would leave out (package-data patterns {patterns})"
    assert {r.bundled for r in BUNDLED_RECORDS} <= {f.name for f in shipped}


@pytest.mark.slow
def test_the_wheel_carries_the_bundled_weights(tmp_path):
    src = tmp_path / "src"  # a copy: an in-tree build would leave build/ in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("refine_cli", "weights"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("refine_cli-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert not [n for n in names if n.startswith("weights/")]
        for record in BUNDLED_RECORDS:
            member = f"refine_cli/_bundled/{record.bundled}"
            assert member in names and f"{member[:-3]}.json" in names
            assert hashlib.sha256(zf.read(member)).hexdigest() == record.sha256
        assert "refine_cli/_bundled/README.md" in names and "refine_cli/_bundled/__init__.py" in names
