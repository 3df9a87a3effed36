"""Planted defects: each one, switched on through the documented switch, fails the run (exit 1)
and is named at its declared stage, in both modes. The clean run is green (tests/test_parity.py)."""

import fnmatch
import json
import os
import subprocess
import sys

import pytest

from parity.cli import main
from rmlx import faults
from rmlx.config import ModelArgs
from tests.conftest import MODELS

# fault -> the scenarios that exercise it (kept small: each run loads both models once)
CASES = {
    "bgr-patchify": ["image/gradient", "image/white-card", "image/wide-100x150"],
    "patch-ln1-eps": ["image/gradient", "image/white-card", "image/wide-100x150"],
    "posemb-xy-swap": ["image/gradient", "image/white-card", "image/wide-100x150"],
    "vision-causal": ["image/gradient"],
    "overlay-crosses-blocks": ["two-images"],
    "rope-partial-slice": ["text-only"],
    "rmsnorm-one-plus-w": ["text-only"],
    "softcap-skipped": ["text-only"],
    "sliding-cache-off-by-one": ["text-only"],
}


def first_full_layer(model) -> int:
    return ModelArgs.from_file(model / "config.json").text.layer_types.index("full_attention")


def test_every_runtime_fault_has_cases():
    codec = {n for n in faults.CATALOG if n.startswith("mx-")}  # tests/test_quant.py runs those
    assert set(CASES) == set(faults.CATALOG) - {"k-eq-v-ignored"} - codec


@pytest.mark.parametrize("mode", ["teacher", "free"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_planted_defect_is_caught_at_its_stage(name, mode, tmp_path):
    args = ["run", "--inject", name, "--mode", mode, "--report-dir", str(tmp_path / "rep"),
            "--json", str(tmp_path / "r.json"), "--no-oracle", "--decode-steps", "2"]
    for case in CASES[name]:
        args += ["--case", case]
    assert main(args) == 1
    rec = json.loads((tmp_path / "r.json").read_text())
    declared = faults.CATALOG[name].stage
    assert fnmatch.fnmatchcase(rec["first_divergence"]["stage"], declared), rec["first_divergence"]["stage"]
    assert rec["settings"]["inject"] == [name]
    failed = [c for c in rec["cases"] if not c["passed"]]
    assert failed
    for case in failed:  # every case that fails, fails first at the declared stage
        stage = case["first_divergence"]["stage"]
        assert fnmatch.fnmatchcase(stage, declared), (case["name"], stage)
        if name == "sliding-cache-off-by-one":  # the prefill is clean; a decode step is not
            assert all(s["passed"] for s in case["stages"]) and "decode step" in case["first_divergence"]["message"]
        if name == "rope-partial-slice":
            model = next(m for m in MODELS if m.name == case["model"])
            assert stage == f"layers.{first_full_layer(model)}.attn.q"
    assert faults.enabled() == frozenset()  # switched off again after the run


def test_k_eq_v_ignored_fails_at_load_naming_the_tensor(tmp_path, capsys):
    variant = next(m for m in MODELS if ModelArgs.from_file(m / "config.json").text.attention_k_eq_v)
    code = main(["run", "--inject", "k-eq-v-ignored", "--model", str(variant), "--case", "text-only",
                 "--report-dir", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert code == 2 and f"layers.{first_full_layer(variant)}.self_attn.v_proj.weight" in err
    assert not (tmp_path / "rep").exists()


def test_candidate_policy_switch_is_named_at_the_full_mask(tmp_path):
    """Reference stays `official`, only the candidate switches: the first divergence is the mask."""
    code = main(["run", "--candidate-mask-policy", "hf-forward", "--case", "image/gradient", "--no-oracle",
                 "--report-dir", str(tmp_path / "rep"), "--json", str(tmp_path / "r.json")])
    rec = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and rec["first_divergence"]["stage"] == "mask.full_attention"
    assert {c["candidate_mask_policy"] for c in rec["cases"]} == {"hf-forward"}


def test_env_var_switch(tmp_path):
    env = dict(os.environ, RMLX_INJECT="posemb-xy-swap")
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "run", "--model", str(MODELS[0]),
                           "--case", "image/gradient", "--report-dir", str(tmp_path / "rep"),
                           "--json", str(tmp_path / "r.json"), "--no-oracle"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1, proc.stderr
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["first_divergence"]["stage"] == "vision.pos_embed"
    assert "First divergent stage: vision.pos_embed" in proc.stdout
    assert rec["settings"]["inject"] == ["posemb-xy-swap"]
