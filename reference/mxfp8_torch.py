"""The MXFP8 round trip ``decode(*encode(w))`` of :mod:`reference.mxfp8`, computed by torch.

The NumPy codec costs ~40 ns per value: 490 s for the 11.8 G weights of a 12B-shaped checkpoint
streamed under ``--quantize mxfp8`` (docs/streaming.md). This computes the same float32 values
with torch's threaded element-wise kernels, a band of blocks at a time, in the same arithmetic:

1. ``k = max|w| / 448`` in float32, rounded to the input dtype;
2. ``e = ceil(log2 k)`` (``torch.frexp``: exact), ``e = 0`` for an all-zero block;
3. ``q = w / 2**e`` in float32 (MLX rounds it to the input dtype too, which changes no E4M3 code);
4. ``q`` clamped to +-448 (MLX saturates) and rounded to the nearest E4M3 value, ties to even, in
   float32: ``(q + m) - m`` with ``m = +-2**(max(E, -6) + 20)`` for ``2**E <= |q| < 2**(E + 1)``
   rounds ``q`` to a multiple of ``2**(max(E, -6) - 3)`` -- three mantissa bits, and E4M3's
   subnormal step ``2**-9`` below ``2**-6`` -- the float32 addition doing the rounding; the sign of
   ``m`` is restored on a zero;
5. that value times ``2**e`` in float32 (exact).

Step 4 replaces torch's ``float8_e4m3fn`` cast and back, which take 21 of a band's 45 ms
(8 Mi values, 2 threads); the tests hold it to ml_dtypes' cast through the NumPy codec, every E4M3
rounding boundary included.

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
_EXPONENT = 0x7F800000  # a float32's exponent bits
_SMALLEST_NORMAL = (127 - 6) << 23  # 2**-6, E4M3's smallest normal, as float32 bits
_DROP = 20 << 23  # 2**20: float32 has 23 mantissa bits, E4M3 3


def roundtrip(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``mxfp8.decode(*mxfp8.encode(w))`` in float32, for a float32 or bfloat16 ``w`` of shape (..., K).
    ``out``: a contiguous float32 tensor of ``w``'s shape to compute into (``w`` itself included: the
    round trip in place, no fresh pages), else a new one."""
    if w.dtype not in _DTYPES:
        raise TypeError(f"the MXFP8 round trip takes float32 or bfloat16, got {w.dtype}")
    if w.ndim == 0 or w.shape[-1] == 0 or w.shape[-1] % mxfp8.BLOCK:
        raise ValueError(f"the last axis of {tuple(w.shape)} must be a positive multiple of {mxfp8.BLOCK}")
    if out is not None and (out.dtype != torch.float32 or out.shape != w.shape or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(w.shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    blocks = w.detach().reshape(-1, mxfp8.BLOCK)
    result = torch.empty(blocks.shape, dtype=torch.float32) if out is None else out.detach().view(blocks.shape)
    scratch = torch.empty((min(BAND, blocks.shape[0]), mxfp8.BLOCK), dtype=torch.int32)
    for start in range(0, blocks.shape[0], BAND):
        band = blocks[start:start + BAND]
        _band(band, result[start:start + BAND], scratch[:band.shape[0]])
    return result.reshape(w.shape) if out is None else out


def _band(blocks: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """One band, computed in ``out`` in place with one int32 ``scratch`` of its shape (fresh
    temporaries of this size cost page faults). ``out`` may be ``blocks`` itself."""
    dt = blocks.dtype
    out.copy_(blocks)  # float32, exact
    # max |w| without an |w| copy; NaN propagates (torch.aminmax over 32 values is 3x slower)
    k = torch.maximum(out.amax(-1), out.amin(-1).neg_()).div_(mxfp8.E4M3_MAX).to(dt).float()
    mant, exp = torch.frexp(k)  # k = mant * 2**exp, 0.5 <= mant < 1 (mant 0 for k 0)
    e = torch.where(mant == 0.5, exp - 1, exp)
    e = torch.where(k > 0, e, torch.zeros_like(e))
    odd = ~torch.isfinite(k) | ((k > 0) & (e < -126))
    # MLX's own arithmetic for non-finite and tiny blocks (module docstring): their inputs, kept before
    # ``out`` (which may be ``blocks``) is overwritten
    odd_rows = blocks[odd].float().numpy() if bool(odd.any()) else None
    pow2 = torch.ldexp(torch.ones_like(k), e)[:, None]
    # w / 2**e is exact in float32 unless the quotient is subnormal there (|q| < 2**-126); rounding
    # such a quotient to bfloat16 first, as MLX does, changes nothing: E4M3 takes it to +-0 either way
    q = out.div_(pow2).clamp_(-mxfp8.E4M3_MAX, mxfp8.E4M3_MAX)
    m = torch.bitwise_and(q.view(torch.int32), _EXPONENT, out=scratch)
    m = m.clamp_min_(_SMALLEST_NORMAL).add_(_DROP).view(torch.float32).copysign_(q)  # step 4's m
    q.add_(m).sub_(m).copysign_(m).mul_(pow2)  # x - x is +0: the zero takes q's sign back from m
    if odd_rows is not None:
        rows = odd_rows.astype(ml_dtypes.bfloat16) if dt == torch.bfloat16 else odd_rows
        out[odd] = torch.from_numpy(np.asarray(mxfp8.decode(*mxfp8.encode(rows)), np.float32))
