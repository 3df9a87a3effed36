"""Decoder ops against HF's own code (RoPE, the rotary tables), and the KV cache against a full forward."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.gemma4_unified.modeling_gemma4_unified import apply_rotary_pos_emb

from rmlx.errors import InputError
from rmlx.models.gemma4_unified.load import load_model
from rmlx.nn.base import RoPE


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_rope_matches_hf(model_dir, adapters, layer_type):
    """Inverse frequencies equal HF's buffers; the rotation equals HF's apply_rotary_pos_emb with HF's
    cos/sin (proportional RoPE on full layers: only the first n_rot pairs rotate, pairing i with i + d/2)."""
    adapter = adapters(model_dir)
    cfg = adapter.args.text
    layer = cfg.layer_types.index(layer_type)
    d = cfg.layer(layer).head_dim
    rope = RoPE(d, cfg.rope_parameters[layer_type])
    rotary = adapter.hf.model.model.language_model.rotary_emb
    hf_inv = getattr(rotary, f"{layer_type}_inv_freq").numpy()
    np.testing.assert_array_equal(np.array(rope.inv_freq), hf_inv)
    x = np.random.default_rng(layer).standard_normal((1, 9, 3, d)).astype(np.float32)
    offset = 5
    pos = torch.arange(offset, offset + 9)[None]
    cos, sin = rotary(torch.from_numpy(x), pos, layer_type)
    want = apply_rotary_pos_emb(torch.from_numpy(x), cos, sin, unsqueeze_dim=2).numpy()
    np.testing.assert_allclose(np.array(rope(mx.array(x), offset)), want, rtol=0, atol=2e-6)
    if layer_type == "full_attention":
        n_rot = int(cfg.rope_parameters[layer_type]["partial_rotary_factor"] * d // 2)
        untouched = np.r_[n_rot:d // 2, d // 2 + n_rot:d]
        np.testing.assert_array_equal(np.array(rope(mx.array(x), offset))[..., untouched], x[..., untouched])


def test_kv_cache_decode_equals_a_full_forward(model_dir):
    """Prefill + one-token decode steps with the (rotating, on sliding layers) cache give the logits a
    full forward over the longer prompt gives at those positions. The prompt is longer than the window."""
    model = load_model(model_dir)
    window = model.args.text.sliding_window
    ids = np.arange(3, 3 + 2 * window + 3)[None]
    full = np.array(model(ids))
    cache = model.make_cache()
    n = ids.shape[1] - 4
    prefix = np.array(model(ids[:, :n], cache=cache))
    # 5e-5: MKL (rmlx/blas.py) runs a 1-row and a 45-row GEMM on different kernels; measured 1.6e-5 (tiny)
    np.testing.assert_allclose(prefix, full[:, :n], rtol=0, atol=5e-5)
    for s in range(4):
        step = np.array(model(ids[:, n + s:n + s + 1], cache=cache, offset=n + s))
        np.testing.assert_allclose(step[:, 0], full[:, n + s], rtol=0, atol=5e-5)
    sliding = [c for c in cache if c is not None and c.window is not None]
    assert sliding and all(c.keys.shape[2] == window - 1 for c in sliding)


def test_soft_token_count_mismatch_is_an_error(model_dir):
    model = load_model(model_dir)
    a = model.args
    ids = np.array([[2, a.boi_token_id, a.image_token_id, a.image_token_id, a.eoi_token_id]])
    pixel_values = np.zeros((1, 70, 6912), np.float32)
    positions = np.full((1, 70, 2), -1, np.int64)
    positions[0, :3] = [[0, 0], [1, 0], [2, 0]]  # three valid patches, two slots
    with pytest.raises(InputError, match="3 soft tokens, 2 slots"):
        model(ids, None, pixel_values, positions)
