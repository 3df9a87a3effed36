"""The float64 noise floor: a defect far below the absolute fp32 bounds, but many times the reference's
own rounding error, fails free-running and teacher-forced; the clean port does not. In both families:
the SigLIP one's decoder oracle is ``reference.gemma4.hf.Runner`` in float64 (its own adapter's ``oracle``)."""

import json

import numpy as np
import pytest
import torch

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


FLOAT64_CLOSE = 8 * 2.0**-52  # 1.8e-15: a few float64 units (measured <= 7.2e-16); fp32's is 2^-24 = 6e-8


def _relative(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| over max |expected|."""
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("model", MODELS, ids=[m.name for m in MODELS])
def test_the_unified_float64_oracle_computes_its_norms_and_rope_in_float64(model):
    """The unified decoder's oracle (``HFRunner`` in float64): transformers' ``Gemma4UnifiedRMSNorm`` and
    text RoPE compute in float32 whatever the dtype; the float64 runner's do not
    (``reference.gemma4_unified.hf.compute_in_float64``). Each norm of a forward (every decoder norm, the final norm and
    the vision embedder's pre-projection norm, whose output is the soft tokens) and each rotated q/k of
    both layer types (default and proportional RoPE) agree with a NumPy float64 computation to float64
    rounding (~1e-15 relative), not fp32's (~1e-7: transformers' own forward is checked to be that far)."""
    from transformers.models.gemma4_unified.modeling_gemma4_unified import Gemma4UnifiedRMSNorm

    from reference.gemma4_unified.hf import HFRunner

    runner = HFRunner(model, "float64", "eager_float64")
    text = runner.model.model.language_model
    cfg = runner.config.get_text_config()
    lm = "model.language_model"
    ids = np.array([[2, *range(10, 40)]], np.int64)  # 31 positions
    points = {"embeds": (lm, "kwarg:inputs_embeds"), "final.in": (f"{lm}.norm", "input"),
              "final": (f"{lm}.norm", "output")}
    for i in range(cfg.num_hidden_layers):
        p = f"{lm}.layers.{i}"
        points |= {f"{i}.norm.in": (f"{p}.input_layernorm", "input"), f"{i}.norm": (f"{p}.input_layernorm", "output"),
                   f"{i}.pre_ff.in": (f"{p}.pre_feedforward_layernorm", "input"),
                   f"{i}.pre_ff": (f"{p}.pre_feedforward_layernorm", "output"),
                   f"{i}.q_normed": (f"{p}.self_attn.q_norm", "output"), f"{i}.q": (f"{p}.self_attn.q_norm", "rope")}
    cap, *_ = runner.forward({"input_ids": ids, "mm_token_type_ids": np.zeros_like(ids)}, "official", points, 0,
                             consistency=False)
    assert all(v.dtype == np.float64 for v in cap.values())

    def rms_norm(x, module):
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + module.eps)
        return y * module.weight.detach().numpy() if module.with_scale else y

    checked = {"norm": 0, "rope": set()}
    for i, layer in enumerate(text.layers):
        for point, module in (("norm", layer.input_layernorm), ("pre_ff", layer.pre_feedforward_layernorm)):
            assert _relative(cap[f"{i}.{point}"], rms_norm(cap[f"{i}.{point}.in"], module)) < FLOAT64_CLOSE, (i, point)
            checked["norm"] += 1
        layer_type = cfg.layer_types[i]
        rope = cfg.rope_parameters[layer_type]
        qn = cap[f"{i}.q_normed"]
        half = qn.shape[-1] // 2
        inv = 1.0 / float(rope["rope_theta"]) ** (np.arange(half) / half)
        if rope.get("rope_type") == "proportional":
            inv[int(rope["partial_rotary_factor"] * 2 * half // 2):] = 0.0
            inv /= float(rope.get("factor", 1.0))
        angle = np.arange(ids.shape[1])[:, None] * np.concatenate([inv, inv])  # (L, d)
        rotated = np.concatenate([-qn[..., half:], qn[..., :half]], -1)
        expected = qn * np.cos(angle)[None, :, None] + rotated * np.sin(angle)[None, :, None]
        assert _relative(cap[f"{i}.q"], expected) < FLOAT64_CLOSE, (i, layer_type)
        checked["rope"].add(rope.get("rope_type", "default"))
    assert _relative(cap["final"], rms_norm(cap["final.in"], text.norm)) < FLOAT64_CLOSE
    assert checked == {"norm": 2 * cfg.num_hidden_layers, "rope": {"default", "proportional"}}

    # the vision embedder's pre-projection norm (no scale): its output is what the float64 run scatters
    embedder = runner.model.model.embed_vision.multimodal_embedder
    path = "model.embed_vision.multimodal_embedder.embedding_pre_projection_norm"
    image = np.random.default_rng(0).integers(0, 256, (96, 144, 3), dtype=np.uint8)
    pre = runner.preprocess(image, 70, model)
    _, vcap = runner.image_features(pre["pixel_values"].astype(np.float64), pre["image_position_ids"],
                                    {"in": (path, "input"), "out": (path, "output")})
    norm = embedder.embedding_pre_projection_norm
    assert not norm.with_scale and vcap["out"].dtype == np.float64
    assert _relative(vcap["out"], rms_norm(vcap["in"], norm)) < FLOAT64_CLOSE

    # discriminating: transformers' own forward (its float32 steps) is at fp32 rounding from the same values
    x = torch.from_numpy(cap["0.norm.in"])
    layer0 = text.layers[0].input_layernorm
    assert _relative(Gemma4UnifiedRMSNorm.forward(layer0, x).detach().numpy(), cap["0.norm"]) > 1e-9
    assert all("forward" in vars(m) for m in runner.model.modules() if isinstance(m, Gemma4UnifiedRMSNorm))
