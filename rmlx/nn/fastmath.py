"""exp-based element-wise math as vectorised kernels for MLX's CPU backend on Linux.

Why: MLX 0.32's CPU kernels on Linux are scalar (its SIMD layer is one lane wide there; Accelerate
vectorises it on macOS only). Measured on 2 cores at the 12B shapes: ``mx.exp`` 12 ns per value,
``mx.tanh`` (``std::tanh``) 16 ns, and ``mx.softmax`` one scalar exp per score. The decoder's
gelu-tanh over 1127 x 15360 and its softmax over 16 x 1127 x 1127 took 0.6 s of a 2.2 s layer, where
torch takes 0.06 s.

How: exp(x) = 2^y with y = x log2(e) = r + f, r the nearest integer and f in [-1/2, 1/2]: 2^f by the
Cephes polynomial MLX's own ``simd::exp`` uses (max relative error of exp measured 9.3e-7 for both),
2^r written straight into a float's exponent bits. ``mx.compile`` fuses each step's element-wise ops
into one kernel that g++ (MLX's CPU JIT) vectorises: ~0.5 ns per value and op in cache. Three kernels
per exp, because of what MLX fuses and what g++ vectorises:

1. y, clipped to the exponent range (the caller's arithmetic before it);
2. the bits of 2^r from y (a kernel of its own: ``mx.view``, the bit cast, is not fusable);
3. f and the polynomial from y, times 2^r, and the caller's arithmetic after it.

MLX's clip (maximum/minimum: a NaN test, then a branch) keeps g++ from vectorising a kernel that goes
on computing with the clipped value, hence 1 apart from 2; MLX fuses an op only when all its consumers
are in the same kernel, hence 3 recomputes r rather than sharing it with 2; and MLX fuses at most 11
ops deep, hence the polynomial in Estrin's scheme (4 deep, not Horner's 12).

:func:`enabled`: on the CPU on Linux, unless ``RMLX_NATIVE_MATH=1``. Otherwise every function here is
MLX's own op (``nn.gelu_approx``, ``mx.softmax``): the same values up to rounding, and either is what
the parity harness checks against the reference.

Not here: the final soft-cap's tanh. tanh from exp(-2z) - 1 computed as expm1 (accurate near 0) was
written and measured: on the 12B logits (1127 x 262144) no faster than ``mx.tanh``, per vocabulary
chunk of 16384 columns either (0.167 s against 0.169 s): there every pass is a trip to memory into a
freshly faulted buffer (~2 ns per value), and three kernels cost what tanh's slow arithmetic does.
"""

from __future__ import annotations

import math
import os
import sys

import mlx.core as mx
import mlx.nn as nn

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: (y + _ROUND) - _ROUND is y rounded to an integer (|y| < 2**22)
# 2^f - 1 on [-1/2, 1/2], Cephes (via MLX's simd::exp): the coefficients of f, f^2, ..., f^6
_P = (6.931472028550421e-1, 2.402264791363012e-1, 5.550332471162809e-2, 9.618437357674640e-3,
      1.339887440266574e-3, 1.535336188319500e-4)
_GELU = -2 * math.sqrt(2 / math.pi) * _LOG2E  # gelu-tanh: 0.5 x (1 + tanh(u)) = x / (1 + 2^(_GELU * ...))


def enabled() -> bool:
    """Do the functions below run rmlx's kernels (else MLX's own ops)?"""
    return sys.platform == "linux" and mx.default_device() == mx.cpu and os.environ.get("RMLX_NATIVE_MATH") != "1"


@mx.compile
def _bits(y: mx.array) -> mx.array:
    """The float bits of 2^r, r = round(y), for y in [-127, 128]: 2^y = 2^(y - r) * view(bits, float32).
    r = -127 gives the bits of 0.0, r = 128 those of inf."""
    return (((y + _ROUND) - _ROUND).astype(mx.int32) + 127) << 23


def _pow2(y: mx.array, scale: mx.array) -> mx.array:
    """2^y = 2^f * scale, f = y - round(y), ``scale`` = 2^round(y) (:func:`_bits`); the polynomial in
    Estrin's scheme (4 ops deep). Traced inside a kernel."""
    f = y - ((y + _ROUND) - _ROUND)
    f2 = f * f
    return scale * ((1.0 + _P[0] * f + f2 * (_P[1] + _P[2] * f)) + (f2 * f2) * ((_P[3] + _P[4] * f) + f2 * _P[5]))


def _scale(bits: mx.array) -> mx.array:
    return mx.view(bits, mx.float32)


@mx.compile
def _gelu_exponent(x: mx.array) -> mx.array:
    # y = -2 u log2(e), u = sqrt(2/pi) (x + 0.044715 x^3), clipped where exp(-2u) is 0 or inf anyway
    # (from x ~ +/-10): gelu(x) is then x / 1 = x, or x / inf = -0 as in torch
    return mx.clip(x * (_GELU + (_GELU * 0.044715) * (x * x)), -127.0, 128.0)


@mx.compile
def _gelu(x: mx.array, y: mx.array, scale: mx.array) -> mx.array:
    return x / (1.0 + _pow2(y, scale))


@mx.compile
def _gelu_times(x: mx.array, y: mx.array, scale: mx.array, up: mx.array) -> mx.array:
    return (x / (1.0 + _pow2(y, scale))) * up


def gelu_tanh(x: mx.array, up: mx.array | None = None) -> mx.array:
    """torch's ``gelu(x, approximate="tanh")`` of an fp32 ``x``, as ``x / (1 + exp(-2u))`` (the same
    function; no cancellation for negative x), times ``up`` when given (rounded after the gelu, as
    ``gelu(x) * up``)."""
    if not enabled():
        y = nn.gelu_approx(x)
        return y if up is None else y * up
    y = _gelu_exponent(x)
    bits = _bits(y)
    return _gelu(x, y, _scale(bits)) if up is None else _gelu_times(x, y, _scale(bits), up)


@mx.compile
def _exp_nonpositive_exponent(d: mx.array) -> mx.array:
    return mx.maximum(d * _LOG2E, -127.0)  # exp(-inf) and anything below 2^-127: exactly 0


@mx.compile
def _exp(y: mx.array, scale: mx.array) -> mx.array:
    return _pow2(y, scale)


def softmax(x: mx.array, bias: mx.array | None = None) -> mx.array:
    """Softmax over the last axis of fp32 ``x + bias`` (``bias``: 0 where attended, -inf where masked,
    which then gets exactly 0)."""
    if bias is not None:
        x = x + bias
    if not enabled():
        return mx.softmax(x, axis=-1)
    y = _exp_nonpositive_exponent(x - x.max(-1, keepdims=True))
    bits = _bits(y)
    e = _exp(y, _scale(bits))
    return e / e.sum(-1, keepdims=True)
