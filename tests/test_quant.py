"""MXFP8 in the port: quantize on load, MLX-style quantized checkpoints (convert + load), and the
harness on a quantized candidate (dequantized reference: tight; unquantized reference: the cost)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from parity.cli import main
from rmlx.errors import InputError
from rmlx.models.gemma4_unified.load import load_model
from tests.conftest import FIXTURES, MODELS

TINY = next(m for m in MODELS if m.name == "tiny")
VARIANT = next(m for m in MODELS if m.name == "tiny-variant")


def test_quantize_on_load_reports_every_module():
    tiny = load_model(TINY, quantize="mxfp8")
    assert tiny.quant_status and set(tiny.quant_status.values()) == {"quantized"}
    assert "vision_embedder.patch_dense" in tiny.quant_status
    variant = load_model(VARIANT, quantize="mxfp8")  # hidden 48: q/k/v/gate/up cannot be blocked by 32
    skipped = {p: s for p, s in variant.quant_status.items() if s != "quantized"}
    assert "language_model.layers.0.self_attn.q_proj" in skipped
    assert all("input size 48 is not a multiple of 32" in s for s in skipped.values())
    assert variant.quant_status["language_model.layers.0.self_attn.o_proj"] == "quantized"


@pytest.mark.parametrize("model", [TINY, VARIANT], ids=lambda m: m.name)
def test_convert_round_trip(model, tmp_path, capsys):
    dst = tmp_path / "q"
    assert main(["convert", "--quantize", "mxfp8", str(model), str(dst)]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert {"group_size": 32, "bits": 8, "mode": "mxfp8"}.items() <= config["quantization"].items()
    tensors = load_file(dst / "model.safetensors")
    assert tensors["model.vision_embedder.patch_dense.weight"].dtype == np.uint32
    assert tensors["model.vision_embedder.patch_dense.scales"].dtype == np.uint8
    loaded, on_load = load_model(dst), load_model(model, quantize="mxfp8")
    assert loaded.quant_status == on_load.quant_status
    ids = np.arange(3, 30)[None]
    np.testing.assert_array_equal(np.array(loaded(ids)), np.array(on_load(ids)))
    assert main(["convert", "--quantize", "mxfp8", str(model), str(dst)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_quantized_checkpoint_is_loaded_strictly(tmp_path):
    dst = tmp_path / "q"
    assert main(["convert", "--quantize", "mxfp8", str(TINY), str(dst)]) == 0
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.language_model.layers.0.mlp.up_proj.scales"]
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(InputError, match="model.language_model.layers.0.mlp.up_proj.scales"):
        load_model(dst)


def test_quantized_kernel_uses_the_packed_weights():
    """The dequantized-weight stage is what mx.dequantize gives; the forward runs quantized_matmul."""
    model = load_model(TINY, quantize="mxfp8")
    dense = model.vision_embedder.patch_dense
    x = mx.random.normal((3, dense.weight.shape[1] * 4))
    deq = mx.dequantize(dense.weight, dense.scales, group_size=32, bits=8, mode="mxfp8")
    np.testing.assert_allclose(np.array(dense(x)), np.array(x @ deq.T + dense.bias), rtol=1e-5, atol=1e-4)


# the default test run: every case of the tiny model; every fixture model (the whole baseline): `nox -s slow`
SUBSETS = [("tiny",), pytest.param(None, marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=SUBSETS, ids=lambda p: "-".join(p) if p else "every-model")
def quantized_run(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("quantized")
    models = [a for m in request.param or () for a in ("--model", str(FIXTURES / "models" / m))]
    code = main(["gate", "--baseline", str(FIXTURES / "baselines" / "mxfp8-free.json"), "--quantize", "mxfp8",
                 *models, "--no-oracle", "--report-dir", str(out / "rep"), "--json", str(out / "r.json")])
    return code, json.loads((out / "r.json").read_text()), request.param


def test_quantized_default_run_passes_against_the_dequantized_reference(quantized_run):
    code, rec, models = quantized_run
    assert code == 0 and rec["passed"], (rec["first_divergence"], rec["gate"]["regressions"][:3])
    assert rec["gate"]["passed"]  # and the quantization cost is held to its committed baseline
    assert {c["model"] for c in rec["cases"]} == set(models or {c["model"] for c in rec["cases"]})
    assert rec["gate"]["checked"] > 0 and (models is not None or rec["gate"]["not_run"] == [])
    assert rec["settings"]["quantize"] == "mxfp8"
    for case in rec["cases"]:
        weights = [s for s in case["stages"] if s["class"] == "qweight"]
        assert weights and all(s["max_abs"] == 0 for s in weights), case["name"]  # codecs agree to the byte
        cost = case["quantization_cost"]
        assert cost["quantized_modules"] and {"top1_agreement", "kl_mean", "kl_max"} <= set(cost["logits"])
        assert cost["stages"]["logits"] < 0  # a real, finite cost in dB (NMSE vs the unquantized model)


def test_the_oracle_of_a_quantized_run_is_the_dequantized_model(tmp_path):
    """In a quantized fp32 run the NumPy vision oracle takes patch_dense's dequantized weight and HF's
    float64 model every dequantized weight: both sides sit at float32 rounding from them (with the
    checkpoint's own weights they would sit at the quantization error, ~1e-2, and the noise floor could
    fail nothing), and every such stage gets the noise-floor verdict."""
    code = main(["run", "--quantize", "mxfp8", "--model", str(TINY), "--case", "image/gradient", "--report-dir",
                 str(tmp_path / "rep"), "--json", str(tmp_path / "r.json")])
    rec = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and rec["passed"]
    (case,) = rec["cases"]
    oracle = {s["name"]: s["oracle"] for s in case["stages"] if s.get("oracle")}
    for name in ("vision.patch_dense", "vision.soft_tokens", "layers.0.attn.q", "layers.1.mlp.out", "text.norm"):
        assert oracle[name]["reference_rms"] < 1e-5 and oracle[name]["candidate_rms"] < 1e-5, (name, oracle[name])
        assert oracle[name]["allowed_ratio"] is not None
