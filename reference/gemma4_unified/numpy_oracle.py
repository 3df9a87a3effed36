"""An independent float64 NumPy oracle, written from the catalog's words (not from HF's code).

One function per op, plus the preprocessing and the vision embedder built from them. It reads the
checkpoint's on-disk keys itself. When HF and the port disagree, this is the seed of truth.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

F64 = np.float64


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(F64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, as torch
    return (x - mu) / np.sqrt(var + eps) * w.astype(F64) + b.astype(F64)


def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    """Gemma 4: x_hat * w (not 1 + w); no weight at all for the with_scale=False norms."""
    x = x.astype(F64)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if w is None else y * w.astype(F64)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    x = x.astype(F64)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    return np.tanh(x.astype(F64) / cap) * cap


def factorized_posemb(table: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """table (S, 2, D); positions (..., 2) as (x, y), -1 = padding -> (..., D).
    Axis 0 of the table embeds x (the column), axis 1 embeds y (the row); each axis masked on its own."""
    table = table.astype(F64)
    out = np.zeros(positions.shape[:-1] + (table.shape[-1],), F64)
    for axis in (0, 1):
        p = positions[..., axis]
        valid = p >= 0
        out[valid] += table[p[valid], axis]
    return out


def soft_token_grid(height: int, width: int, max_soft_tokens: int, side: int = 48) -> tuple[int, int]:
    """The resized (H, W): the largest multiples of ``side`` (patch size x pooling kernel, 48 px in
    Gemma 4) keeping the aspect ratio within the budget (catalog §1.2)."""
    budget_px = max_soft_tokens * side * side
    f = math.sqrt(budget_px / (height * width))
    th, tw = int(f * height // side) * side, int(f * width // side) * side
    if th == 0:
        th, tw = side, min(int(width // height) * side, max_soft_tokens * side)
    elif tw == 0:
        th, tw = min(int(height // width) * side, max_soft_tokens * side), side
    return th, tw


def patches(resized: np.ndarray, max_soft_tokens: int, side: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Resized RGB uint8 (H, W, 3) -> pixel_values (1, P, side*side*3) float32, positions (1, P, 2) int64.

    Written as an explicit gather: element (row*side + col)*3 + c of cell (gy, gx) is pixel
    (gy*side + row, gx*side + col, c); cells in raster order; positions (x=gx, y=gy); padding 0 / -1.
    """
    h, w, _ = resized.shape
    gh, gw = h // side, w // side
    n = gh * gw
    cell = np.arange(n)
    gy, gx = cell // gw, cell % gw
    e = np.arange(side * side * 3)
    row, col, ch = e // (side * 3), (e // 3) % side, e % 3
    rows = gy[:, None] * side + row[None, :]
    cols = gx[:, None] * side + col[None, :]
    values = resized[rows, cols, ch[None, :]].astype(np.float32) * np.float32(1 / 255)
    pixel_values = np.zeros((1, max_soft_tokens, side * side * 3), np.float32)
    positions = np.full((1, max_soft_tokens, 2), -1, np.int64)
    pixel_values[0, :n] = values
    positions[0, :n, 0], positions[0, :n, 1] = gx, gy
    return pixel_values, positions


def load_vision_weights(model_dir: str | Path) -> dict[str, np.ndarray]:
    """The vision tensors of a checkpoint, by on-disk name without the prefix (either spelling).
    Only the shards holding them are opened, and only those tensors are read (bf16 widened to fp32)."""
    import torch
    from safetensors import safe_open

    prefixes = ("model.vision_embedder.", "model.embed_vision.multimodal_embedder.", "model.embed_vision.")
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        import json
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if k.startswith(prefixes)})
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(model_dir / f, framework="pt") as h:
            for key in h.keys():
                prefix = next((p for p in prefixes if key.startswith(p)), None)
                if prefix is not None:
                    t = h.get_tensor(key)
                    out[key[len(prefix):]] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return out


def vision_embedder(w: dict[str, np.ndarray], pixel_values: np.ndarray, positions: np.ndarray,
                    rms_eps: float = 1e-6) -> dict[str, np.ndarray]:
    """Every vision stage in float64 (keys are the public stage names)."""
    out = {}
    h = layer_norm(pixel_values, w["patch_ln1.weight"], w["patch_ln1.bias"], 1e-5)
    out["vision.patch_ln1"] = h
    h = h @ w["patch_dense.weight"].astype(F64).T + w["patch_dense.bias"].astype(F64)
    out["vision.patch_dense"] = h
    h = layer_norm(h, w["patch_ln2.weight"], w["patch_ln2.bias"], 1e-5)
    out["vision.patch_ln2"] = h
    h = h + factorized_posemb(w["pos_embedding"], positions)
    out["vision.pos_embed"] = h
    h = layer_norm(h, w["pos_norm.weight"], w["pos_norm.bias"], 1e-5)
    out["vision.pos_norm"] = h
    h = rms_norm(h, None, rms_eps)
    out["vision.mm_prenorm"] = h
    h = h @ w["embedding_projection.weight"].astype(F64).T
    valid = (positions != -1).all(-1).reshape(-1)
    out["vision.soft_tokens"] = h.reshape(-1, h.shape[-1])[valid][None]
    return out
