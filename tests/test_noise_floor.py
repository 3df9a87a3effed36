"""The float64 noise floor: a defect far below the absolute fp32 bounds, but many times the reference's
own rounding error, fails free-running and teacher-forced; the clean port does not. In both families:
the SigLIP one's decoder oracle is ``reference.gemma4.hf.Runner`` in float64 (its own adapter's ``oracle``)."""

import json

import numpy as np
import pytest

from parity.cli import main
from parity.metrics import logits_agreement, oracle_distance
from parity.tolerances import NOISE_RATIOS
from tests.conftest import GEMMA4_MODELS, MODELS


def _record(tmp_path, *extra, model=None, case="text-only"):
    out = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
    code = main(["run", "--model", str(model or MODELS[0]), "--case", case, "--decode-steps", "0",
                 "--report-dir", str(out), "--json", str(out) + ".json", *extra])
    return code, json.loads((tmp_path / (out.name + ".json")).read_text())


def _stage(tmp_path, *extra, stage="layers.0.input_layernorm", model=None):
    code, rec = _record(tmp_path, *extra, model=model)
    return code, {s["name"]: s for s in rec["cases"][0]["stages"]}[stage]


# one model of each family, with its catalog's name of the shared decoder's epsilon defect
EPSILON = [pytest.param(MODELS[0], "decoder-norm-eps-1e-5", id=MODELS[0].name),
           *[pytest.param(m, "g4-decoder-norm-eps-1e-5", id=m.name) for m in GEMMA4_MODELS[:1]]]


@pytest.mark.parametrize("model, defect", EPSILON)
def test_an_epsilon_at_rounding_scale_passes_the_absolute_bound_and_fails_the_noise_floor(tmp_path, model, defect):
    for mode in ("free", "teacher"):
        code, st = _stage(tmp_path, "--inject", defect, "--mode", mode, "--no-oracle", model=model)
        assert code == 0 and st["passed"] and st["max_abs"] < st["tolerance"]["atol"]  # invisible to the bound
        code, st = _stage(tmp_path, "--inject", defect, "--mode", mode, model=model)
        assert code == 1 and not st["passed"]
        assert st["oracle"]["ratio"] > st["oracle"]["allowed_ratio"]
        assert "Farther from float64 than the reference" in st["error"]


def test_the_clean_port_is_within_the_noise_floor_at_every_decoder_stage(tmp_path):
    code, _ = _stage(tmp_path)
    rec = json.loads(next(tmp_path.glob("*.json")).read_text())
    ratios = [s["oracle"]["ratio"] for s in rec["cases"][0]["stages"] if "oracle" in s]
    assert code == 0 and len(ratios) > 20 and max(ratios) < 8


@pytest.mark.skipif(not GEMMA4_MODELS, reason="no gemma4 fixture model")
@pytest.mark.parametrize("mode", ["free", "teacher"])
def test_the_siglip_decoder_stages_carry_a_float64_ratio_and_the_clean_port_is_within_it(tmp_path, mode):
    """An image case: every decoder stage of the gemma4 family (embeddings, each layer, norm, logits) gets
    the noise-floor bound, as the vision stages do, and the clean port is within it."""
    code, rec = _record(tmp_path, "--mode", mode, model=GEMMA4_MODELS[0], case="image/gradient")
    stages = rec["cases"][0]["stages"]
    decoder = [s for s in stages if s["name"].startswith(("text.", "layers.")) or s["name"] == "logits"]
    assert code == 0 and len(decoder) > 20
    for s in decoder + [s for s in stages if s["name"].startswith("vision.")]:
        assert s["oracle"]["allowed_ratio"] == NOISE_RATIOS[s["class"]], s["name"]
        assert s["oracle"]["ratio"] < s["oracle"]["allowed_ratio"], s["name"]


def test_oracle_distance_floors_an_exact_reference():
    o = np.linspace(-2, 2, 1000)
    d = oracle_distance(o.astype(np.float32), (o + 1e-3).astype(np.float32), o)
    assert d["reference_rms"] < d["floor"] * 2 and d["ratio"] > 1000  # not inf: the floor is one roundoff
    assert oracle_distance(o, o, o)["ratio"] == 0.0
    assert oracle_distance(o[:10], o[:9], o[:10]) is None


def test_logit_statistics_match_a_direct_computation():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((200, 30)) * 3
    cand = ref + rng.standard_normal((200, 30)) * 0.05
    out = logits_agreement(cand.astype(np.float32), ref.astype(np.float32))
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(cand - cand.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    kl = (p * (np.log(p) - np.log(q))).sum(1)
    top = ref.argmax(1)
    same = top == cand.argmax(1)
    np.testing.assert_allclose(out["kl_mean"], kl.mean(), rtol=1e-4)
    np.testing.assert_allclose(out["kl_p99"], np.percentile(kl, 99), rtol=1e-4)
    np.testing.assert_allclose(out["kl_se"], kl.std(ddof=1) / np.sqrt(200), rtol=1e-3)
    np.testing.assert_allclose(out["dp_mean"], (q[np.arange(200), top] - p[np.arange(200), top]).mean(), atol=1e-6)
    assert out["top1_agreement"] == same.mean() and out["top1_flips"] == (~same).sum()
    np.testing.assert_allclose(out["top1_agreement_se"], np.sqrt(same.mean() * (1 - same.mean()) / 200))
    assert out["top1_flips_decisive"] <= out["top1_flips"]
