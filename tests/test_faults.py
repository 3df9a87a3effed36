"""Planted defects: each one, switched on through the documented switch, fails the run (exit 1)
and is named at its declared stage, in both modes. The clean run is green (tests/test_parity.py)."""

import json
import os
import subprocess
import sys

import pytest

from parity.cli import main
from rmlx import faults
from tests.conftest import FIXTURES, MODELS

IMAGES = [FIXTURES / "images" / n for n in ("gradient.png", "white-card.png", "wide-100x150.png")]


@pytest.mark.parametrize("mode", ["teacher", "free"])
@pytest.mark.parametrize("name", sorted(faults.CATALOG))
def test_planted_defect_is_caught_at_its_stage(name, mode, tmp_path):
    args = ["run", "--inject", name, "--mode", mode, "--report-dir", str(tmp_path / "rep"),
            "--json", str(tmp_path / "r.json"), "--no-oracle"]
    for m in MODELS:
        args += ["--model", str(m)]
    for i in IMAGES:
        args += ["--image", str(i)]
    assert main(args) == 1
    rec = json.loads((tmp_path / "r.json").read_text())
    expected = faults.CATALOG[name].stage
    assert rec["first_divergence"]["stage"] == expected
    assert rec["settings"]["inject"] == [name]
    for case in rec["cases"]:  # every case that fails, fails first at the declared stage
        if not case["passed"]:
            assert case["first_divergence"]["stage"] == expected, case["name"]
    assert faults.enabled() == frozenset()  # switched off again after the run


def test_env_var_switch(tmp_path):
    env = dict(os.environ, RMLX_INJECT="posemb-xy-swap")
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "run", "--model", str(MODELS[0]),
                           "--image", str(IMAGES[0]), "--report-dir", str(tmp_path / "rep"),
                           "--json", str(tmp_path / "r.json"), "--no-oracle"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["first_divergence"]["stage"] == "vision.pos_embed"
    assert "First divergent stage: vision.pos_embed" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["inject"] == ["posemb-xy-swap"]
