"""Gemma 4 (model_type "gemma4", SigLIP-style vision) port vs HF transformers, stage by stage.

A tiny random checkpoint (reference/gemma4/fixtures.py) is run by HF's ``Gemma4ForConditionalGeneration``
(CPU, fp32, eager, no_grad) with forward hooks on every stage point (reference/gemma4/hf.py) and by
``rmlx.models.gemma4`` with a ``tap`` recorder, for one image, two images of different sizes in one
prompt, and text only. Each side preprocesses its own images (HF: ``Gemma4ImageProcessor``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from reference.gemma4 import hf  # noqa: E402
from reference.gemma4.fixtures import MAX_SOFT_TOKENS, make_tiny_checkpoint  # noqa: E402
from rmlx.errors import InputError  # noqa: E402
from rmlx.models.gemma4 import image_prompt, load_model, preprocess_batch  # noqa: E402
from rmlx.tap import tapping  # noqa: E402


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


EXACT = Tol(0.0, 0.0)
FP32 = Tol(1e-5, 1e-5)
# vision.pooled / vision.standardized carry the pooler's * sqrt(hidden) (5.7 here): the same relative
# error as the encoder output, 5.7x larger in absolute terms (measured worst 1.1e-5 at |x| ~ 38).
FP32_SCALED = Tol(5e-5, 1e-5)


def tolerance(name: str) -> Tol:
    if name.startswith(("image.", "mask.")):
        return EXACT  # structural: pixel layout, positions, masks
    if name in ("vision.pooled", "vision.standardized"):
        return FP32_SCALED
    return FP32


def gradient(h: int, w: int, phase: int = 0) -> np.ndarray:
    """A deterministic RGB uint8 test image: R along x, G along y, a diagonal pattern in B."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y + phase) * 97 % 256],
                    -1).astype(np.uint8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("gemma4") / "tiny", seed=0)
    torch.set_num_threads(1)  # reproducible sgemm (see reference/gemma4_unified/hf.py)
    return d, hf.load(d), load_model(d)


def run_case(ckpt, images: list[np.ndarray]):
    """Both sides on one prompt: text, then each image as <boi> <image> * n <eoi>, then text."""
    d, model_hf, model = ckpt
    cfg = model_hf.config
    mine: dict[str, np.ndarray] = {}

    def record(name, x):
        mine[name] = np.array(x)
        return x

    ref: dict[str, np.ndarray] = {}
    inputs: dict[str, np.ndarray] = {}
    pixel_values = position_ids = None
    prompt: list[int] = []
    if images:
        pre = hf.preprocess(d, images)
        ref["image.pixel_values"], ref["image.position_ids"] = pre["pixel_values"], pre["image_position_ids"]
        v = cfg.vision_config
        with tapping(record):
            pixel_values, position_ids, counts = preprocess_batch(images, MAX_SOFT_TOKENS, v.patch_size,
                                                                  v.pooling_kernel_size)
        assert counts == list(pre["num_soft_tokens_per_image"])
        prompt = image_prompt(counts, cfg.boi_token_id, cfg.image_token_id, cfg.eoi_token_id)
        inputs = {"pixel_values": pre["pixel_values"], "image_position_ids": pre["image_position_ids"]}
    ids = np.array([[2, 17, 33] + prompt + [45, 9, 120]], np.int64)
    types = (ids == cfg.image_token_id).astype(np.int64)  # the processor's mm_token_type_ids
    points = hf.stages(cfg, image=bool(images))
    ref.update(hf.forward(model_hf, {"input_ids": ids, "mm_token_type_ids": types, **inputs}, points))
    with tapping(record):
        np.array(model(ids, types, pixel_values, position_ids))
    return points, ref, mine


def compare(points, ref, mine) -> dict[str, float]:
    assert set(ref) == set(points), f"HF is missing {sorted(set(points) - set(ref))}"
    assert set(mine) == set(points), (f"rmlx is missing {sorted(set(points) - set(mine))}, "
                                      f"has extra {sorted(set(mine) - set(points))}")
    errors = {}
    for name in points:
        a, b = mine[name], ref[name]
        assert a.shape == b.shape, f"{name}: rmlx {a.shape}, HF {b.shape}"
        tol = tolerance(name)
        if tol == EXACT:
            assert a.dtype == b.dtype or a.dtype.kind == b.dtype.kind, f"{name}: {a.dtype} vs {b.dtype}"
            np.testing.assert_array_equal(a, b, err_msg=name)
            errors[name] = 0.0
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        errors[name] = float(np.abs(a64 - b64).max())
        np.testing.assert_allclose(a64, b64, atol=tol.atol, rtol=tol.rtol, err_msg=name)
    return errors


def _table(title: str, errors: dict[str, float]) -> None:
    print(f"\n{title}")
    for name, err in errors.items():
        print(f"  {name:32s} {err:.2e}")


def test_one_image(ckpt):
    points, ref, mine = run_case(ckpt, [gradient(40, 56)])
    assert any(k.startswith("vision.layers.") for k in points) and "vision.standardized" in points
    _table("one image 40x56", compare(points, ref, mine))
    assert mine["mask.sliding_attention"].sum() != np.tril(np.ones_like(mine["mask.sliding_attention"][0])).sum()


def test_two_images_of_different_sizes(ckpt):
    points, ref, mine = run_case(ckpt, [gradient(40, 56), gradient(60, 36, phase=5)])
    assert ref["image.pixel_values"].shape[0] == 2
    _table("two images 40x56 + 60x36", compare(points, ref, mine))


def test_text_only(ckpt):
    points, ref, mine = run_case(ckpt, [])
    assert not any(k.startswith(("image.", "vision.")) for k in points)
    _table("text only", compare(points, ref, mine))


def test_checkpoint_is_tiny_and_deterministic(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=0)
    b = make_tiny_checkpoint(tmp_path / "b", seed=0)
    files = sorted(p.name for p in a.iterdir())
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(files)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").stat().st_size < 1 << 20
    config = json.loads((a / "config.json").read_text())
    assert config["model_type"] == "gemma4" and config["vision_config"]["use_clipped_linears"]


def test_loader_is_strict(ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = ckpt[0]
    for case in ("missing", "unexpected", "shape"):
        d = tmp_path / case
        shutil.copytree(src, d)
        tensors = load_file(str(d / "model.safetensors"))
        key = "model.vision_tower.encoder.layers.1.mlp.up_proj.output_max"
        if case == "missing":
            del tensors[key]
        elif case == "unexpected":
            key = "model.vision_tower.encoder.layers.1.mlp.up_proj.extra"
            tensors[key] = np.zeros((1,), np.float32)
        else:
            key = "model.embed_vision.embedding_projection.weight"
            tensors[key] = np.zeros((3, 3), np.float32)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(InputError, match=key.replace(".", r"\.")):
            load_model(d)


def test_vision_matches_float64_oracle(ckpt):
    """Both sides against an independent float64 NumPy oracle of the vision path: neither is off by
    more than fp32 rounding (a shared misreading of HF would pass the stage comparison, not this)."""
    from reference.gemma4.numpy_oracle import vision

    points, ref, mine = run_case(ckpt, [gradient(40, 56), gradient(60, 36, phase=5)])
    oracle = vision(ckpt[0], ref["image.pixel_values"], ref["image.position_ids"])
    assert set(oracle) == {k for k in points if k.startswith("vision.")}
    for name, expected in oracle.items():
        tol = tolerance(name)
        for side, got in (("rmlx", mine[name]), ("HF", ref[name])):
            np.testing.assert_allclose(got.astype(np.float64), expected, atol=2 * tol.atol, rtol=tol.rtol,
                                       err_msg=f"{side} {name}")


def test_float64_runner_computes_the_decoder_in_float64(ckpt):
    """The decoder's oracle (``hf.Runner`` in float64): transformers' gemma4 RMSNorm and text RoPE compute in
    float32 whatever the dtype; the float64 runner's do not (``hf.compute_in_float64``), so a norm and a
    rotated q agree with a float64 computation to float64 rounding, not fp32's."""
    d = ckpt[0]
    runner = hf.Runner(d, "float64", "eager_float64")
    ids = np.array([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]], np.int64)
    points = {"embeds": (hf.LM, "kwarg:inputs_embeds"),  # layer 0's input (no per-layer inputs here)
              "norm": (f"{hf.LM}.layers.0.input_layernorm", "output"),
              "q_normed": (f"{hf.LM}.layers.0.self_attn.q_norm", "output"),
              "q": (f"{hf.LM}.layers.0.self_attn.q_norm", "rope")}
    cap, *_ = runner.forward({"input_ids": ids, "mm_token_type_ids": np.zeros_like(ids)}, "official", points)
    assert all(v.dtype == np.float64 for v in cap.values())
    layer = runner.model.model.language_model.layers[0]
    x = cap["embeds"]
    w = layer.input_layernorm.weight.detach().numpy()
    expected = x / np.sqrt((x * x).mean(-1, keepdims=True) + layer.input_layernorm.eps) * w
    assert np.abs(cap["norm"] - expected).max() < 0.01 * 2.0**-24 * np.abs(expected).max()
    rope = runner.config.get_text_config().rope_parameters[layer.self_attn.layer_type]
    half = cap["q"].shape[-1] // 2
    inv = float(rope["rope_theta"]) ** (-np.arange(half) / half)
    if rope.get("rope_type") == "proportional":
        inv[int(rope["partial_rotary_factor"] * half):] = 0.0
    angle = np.arange(ids.shape[1])[:, None] * np.concatenate([inv, inv])  # (L, d)
    qn = cap["q_normed"]
    rotated = np.concatenate([-qn[..., half:], qn[..., :half]], -1)
    expected = qn * np.cos(angle)[None, :, None] + rotated * np.sin(angle)[None, :, None]
    # float64 rounding: a hundredth of one fp32 unit roundoff of the values (fp32 cos/sin would be ~1)
    assert np.abs(cap["q"] - expected).max() < 0.01 * 2.0**-24 * np.abs(qn).max()
