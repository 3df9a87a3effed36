"""The gemma4 family (SigLIP-style vision, ``model_type: gemma4``) through the harness core: a case runs
through ``rmlx-parity run`` and passes, a planted defect of its catalog is caught at its declared stage
teacher-forced, and the family's stage table agrees with the reference's hook table."""

from __future__ import annotations

import json

import pytest

from parity.adapter import family_of
from parity.adapters.gemma4 import FAMILY
from parity.adapters.gemma4.stages import classify, order_key
from parity.cli import main
from parity.tolerances import TOLERANCES
from tests.conftest import GEMMA4_MODELS

pytestmark = pytest.mark.skipif(not GEMMA4_MODELS, reason="no gemma4 fixture model")
MODEL = GEMMA4_MODELS[0] if GEMMA4_MODELS else None


def run(tmp_path, *argv: str) -> tuple[int, dict]:
    code = main(["run", "--model", str(MODEL), "--report-dir", str(tmp_path / "rep"), "--json",
                 str(tmp_path / "r.json"), *argv])
    return code, json.loads((tmp_path / "r.json").read_text())


def test_fixture_is_found_as_the_gemma4_family():
    assert family_of(MODEL) is FAMILY or family_of(MODEL).model_type == "gemma4"


@pytest.mark.parametrize("mode", ["free", "teacher"])
def test_a_gemma4_case_passes(tmp_path, mode):
    code, rec = run(tmp_path, "--case", "two-images", "--mode", mode)
    assert code == 0 and rec["passed"], rec["first_divergence"]
    (case,) = rec["cases"]
    names = [s["name"] for s in case["stages"]]
    assert names[:4] == ["image.pixel_values", "image.position_ids", "vision.patch_embed", "vision.pos_embed"]
    assert "vision.layers.1.out" in names and "vision.standardized" in names and names[-1] == "logits"
    assert [d["step"] for d in case["decode"]] == [1, 2, 3, 4]
    assert case["logits"]["top1_agreement"] == 1.0
    if mode == "free":
        assert any("oracle" in s for s in case["stages"])  # the float64 vision oracle columns


def test_hf_forward_policy_is_forced_on_the_reference(tmp_path):
    code, rec = run(tmp_path, "--case", "image/gradient", "--mask-policy", "hf-forward", "--no-oracle")
    assert code == 0 and rec["passed"], rec["first_divergence"]
    # HF's own gemma4 forward builds `official`: the forced policy moves the logits
    assert rec["cases"][0]["reference_self_consistency"]["max_abs_logits"] > 0.1


def test_a_planted_defect_is_localised(tmp_path):
    code, rec = run(tmp_path, "--case", "image/gradient", "--inject", "g4-rope-axes-swapped", "--mode", "teacher",
                    "--no-oracle", "--max-soft-tokens", "70")
    assert code == 1 and not rec["passed"]
    assert rec["first_divergence"]["stage"] == "vision.layers.0.attn.q"


def test_audio_scenarios_are_not_supported():
    scenarios = {s.name: s for s in FAMILY.scenarios([], MODEL.parents[1] / "images")}
    assert not FAMILY.supports(MODEL, scenarios["image-and-audio"])
    assert FAMILY.supports(MODEL, scenarios["two-images"]) and FAMILY.supports(MODEL, scenarios["text-only"])


def test_stage_table_matches_the_reference_hooks_and_orders():
    from reference.gemma4 import hf

    config = hf.load(MODEL).config
    table = FAMILY.stage_table(MODEL)
    assert {s.name: (s.hf, s.read) for s in table} == hf.stages(config, image=True)
    names = [s.name for s in table]
    assert sorted(reversed(names), key=order_key) == names
    for s in table:
        assert classify(s.name) is not None and classify(s.name).tol == s.tol, s.name
        assert s.tol in TOLERANCES, s.name
    for unknown in ("vision.patch_ln1", "vision.layers.0.attn.query", "vision.layers.01.out", "audio.soft_tokens"):
        assert classify(unknown) is None and order_key(unknown) is None, unknown


def test_catalog_declares_at_least_six_vision_defects():
    vision = [d for d in FAMILY.defects.values() if d.stage.startswith(("image.", "vision."))]
    assert len(vision) >= 6
    # and the shared decoder's defect at fp32 rounding scale (the float64 noise floor's proof): the same patch
    from parity.adapters.gemma4_unified.defects import CATALOG

    assert [n for n, d in FAMILY.defects.items() if d not in vision] == ["g4-decoder-norm-eps-1e-5"]
    ours, theirs = FAMILY.defects["g4-decoder-norm-eps-1e-5"], CATALOG["decoder-norm-eps-1e-5"]
    assert (ours.apply, ours.stage) == (theirs.apply, theirs.stage)
