"""Gemma 4 SigLIP-style vision tower (HF ``Gemma4VisionModel``, transformers 5.24), in MLX.

    pixels (B, P, p*p*3) in [0, 1] -> 2 (x - 0.5) -> input_proj (no bias)       vision.patch_embed
      + table[0][x] + table[1][y] (0 on padding rows)                           vision.pos_embed
    -> encoder layers: sandwich RMSNorms (x_hat * w), q/k RMSNorm + axial 2-D RoPE, weightless v norm,
       attention scale 1.0, padding keys masked, gelu-tanh gated MLP; every Linear optionally clamped
       on its input and output (Gemma4ClippableLinear)                          vision.layers.{i}.*
    -> zero the padding rows, average k x k cells by patch position, * sqrt(hidden) in fp32   vision.pooled
    -> drop the empty cells, (x - std_bias) * std_scale when ``standardize``    vision.standardized

Attribute names are the checkpoint names under ``model.vision_tower``. The multimodal embedder into
the text width lives in ``model.py`` (it is ``model.embed_vision`` in the checkpoint).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from rmlx.errors import InputError
from rmlx.models.gemma4.config import VisionConfig
from rmlx.nn import fastmath
from rmlx.nn.base import RMSNorm, rms_norm
from rmlx.nn.kernels import Linear
from rmlx.nn.text import attention
from rmlx.tap import tap

LAYER_POINTS = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.out", "out")


def layer_stages(i: int) -> dict[str, str]:
    """The public stage names of vision encoder layer ``i``."""
    return {point: f"vision.layers.{i}.{point}" for point in LAYER_POINTS}


class ClippableLinear(nn.Module):
    """HF ``Gemma4ClippableLinear``: a bias-free ``linear``; with ``use_clipped_linears`` its input and
    output are clamped to the checkpoint's scalar bounds (``input_min`` ... ``output_max``)."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.linear = Linear(in_features, out_features, bias=False)
        self._clipped = clipped
        if clipped:  # HF initialises them to -inf / +inf: no clamp until a checkpoint sets them
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if not self._clipped:
            return self.linear(x)
        # torch.clamp(x, lo, hi) = min(max(x, lo), hi), in x's dtype (0-d bounds do not promote)
        x = mx.minimum(mx.maximum(x, self.input_min.astype(x.dtype)), self.input_max.astype(x.dtype))
        y = self.linear(x)
        return mx.minimum(mx.maximum(y, self.output_min.astype(y.dtype)), self.output_max.astype(y.dtype))


class AxialRoPE:
    """HF ``Gemma4VisionRotaryEmbedding`` + ``apply_multidimensional_rope`` (2 axes).

    inv_freq = theta^(-2i / (d/2)) for i < d/4. The head splits in halves: the first rotates with the
    patch's x, the second with its y, each as rotate-half pairs (j, j + d/4) inside its half. HF lays
    cos/sin out as [c_x, c_x, c_y, c_y] (d/4 each). Padding rows rotate with their position -1, as HF.
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        spatial = head_dim // 2
        # HF: 1 / (base ** (arange(0, spatial, 2, float32) / spatial)), in float32
        exponent = np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)
        self.inv_freq = mx.array(1.0 / (np.float32(theta) ** exponent), dtype=mx.float32)  # (d/4,)

    def cos_sin(self, position_ids: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """position_ids (B, P, 2) as (x, y) -> cos, sin (B, P, 1, d) in ``dtype`` (computed in fp32)."""
        freqs = position_ids.astype(mx.float32)[..., None] * self.inv_freq  # (B, P, 2, d/4)
        cos, sin = mx.cos(freqs), mx.sin(freqs)

        def layout(f: mx.array) -> mx.array:  # (B, P, 2, d/4) -> [f_x, f_x, f_y, f_y] (B, P, 1, d)
            fx, fy = f[:, :, 0], f[:, :, 1]
            return mx.concatenate([fx, fx, fy, fy], axis=-1)[:, :, None, :].astype(dtype)

        return layout(cos), layout(sin)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """x (B, P, heads, d): each half rotated on its own (rotate_half within the half)."""
        q = self.head_dim // 4
        x1a, x1b, x2a, x2b = (x[..., i * q:(i + 1) * q] for i in range(4))
        rotated = mx.concatenate([-x1b, x1a, -x2b, x2a], axis=-1)
        return x * cos + rotated * sin


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, rope: AxialRoPE):
        super().__init__()
        d, c = cfg.head_dim, cfg.use_clipped_linears
        self.head_dim = d
        self.eps = cfg.rms_norm_eps
        self.q_proj = ClippableLinear(cfg.hidden_size, cfg.num_attention_heads * d, c)
        self.k_proj = ClippableLinear(cfg.hidden_size, cfg.num_key_value_heads * d, c)
        self.v_proj = ClippableLinear(cfg.hidden_size, cfg.num_key_value_heads * d, c)
        self.o_proj = ClippableLinear(cfg.num_attention_heads * d, cfg.hidden_size, c)
        self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps)
        self._rope = rope

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array, names: dict[str, str]) -> mx.array:
        b, p, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).reshape(b, p, -1, d)  # (B, P, H*d) -> (B, P, H, d)
        k = self.k_proj(x).reshape(b, p, -1, d)  # (B, P, kv*d) -> (B, P, kv, d)
        v = self.v_proj(x).reshape(b, p, -1, d)
        q = tap(names["attn.q"], self._rope(self.q_norm(q), cos, sin))
        k = tap(names["attn.k"], self._rope(self.k_norm(k), cos, sin))
        v = tap(names["attn.v"], rms_norm(v, None, self.eps))  # HF v_norm: RMSNorm without a weight
        # (B, P, heads, d) -> (B, heads, P, d); scale 1.0 (QK-norm), GQA as HF's repeat_kv
        out = attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
        return tap(names["attn.out"], self.o_proj(out))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.use_clipped_linears
        self.gate_proj = ClippableLinear(cfg.hidden_size, cfg.intermediate_size, c)
        self.up_proj = ClippableLinear(cfg.hidden_size, cfg.intermediate_size, c)
        self.down_proj = ClippableLinear(cfg.intermediate_size, cfg.hidden_size, c)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.dtype == mx.float32:
            return self.down_proj(fastmath.gelu_tanh(gate, up))
        return self.down_proj(fastmath.gelu_tanh(gate.astype(mx.float32)).astype(x.dtype) * up)  # torch: gelu in fp32


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, i: int, rope: AxialRoPE):
        super().__init__()
        self._names = layer_stages(i)
        self.self_attn = VisionAttention(cfg, rope)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array) -> mx.array:
        n = self._names
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, n)
        x = x + self.post_attention_layernorm(h)
        h = tap(n["mlp.out"], self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.post_feedforward_layernorm(h)
        return tap(n["out"], x)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self._rope = AxialRoPE(cfg.head_dim, cfg.rope_theta)
        self.layers = [VisionEncoderLayer(cfg, i, self._rope) for i in range(cfg.num_hidden_layers)]

    def __call__(self, x: mx.array, position_ids: mx.array, valid: mx.array) -> mx.array:
        """x (B, P, D), position_ids (B, P, 2), valid (B, P) bool -> last hidden state (B, P, D).

        Bidirectional: every row (padding rows too, as HF) attends to the valid patches of its image."""
        b, p, _ = x.shape
        mask = mx.broadcast_to(valid[:, None, :], (b, p, p))  # (B, Lq, Lk), True = may attend
        cos, sin = self._rope.cos_sin(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x


class PatchEmbedder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_proj = Linear(cfg.patch_dim, cfg.hidden_size, bias=False)
        self.position_embedding_table = mx.zeros((2, cfg.position_embedding_size, cfg.hidden_size))

    def __call__(self, pixel_values: mx.array, position_ids: mx.array, padding: mx.array) -> mx.array:
        # HF scales in the pixels' dtype (fp32 from the processor), then casts to the weight dtype
        x = 2 * (pixel_values.astype(mx.float32) - 0.5)
        h = tap("vision.patch_embed", self.input_proj(x.astype(self.input_proj.weight.dtype)))
        pos = mx.maximum(position_ids, 0)  # padding (-1) -> a valid index; its embedding is zeroed below
        table = self.position_embedding_table
        emb = mx.take(table[0], pos[..., 0], axis=0) + mx.take(table[1], pos[..., 1], axis=0)  # (B, P, D)
        emb = mx.where(padding[..., None], mx.array(0.0, emb.dtype), emb)
        return tap("vision.pos_embed", h + emb)


def pooling_weights(position_ids: np.ndarray, k: int, length: int) -> np.ndarray:
    """HF ``Gemma4VisionPooler._avg_pool_by_positions``' weights: patch (x, y) -> cell
    x // k + (max_x // k) * (y // k), one-hot / k^2, (B, P, length) float32. Padding rows (clamped to
    (0, 0)) land in cell 0; their hidden states are zero, so they add nothing."""
    clamped = np.maximum(position_ids, 0)
    max_x = clamped[..., 0].max(axis=-1, keepdims=True) + 1  # (B, 1): the patch grid's width
    cells = clamped // k
    idx = cells[..., 0] + (max_x // k) * cells[..., 1]  # (B, P)
    if idx.max(initial=0) >= length:
        raise InputError(f"patch positions map to pooled cell {int(idx.max())}, but the image has room for "
                         f"{length} (max_soft_tokens); position ids and pixel rows disagree")
    onehot = (idx[..., None] == np.arange(length)).astype(np.float32)
    return onehot / np.float32(k * k)


class VisionModel(nn.Module):
    """HF ``Gemma4VisionModel``: attribute names are the checkpoint names under ``model.vision_tower``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = VisionEncoder(cfg)
        if cfg.standardize:
            self.std_bias = mx.zeros((cfg.hidden_size,))
            self.std_scale = mx.ones((cfg.hidden_size,))

    def __call__(self, pixel_values: mx.array | np.ndarray, position_ids: mx.array | np.ndarray) -> mx.array:
        """pixel_values (B, P, p*p*3), position_ids (B, P, 2) int (x, y), -1 = padding ->
        the soft-token features of every image, in order, padding dropped: (1, N, hidden)."""
        cfg = self.cfg
        pos_np = np.asarray(position_ids).astype(np.int64)
        b, p = pos_np.shape[:2]
        if np.asarray(pixel_values).shape[:2] != (b, p) or pos_np.ndim != 3 or pos_np.shape[2] != 2:
            raise InputError(f"pixel_values {tuple(np.asarray(pixel_values).shape)} and position ids "
                             f"{pos_np.shape} do not match: expected (B, P, {cfg.patch_dim}) and (B, P, 2)")
        if pixel_values.shape[2] != cfg.patch_dim:
            raise InputError(f"pixel_values rows have {pixel_values.shape[2]} values; patch_size={cfg.patch_size} "
                             f"needs {cfg.patch_dim}")
        if pos_np.max(initial=-1) >= cfg.position_embedding_size:
            raise InputError(f"position id {int(pos_np.max())} is outside the position table "
                             f"(position_embedding_size={cfg.position_embedding_size})")
        k = cfg.pooling_kernel_size
        if p % (k * k):
            raise InputError(f"{p} patch rows per image are not a multiple of pooling_kernel_size^2 = {k * k}")
        length = p // (k * k)  # soft tokens per image (HF's output_length)

        padding_np = (pos_np == -1).all(-1)  # (B, P)
        padding = mx.array(padding_np)
        positions = mx.array(pos_np)
        h = self.patch_embedder(mx.array(pixel_values), positions, padding)
        h = self.encoder(h, positions, ~padding)

        dtype = h.dtype
        h, valid = self.pool(h, padding, pos_np, length)
        h = tap("vision.pooled", h)

        keep = np.flatnonzero(valid.reshape(-1))  # HF: hidden_states[pooler_mask], (b, cell) order
        h = h.reshape(-1, h.shape[-1])[mx.array(keep)][None]  # (B*length, D) -> (1, N, D)
        if cfg.standardize:
            return tap("vision.standardized", self.standardize(h).astype(dtype))
        return h.astype(dtype)

    def pool(self, h: mx.array, padding: mx.array, pos_np: np.ndarray, length: int) -> tuple[mx.array, np.ndarray]:
        """HF ``Gemma4VisionPooler``: zero the padding rows, average k x k cells (a one-hot matmul, as HF),
        scale by sqrt(hidden) in fp32. Returns (pooled (B, length, D) fp32, valid cells (B, length) bool)."""
        dtype = h.dtype
        h = mx.where(padding[..., None], mx.array(0.0, dtype), h)
        weights = pooling_weights(pos_np, self.cfg.pooling_kernel_size, length)  # (B, P, length); P != length
        h = (mx.array(weights).transpose(0, 2, 1) @ h.astype(mx.float32)).astype(dtype)  # (B, length, D)
        valid = (weights != 0).any(axis=1)  # (B, length): cells that received a patch
        return h.astype(mx.float32) * mx.array(math.sqrt(self.cfg.hidden_size), mx.float32), valid

    def standardize(self, h: mx.array) -> mx.array:
        """(x - std_bias) * std_scale, in fp32 (the bias subtraction cancels large values); the caller casts."""
        return (h - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
