"""Shared ops of the port."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def _blocked_mean(x: mx.array) -> mx.array:
    """Mean over the last axis as a sum of block sums (block <= 64), keepdims.

    MLX's CPU reduction adds an fp32 row sequentially: over a 6912-wide patch row that loses
    ~1e-5 relative (measured: sum 3469.506 vs exact 3469.553), enough to move a LayerNorm output
    by 3e-3. Summing blocks first keeps every partial sum small (pairwise-like error growth).
    """
    n = x.shape[-1]
    block = 64
    while n % block:
        block //= 2
    # (..., n) -> (..., n // block, block)
    return x.reshape(*x.shape[:-1], n // block, block).sum(-1).sum(-1, keepdims=True) / n


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """torch.nn.LayerNorm (biased variance), accurate in fp32 on long rows.

    Shifted two-pass: subtracting the row's first element makes constant rows exactly zero
    (a solid-colour patch collapses to ``bias`` exactly, as in torch) and keeps sums small.
    Measured against float64 on 6912-wide rows of pixels: 1.2e-6 (torch: 1.8e-6); mx.fast.layer_norm: 2.9e-3.
    """
    dtype = x.dtype
    x = x.astype(mx.float32)
    d = x - x[..., :1]
    d = d - _blocked_mean(d)
    var = _blocked_mean(d * d)
    return (d * mx.rsqrt(var + eps) * weight.astype(mx.float32) + bias.astype(mx.float32)).astype(dtype)


class LayerNorm(nn.Module):
    """``nn.LayerNorm``'s parameters (``weight``, ``bias``), computed with :func:`layer_norm`."""

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return layer_norm(x, self.weight, self.bias, self.eps)
