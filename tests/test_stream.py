"""Layer streaming (``--stream``): the same record as a resident run, one layer resident at a time."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from parity.cli import main
from tests.conftest import FIXTURES, MODELS, UNIFIED_MODELS

CASES = ["image/gradient", "two-images", "long-image-block", "image-and-audio", "text-only"]


def _record(tmp_path, name: str, *args: str) -> tuple[int, dict]:
    out = tmp_path / f"{name}.json"
    argv = ["run", "--report-dir", str(tmp_path / f"{name}-rep"), "--json", str(out), *args]
    for case in CASES:
        argv += ["--case", case]
    code = main(argv)
    return code, json.loads(out.read_text())


def _stream_record(tmp_path, *args: str) -> tuple[int, dict]:
    return _record(tmp_path, "streamed", "--stream", *args)


TWO = [m for m in UNIFIED_MODELS if m.name in ("tiny", "hf-test-config")]


@pytest.mark.parametrize("dtype,mode,every", [
    ("float32", "teacher", False), ("bfloat16", "free", False),
    pytest.param("float32", "teacher", True, marks=pytest.mark.slow),
    pytest.param("bfloat16", "free", True, marks=pytest.mark.slow)])
def test_streamed_record_equals_the_resident_record(tmp_path, dtype, mode, every):
    """Every number of every stage, the logits agreement and every decode step agree exactly with the
    resident run of the same cases: streaming changes where the weights are, not what is computed.
    Teacher-forced and bf16 on two fixture models (every model: `nox -s slow`); fp32 free-running on
    every model in the next test."""
    models = [] if every else [a for m in TWO for a in ("--model", str(m))]
    code, resident = _record(tmp_path, "resident", "--dtype", dtype, "--mode", mode, *models)
    assert code == 0
    code, streamed = _stream_record(tmp_path, "--dtype", dtype, "--mode", mode, *models)
    assert code == 0
    _assert_same_record(streamed, resident, UNIFIED_MODELS if every else TWO)


def test_streamed_fp32_record_equals_the_default_runs(tmp_path, default_runs):
    """fp32 free-running on every fixture model: the streamed cases are the resident default run's cases,
    number for number (the session's default run is the resident side)."""
    _, resident, _ = default_runs("float32", "free", "official")
    code, streamed = _stream_record(tmp_path)
    assert code == 0
    _assert_same_record(streamed, resident, UNIFIED_MODELS)


def _assert_same_record(streamed: dict, resident: dict, models) -> None:
    assert streamed["settings"]["stream"] is True and resident["settings"]["stream"] is False
    assert {**streamed["settings"], "stream": False} == resident["settings"]
    by_name = {c["name"]: c for c in resident["cases"]}
    # the families with a layer-by-layer driver (gemma4 sits out)
    streamed_models = {m.name for m in models}
    assert {c["model"] for c in streamed["cases"]} == streamed_models
    assert len(streamed["cases"]) == sum(1 for c in resident["cases"] if c["model"] in streamed_models
                                         and c["scenario"] in CASES) > len(CASES)
    for case in streamed["cases"]:
        ref = by_name[case["name"]]
        assert [s["name"] for s in case["stages"]] == [s["name"] for s in ref["stages"]]
        for s, r in zip(case["stages"], ref["stages"], strict=True):
            if "oracle" not in s:  # the decoder's float64 run is resident-only (parity/adapters/.../stream.py)
                r = {k: v for k, v in r.items() if k != "oracle"}
            assert s == r, (case["name"], s["name"])
        for key in ("logits", "decode", "passed", "first_divergence"):
            assert case[key] == ref[key], (case["name"], key)
        for key in ("patch_error", "kl_per_position", "ref_max_abs"):
            assert case["viz"][key] == ref["viz"][key], (case["name"], key)
        assert case["reference_self_consistency"]["max_abs_logits"] is None  # no second pass over the disk
        n_layers = int(case["stages"][-3]["name"].split(".")[1]) + 1
        assert case["stream"]["layer_reads"] == n_layers * (1 + resident["settings"]["decode_steps"])


def test_a_planted_defect_is_named_when_streamed(tmp_path):
    code, rec = _stream_record(tmp_path, "--inject", "vision-causal", "--model", str(MODELS[0]))
    assert code == 1
    first = {c["scenario"]: (c["first_divergence"] or {}).get("stage") for c in rec["cases"]}
    assert first == {"image/gradient": "mask.sliding_attention", "two-images": "mask.sliding_attention",
                     "long-image-block": "mask.sliding_attention", "image-and-audio": "mask.sliding_attention",
                     "text-only": None}  # no image: nothing to attend bidirectionally


def test_one_layer_at_a_time_on_both_sides(tmp_path):
    """HF's layers are back on the meta device after every call; the candidate holds no layer at all
    between calls, and never the vocabulary table."""
    from reference.gemma4_unified.stream import HFStreamRunner
    from rmlx.models.gemma4_unified.stream import StreamedModel

    model_dir = MODELS[0]
    hf = HFStreamRunner(model_dir)
    ids = np.array([[2, 10, 11, 12]])
    hf.forward({"input_ids": ids, "mm_token_type_ids": np.zeros_like(ids)}, "official", {}, 1, consistency=False)
    layers = hf.model.model.language_model.layers
    assert hf.layer_reads == 2 * len(layers)
    assert all(p.device == torch.device("meta") for p in layers.parameters())
    assert not any(p.device == torch.device("meta") for n, p in hf.model.named_parameters() if ".layers." not in n)

    cand = StreamedModel(model_dir)
    assert cand.model.language_model.layers == []
    assert "weight" not in cand.model.language_model.embed_tokens  # rows read on demand
    layer = cand.layer(0)
    assert sum(v.nbytes for v in layer.parameters()["self_attn"]["q_proj"].values()) > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_streamed_quantized_record_equals_the_resident_one(tmp_path, dtype):
    """--stream --quantize mxfp8: each layer quantized as it is read (the candidate) and its weights passed
    through the reference's codec as they are read (HF): every stage, the dequantized weights included,
    equals the resident quantized run's. Only the quantization cost (a third, unquantized model) is not
    measured when streamed."""
    common = ["--model", str(FIXTURES / "models" / "tiny"), "--no-oracle", "--decode-steps", "1", "--dtype", dtype,
              "--quantize", "mxfp8", "--case", "image/gradient", "--case", "text-4"]
    records = {}
    for name, extra in (("streamed", ["--stream"]), ("resident", [])):
        out = tmp_path / f"{name}.json"
        assert main(["run", *common, *extra, "--json", str(out), "--report-dir", str(tmp_path / name)]) == 0
        records[name] = json.loads(out.read_text())
    for s, r in zip(records["streamed"]["cases"], records["resident"]["cases"], strict=True):
        assert [x["name"] for x in s["stages"]] == [x["name"] for x in r["stages"]]
        assert any(x["name"].endswith(".weight") and x["class"] == "qweight" for x in s["stages"])
        for a, b in zip(s["stages"], r["stages"], strict=True):
            same = ("passed", "max_abs", "mismatched")
            assert [a[k] for k in same] == [b[k] for k in same], a["name"]
        assert s["logits"] == r["logits"] and s["decode"] == r["decode"]
        assert s["quantization_cost"] is None and r["quantization_cost"] is not None
    assert records["streamed"]["kernels"]["used"] == records["resident"]["kernels"]["used"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_streamed_dump_equals_the_resident_dump(tmp_path, dtype):
    """--dump of a streamed run (each stage written as it is settled, parity.dumps.Spool) holds the same
    tensors, bit for bit, as the resident run's, and `compare` reads it."""
    from safetensors.numpy import load_file

    common = ["--model", str(FIXTURES / "models" / "tiny"), "--no-oracle", "--decode-steps", "1", "--dtype", dtype,
              "--case", "image/gradient", "--case", "text-4", "--stages", "vision.*", "--stages", "mask.*",
              "--stages", "layers.**", "--stages", "logits"]
    for name, extra in (("streamed", ["--stream"]), ("resident", [])):
        assert main(["run", *common, *extra, "--dump", str(tmp_path / name), "--report-dir",
                     str(tmp_path / f"{name}-rep")]) == 0
    files = sorted(p.relative_to(tmp_path / "resident") for p in (tmp_path / "resident").rglob("*.safetensors"))
    assert len(files) == 4
    assert files == sorted(p.relative_to(tmp_path / "streamed") for p in (tmp_path / "streamed").rglob("*.safetensors"))
    for rel in files:
        a, b = load_file(tmp_path / "streamed" / rel), load_file(tmp_path / "resident" / rel)
        assert sorted(a) == sorted(b) and "logits" in a and "layers.0.attn.q" in a and "text.norm" not in a
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (rel, k)
    assert main(["compare", str(tmp_path / "streamed"), "--report-dir", str(tmp_path / "cmp")]) == 0


def test_a_bad_checkpoint_is_refused_before_any_layer_is_read(tmp_path):
    """The strict name/shape check reads only the safetensors headers."""
    import shutil

    from rmlx.errors import InputError
    from rmlx.models.gemma4_unified.stream import StreamedModel

    bad = tmp_path / "m"
    shutil.copytree(FIXTURES / "models" / MODELS[0].name, bad)
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 1
    (bad / "config.json").write_text(json.dumps(config))
    shapes = r"layers.0.mlp.down_proj.weight' has shape \(64, 128\), the config implies \(64, 129\)"
    with pytest.raises(InputError, match=shapes):
        StreamedModel(bad)


def test_a_streamed_run_is_gated_by_the_resident_baseline(tmp_path):
    """Streaming changes no number, so the committed baseline gates it (as CI would, per shard)."""
    baseline = FIXTURES / "baselines" / "float32-free.json"
    argv = ["gate", "--stream", "--baseline", str(baseline), "--case", "two-images", "--report-dir", str(tmp_path)]
    assert main(argv) == 0
    assert main([*argv[:-1], str(tmp_path / "again"), "--inject", "layer-scalar-ignored"]) == 1


def test_weights_viewed_in_place_are_released_before_a_read_casts_into_them():
    """A quantized streamed run's reference weights are round-tripped in place and recorded as views of
    HF's tensors (``Weights.before_reuse`` set): the hook runs while the views still hold layer 0's
    values, before layer 1 is read into the same tensors (which then overwrites them)."""
    from reference.gemma4_unified.stream import Weights
    from reference.mxfp8_torch import roundtrip

    weights = Weights(FIXTURES / "models" / "tiny", torch.float32)
    names0 = sorted(n for n in weights.shapes if n.startswith("model.language_model.layers.0.mlp."))
    names1 = [n.replace(".layers.0.", ".layers.1.") for n in names0]
    assert names0 and all(weights.shapes[a] == weights.shapes[b] for a, b in zip(names0, names1, strict=True))
    weights.quantize_on_read({n: f"w{i}" for i, n in enumerate(names0 + names1)}, roundtrip)
    expected = {f"w{i}": roundtrip(weights.read([n])[n]).numpy().copy() for i, n in enumerate(names0)}
    weights.dequantized.clear()
    seen = []
    weights.before_reuse = lambda: seen.append({k: v.copy() for k, v in weights.dequantized.items()})
    layer0 = weights.read(names0)
    assert seen == []  # fresh tensors: nothing read into
    for i, n in enumerate(names0):
        np.testing.assert_array_equal(weights.dequantized[f"w{i}"], expected[f"w{i}"])
        assert np.shares_memory(weights.dequantized[f"w{i}"], layer0[n].numpy())  # a view: no copy
    weights.read(names1, into={b: layer0[a] for a, b in zip(names0, names1, strict=True)})
    (before,) = seen
    for k, v in expected.items():
        np.testing.assert_array_equal(before[k], v)  # the hook saw layer 0's values
    assert any(not np.array_equal(weights.dequantized[k], v) for k, v in expected.items())  # since overwritten
    weights.before_reuse = None  # without a hook: a copy, which a later read leaves alone
    fresh = weights.read(names0)
    kept = {k: weights.dequantized[k] for k in expected}
    weights.read(names0, into=fresh)
    for k, v in expected.items():
        np.testing.assert_array_equal(kept[k], v)
