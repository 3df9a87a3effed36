"""The MXFP8 round trip ``decode(*encode(w))`` of :mod:`reference.mxfp8`, computed by torch.

The NumPy codec costs ~40 ns per value: 490 s for the 11.8 G weights of a 12B-shaped checkpoint
streamed under ``--quantize mxfp8`` (docs/streaming.md). This computes the same float32 values
with torch's threaded element-wise kernels and its ``float8_e4m3fn`` cast, a band of blocks at a
time, in the same arithmetic:

1. ``k = max|w| / 448`` in float32, rounded to the input dtype;
2. ``e = ceil(log2 k)`` (``torch.frexp``: exact), ``e = 0`` for an all-zero block;
3. ``q = w / 2**e`` in float32 (MLX rounds it to the input dtype too, which changes no E4M3 code);
4. ``q`` clamped to +-448 (MLX saturates) and cast to E4M3, round-to-nearest-even;
5. the E4M3 value times ``2**e`` in float32 (exact).

Blocks where MLX's codec departs from that arithmetic -- a NaN or an infinity in the block (D4), or
``e < -126`` (D3: the scale byte wraps) -- go through :mod:`reference.mxfp8` itself. A trained
checkpoint has none. ``tests/test_mxfp8_codec.py`` holds the two to the same bits on random, edge
and Hypothesis-drawn blocks of float32 and bfloat16.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from reference import mxfp8

_DTYPES = (torch.float32, torch.bfloat16)
BAND = 1 << 18  # blocks per step (8 Mi values): the temporaries of a band, not of the whole weight


def roundtrip(w: torch.Tensor) -> torch.Tensor:
    """``mxfp8.decode(*mxfp8.encode(w))`` in float32, for a float32 or bfloat16 ``w`` of shape (..., K)."""
    if w.dtype not in _DTYPES:
        raise TypeError(f"the MXFP8 round trip takes float32 or bfloat16, got {w.dtype}")
    if w.ndim == 0 or w.shape[-1] == 0 or w.shape[-1] % mxfp8.BLOCK:
        raise ValueError(f"the last axis of {tuple(w.shape)} must be a positive multiple of {mxfp8.BLOCK}")
    blocks = w.detach().reshape(-1, mxfp8.BLOCK)
    out = torch.empty(blocks.shape, dtype=torch.float32)
    for start in range(0, blocks.shape[0], BAND):
        _band(blocks[start:start + BAND], out[start:start + BAND])
    return out.reshape(w.shape)


def _band(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """One band, computed in ``out`` in place (fresh temporaries of this size cost page faults)."""
    dt = blocks.dtype
    out.copy_(blocks)  # float32, exact
    low, high = torch.aminmax(out, dim=-1)  # max |w| without an |w| copy; NaN propagates
    k = torch.maximum(high, -low).div_(mxfp8.E4M3_MAX).to(dt).float()
    mant, exp = torch.frexp(k)  # k = mant * 2**exp, 0.5 <= mant < 1 (mant 0 for k 0)
    e = torch.where(mant == 0.5, exp - 1, exp)
    e = torch.where(k > 0, e, torch.zeros_like(e))
    pow2 = torch.ldexp(torch.ones_like(k), e)[:, None]
    # w / 2**e is exact in float32 unless the quotient is subnormal there (|q| < 2**-126); rounding
    # such a quotient to bfloat16 first, as MLX does, changes nothing: E4M3 takes it to +-0 either way
    code = out.div_(pow2).clamp_(-mxfp8.E4M3_MAX, mxfp8.E4M3_MAX).to(torch.float8_e4m3fn)
    out.copy_(code).mul_(pow2)
    odd = ~torch.isfinite(k) | ((k > 0) & (e < -126))
    if bool(odd.any()):  # MLX's own arithmetic for non-finite and tiny blocks (module docstring)
        rows = blocks[odd].float().numpy()
        if dt == torch.bfloat16:
            rows = rows.astype(ml_dtypes.bfloat16)
        out[odd] = torch.from_numpy(np.asarray(mxfp8.decode(*mxfp8.encode(rows)), np.float32))
