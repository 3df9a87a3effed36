"""The embedded default, end to end through the CLI: every fixture model x every battery image.

fp32 and bf16, free-running and teacher-forced: every stage passes its named tolerance, the
structural stages are exact, and the JSON record has the documented schema.
"""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from parity.cli import main
from parity.stages import STAGES
from parity.tolerances import tolerance
from tests.conftest import IMAGES, MODELS

STAGE_FIELDS = {"name", "passed", "max_abs", "max_abs_index", "max_rel", "mismatched", "numel", "max_ulp",
                "cosine", "nmse_db", "tolerance", "min_tolerance"}


@pytest.fixture(scope="module", params=[("float32", "free"), ("float32", "teacher"),
                                        ("bfloat16", "free"), ("bfloat16", "teacher")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def default_run(request, tmp_path_factory):
    dtype, mode = request.param
    out = tmp_path_factory.mktemp(f"run-{dtype}-{mode}")
    code = main(["run", "--dtype", dtype, "--mode", mode, "--report-dir", str(out / "rep"),
                 "--json", str(out / "record.json")])
    return code, json.loads((out / "record.json").read_text()), out


def test_default_run_passes(default_run):
    code, rec, _ = default_run
    failing = [(c["name"], c["first_divergence"]["stage"]) for c in rec["cases"] if not c["passed"]]
    assert code == 0 and rec["passed"] and rec["first_divergence"] is None, failing
    assert len(rec["cases"]) == len(MODELS) * len(IMAGES)


def test_record_schema(default_run):
    _, rec, out = default_run
    assert rec["schema"] == "rmlx.parity/1"
    assert {"transformers", "torch", "mlx", "numpy"} <= set(rec["versions"])
    assert rec["wall_time_s"] > 0
    for case in rec["cases"]:
        assert {"name", "model", "image", "dtype", "mode", "stages"} <= set(case)
        assert [s["name"] for s in case["stages"]] == [s.name for s in STAGES]
        for st in case["stages"]:
            assert STAGE_FIELDS <= set(st), STAGE_FIELDS - set(st)
            assert set(st["tolerance"]) == {"rtol", "atol"}
    assert (out / "rep" / "report.json").is_file() and (out / "rep" / "report.md").is_file()
    md = (out / "rep" / "report.md").read_text()
    assert "wall time" in md and "vision.soft_tokens" in md


def test_structural_stages_are_exact(default_run):
    _, rec, _ = default_run
    for case in rec["cases"]:
        for st in case["stages"]:
            if st["name"] in ("image.pixel_values", "image.position_ids"):
                assert st["max_abs"] == 0 and st["mismatched"] == 0, (case["name"], st["name"])


def test_numeric_stages_use_the_named_tolerance(default_run):
    _, rec, _ = default_run
    by_name = {s.name: s for s in STAGES}
    for case in rec["cases"]:
        for st in case["stages"]:
            tol = tolerance(by_name[st["name"]].tol, case["dtype"])
            assert st["tolerance"] == {"rtol": tol.rtol, "atol": tol.atol}


def test_oracle_agrees_with_both_sides_in_fp32(default_run):
    """The float64 oracle is the seed of truth: HF and rmlx are both within the fp32 tolerance of it."""
    _, rec, _ = default_run
    if rec["settings"]["dtype"] != "float32":
        return
    for case in rec["cases"]:
        for st in case["stages"]:
            assert st["oracle"]["reference_max_abs"] <= st["tolerance"]["atol"], (case["name"], st["name"])
            assert st["oracle"]["candidate_max_abs"] <= st["tolerance"]["atol"], (case["name"], st["name"])


@pytest.mark.parametrize("mst", [70, pytest.param(1120, marks=pytest.mark.slow)])
def test_default_run_at_other_budgets(mst, tmp_path):
    """The smallest and the largest soft-token budgets (1120: ~3 min, run by `nox -s slow`)."""
    code = main(["run", "--max-soft-tokens", str(mst), "--report-dir", str(tmp_path / "rep"),
                 "--json", str(tmp_path / "r.json")])
    rec = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and rec["passed"], rec["first_divergence"]


def test_dump_has_stage_keys_inputs_and_batch_axis(tmp_path):
    model, image = MODELS[0], IMAGES[0]
    code = main(["run", "--model", str(model), "--image", str(image), "--dump", str(tmp_path / "dump"),
                 "--report-dir", str(tmp_path / "rep"), "--no-oracle", "--attn-implementation", "sdpa"])
    assert code == 0
    folder = tmp_path / "dump" / f"{model.name}__{image.stem}"
    ref = load_file(folder / "reference.safetensors")
    cand = load_file(folder / "candidate.safetensors")
    names = {s.name for s in STAGES}
    assert names <= set(ref) and names <= set(cand)
    assert {"input.input_ids", "input.mm_token_type_ids", "input.image"} <= set(ref)
    for n in names:
        assert ref[n].shape == cand[n].shape and ref[n].shape[0] == 1, n
    n_img = int((ref["input.mm_token_type_ids"] == 1).sum())
    assert n_img == ref["vision.soft_tokens"].shape[1]
    np.testing.assert_array_equal(ref["image.pixel_values"], cand["image.pixel_values"])
