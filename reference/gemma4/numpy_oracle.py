"""An independent float64 NumPy oracle of the gemma4 vision path (tower + multimodal embedder).

Written from transformers 5.24's ``modeling_gemma4.py`` (Gemma4VisionModel, Gemma4MultimodalEmbedder),
in float64 throughout, from the checkpoint's safetensors. Returns the same stage names as the port
(``vision.patch_embed`` ... ``vision.soft_tokens``), so either side can be measured against it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _rms(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if w is None else y * w


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pad: np.ndarray, rows: int = 128) -> np.ndarray:
    """softmax(q k^T) v, scale 1.0, padding keys masked: q (B, P, H, d), k/v (B, P, KV, d) -> (B, P, H, d).

    A masked key's weight is exactly 0, so each image attends over its valid keys only; the scores go
    in blocks of ``rows`` query rows of one head, computed in place: 128 rows of 1120 keys are 1.1 MB and stay
    in cache (blocks of 512 rows give the same values, in more time)."""
    b, p, heads, d = q.shape
    groups = heads // k.shape[2]
    out = np.empty_like(q)
    for bi in range(b):
        keep = ~pad[bi]
        kb, vb = k[bi, keep], v[bi, keep]  # (Pv, KV, d)
        for h in range(heads):
            kt, vh = kb[:, h // groups].T, vb[:, h // groups]  # (d, Pv), (Pv, d)
            for start in range(0, p, rows):
                s = q[bi, start:start + rows, h] @ kt  # (rows, Pv)
                s -= s.max(-1, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(-1, keepdims=True)
                out[bi, start:start + rows, h] = s @ vh
    return out


def vision(model_dir: str | Path, pixel_values: np.ndarray, position_ids: np.ndarray) -> dict[str, np.ndarray]:
    """pixel_values (B, P, p*p*3), position_ids (B, P, 2) -> {stage name: float64 array}."""
    import ml_dtypes  # noqa: F401  (NumPy's bfloat16, which safetensors.numpy reads a BF16 tensor as)
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    v, t = cfg["vision_config"], cfg["text_config"]
    w = {k: np.asarray(a, np.float64) for k, a in load_file(str(model_dir / "model.safetensors")).items()}
    vt = "model.vision_tower."
    eps, d = v["rms_norm_eps"], v["head_dim"]
    heads, kv = v["num_attention_heads"], v["num_key_value_heads"]
    clipped = v.get("use_clipped_linears", False)
    out: dict[str, np.ndarray] = {}

    def linear(prefix: str, x: np.ndarray) -> np.ndarray:
        if clipped:
            x = np.minimum(np.maximum(x, w[prefix + "input_min"]), w[prefix + "input_max"])
        y = x @ w[prefix + "linear.weight"].T
        if clipped:
            y = np.minimum(np.maximum(y, w[prefix + "output_min"]), w[prefix + "output_max"])
        return y

    pos = position_ids.astype(np.int64)
    pad = (pos == -1).all(-1)  # (B, P)
    b, p = pad.shape
    x = 2.0 * (pixel_values.astype(np.float64) - 0.5)
    h = x @ w[vt + "patch_embedder.input_proj.weight"].T
    out["vision.patch_embed"] = h
    table = w[vt + "patch_embedder.position_embedding_table"]
    c = np.maximum(pos, 0)
    h = h + np.where(pad[..., None], 0.0, table[0][c[..., 0]] + table[1][c[..., 1]])
    out["vision.pos_embed"] = h

    # axial RoPE: first half of each head rotates with x, second with y (inv_freq over d/2, d/4 entries)
    spatial = d // 2
    inv = 1.0 / (v.get("rope_parameters", {}).get("rope_theta", 100.0) ** (np.arange(0, spatial, 2) / spatial))
    ang = pos[..., None].astype(np.float64) * inv  # (B, P, 2, d/4)
    cos = np.concatenate([np.cos(ang[:, :, 0])] * 2 + [np.cos(ang[:, :, 1])] * 2, -1)[:, :, None]
    sin = np.concatenate([np.sin(ang[:, :, 0])] * 2 + [np.sin(ang[:, :, 1])] * 2, -1)[:, :, None]

    def rope(z: np.ndarray) -> np.ndarray:  # (B, P, H, d)
        parts = []
        for a in range(2):
            s = slice(a * spatial, (a + 1) * spatial)
            parts.append(z[..., s] * cos[..., s] + _rotate_half(z[..., s]) * sin[..., s])
        return np.concatenate(parts, -1)

    for i in range(v["num_hidden_layers"]):
        lp = f"{vt}encoder.layers.{i}."
        a = _rms(h, w[lp + "input_layernorm.weight"], eps)
        q = linear(lp + "self_attn.q_proj.", a).reshape(b, p, heads, d)
        k = linear(lp + "self_attn.k_proj.", a).reshape(b, p, kv, d)
        val = linear(lp + "self_attn.v_proj.", a).reshape(b, p, kv, d)
        q = rope(_rms(q, w[lp + "self_attn.q_norm.weight"], eps))
        k = rope(_rms(k, w[lp + "self_attn.k_norm.weight"], eps))
        val = _rms(val, None, eps)
        out[f"vision.layers.{i}.attn.q"], out[f"vision.layers.{i}.attn.k"] = q, k
        out[f"vision.layers.{i}.attn.v"] = val
        o = _attention(q, k, val, pad).reshape(b, p, heads * d)
        o = linear(lp + "self_attn.o_proj.", o)
        out[f"vision.layers.{i}.attn.out"] = o
        h = h + _rms(o, w[lp + "post_attention_layernorm.weight"], eps)
        m = _rms(h, w[lp + "pre_feedforward_layernorm.weight"], eps)
        m = linear(lp + "mlp.down_proj.", _gelu_tanh(linear(lp + "mlp.gate_proj.", m)) * linear(lp + "mlp.up_proj.", m))
        out[f"vision.layers.{i}.mlp.out"] = m
        h = h + _rms(m, w[lp + "post_feedforward_layernorm.weight"], eps)
        out[f"vision.layers.{i}.out"] = h

    # pooler: average each k x k cell of patches (by position), scale by sqrt(hidden)
    kk = v["pooling_kernel_size"]
    length = p // (kk * kk)
    h = np.where(pad[..., None], 0.0, h)
    width = c[..., 0].max(-1, keepdims=True) + 1
    cell = c[..., 0] // kk + (width // kk) * (c[..., 1] // kk)  # (B, P)
    pooled = np.zeros((b, length, h.shape[-1]))
    filled = np.zeros((b, length), bool)
    for bi in range(b):
        np.add.at(pooled[bi], cell[bi], h[bi] / (kk * kk))
        filled[bi, cell[bi]] = True
    pooled *= math.sqrt(v["hidden_size"])
    out["vision.pooled"] = pooled
    feats = pooled[filled][None]  # (1, N, D), (image, cell) order
    if v.get("standardize", False):
        feats = (feats - w[vt + "std_bias"]) * w[vt + "std_scale"]
        out["vision.standardized"] = feats
    feats = _rms(feats, None, eps) @ w["model.embed_vision.embedding_projection.weight"].T
    assert feats.shape[-1] == t["hidden_size"]
    out["vision.soft_tokens"] = feats
    return out
