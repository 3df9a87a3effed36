"""What an install carries: every package of the source tree, and the embedded default (fixtures/)
as the package ``rmlx_fixtures``, so a wheel or ``pip install .`` runs the quick start."""

import glob
import subprocess
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PROJECT["tool"]["setuptools"]


def test_every_source_package_is_listed():
    found = set(find_packages(str(ROOT), include=["rmlx*", "reference*", "parity*"]))
    assert set(SETUPTOOLS["packages"]) == found | {"rmlx_fixtures"}
    assert SETUPTOOLS["package-dir"] == {"rmlx_fixtures": "fixtures"}


def test_package_data_covers_every_committed_fixture():
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "fixtures"], capture_output=True, text=True,
                             check=True).stdout.split()
    globs = SETUPTOOLS["package-data"]["rmlx_fixtures"]  # setuptools expands them as glob does
    carried = {f"fixtures/{f}" for g in globs for f in glob.glob(g, root_dir=ROOT / "fixtures", recursive=True)}
    uncovered = [f for f in tracked if f != "fixtures/__init__.py" and f not in carried]
    assert tracked and not uncovered, f"committed fixtures no install carries: {uncovered}"


def test_core_install_needs_only_numpy_safetensors_ml_dtypes_pillow():
    names = {d.split("=")[0].split(">")[0].split("<")[0].split(";")[0].strip().lower()
             for d in PROJECT["project"]["dependencies"]}
    assert names == {"numpy", "safetensors", "pillow", "ml_dtypes"}
    extras = PROJECT["project"]["optional-dependencies"]
    assert {"mlx", "reference", "all", "dev"} <= set(extras)
    assert "rmlx[all]" in extras["dev"]
