"""An independent MXFP8 (OCP Microscaling, E4M3 elements, E8M0 scales) codec in NumPy + ml_dtypes.

It reproduces, byte for byte, what mlx 0.32.4 (CPU) produces with
``mx.quantize(w, group_size=32, bits=8, mode="mxfp8")`` and ``mx.dequantize(...)``; with
``spec=True`` it follows the OCP Microscaling Formats (MX) v1.0 text where MLX departs from it.
This module never imports mlx.

Layout (MLX's)
--------------
``w`` of shape (..., K), K % 32 == 0, is cut into blocks of 32 consecutive values along the last
axis. ``mx.quantize`` returns two arrays (no biases): ``wq`` uint32 (..., K // 4) and ``scales``
uint8 (..., K // 32). Each E4M3 element is one byte; word j of a row holds elements 4j .. 4j+3,
element 4j in the least significant byte (MLX views the uint8 element buffer as uint32 on a
little-endian host; here the packing is written out with shifts, so it is host-independent).
Each scale byte is an E8M0 exponent: X = 2**(byte - 127). MLX refuses 1-D input ("must have at
least 2 dimensions"); this codec also takes (K,).

How MLX quantizes (read off the op graph of ``mx.quantize`` via ``mx.export_to_dot`` on mlx 0.32.4,
checked against mx.quantize on every bf16 and fp16 value as a block maximum and on random/edge
float32 blocks):

1. ``k = max|w| / 448``, evaluated in the input dtype (so rounded to bf16/fp16 for those inputs).
2. ``e = round(log2(k))`` cast to int32, then ``e += 1`` where ``2**e < k`` -- together exactly
   ``e = ceil(log2(k))``, the smallest power of two >= amax/448; ``e = 0`` where ``k == 0``.
3. elements: ``to_fp8(w / 2**e)`` with the division in the input dtype; ``to_fp8`` is
   round-to-nearest-even with saturation to +-448 (and NaN -> +-448, see below).
4. scale byte: ``uint8(e + 127)`` -- no clamping to the E8M0 range.

How MLX dequantizes: ``from_fp8(byte)`` and ``2 ** (scale - 127)`` are each evaluated in the output
dtype, then multiplied in that dtype. The output dtype defaults to **bfloat16** for mode="mxfp8"
(whatever the dtype that was quantized); ``decode`` defaults to float32 and takes ``dtype=`` to
match ``mx.dequantize(..., dtype=...)``, including ``ml_dtypes.bfloat16`` for MLX's default.

Where MLX and OCP MX v1.0 agree (checked, no difference)
-------------------------------------------------------
* Element conversion: round-to-nearest-even into E4M3 including its subnormals (multiples of 2**-9),
  saturating to +-448 (``mx.to_fp8`` equals ml_dtypes' RNE cast + saturation on every float16 value,
  a million random float32 bit patterns and a fine grid over [-500, 500], e.g. 470 -> 0x7E,
  2**-10 -> 0x00, 3*2**-10 -> 0x02). -0.0 keeps its sign
  (0x80). Float32 subnormal inputs are not flushed to zero.
* Scale byte 0x00 decodes to 2**-127, as E8M0 defines it.

Differences between MLX and OCP MX v1.0 (each has a test in tests/test_mxfp8_codec.py)
--------------------------------------------------------------------------------------
The spec's conversion (section 6.3): ``shared_exp = floor(log2(max_i |V_i|)) - emax_elem`` with
emax_elem = 8 for E4M3, ``X = 2**shared_exp``, ``P_i = quantize_to_element_format(V_i / X)``
(round-to-nearest-even, normal numbers clamped to the element max, +-448). E8M0 has no zero and
no infinity; 0xFF is NaN and a NaN scale makes every element of its block NaN. Points the text
leaves open (zero blocks, exponents below -127, Inf/NaN inputs) follow the OCP authors' reference
emulation library (microsoft/microxcaling, ``mx/mx_ops.py::_quantize_mx``): amax == 0 is treated
as the smallest normal float32, exponents below -127 clamp to -127, an infinite or NaN block
maximum makes the scale NaN. (The PDF itself was not available where this was written; the
section 6.3 formula is the one quoted by the task and by that library.)

D1. Scale rounding. MLX: X = 2**ceil(log2(amax / 448)), the smallest power of two with
    amax / X <= 448, so no element ever saturates. Spec: X = 2**(floor(log2 amax) - 8). They differ
    exactly when amax = m * 2**p with 1.75 < m < 2: MLX's X is twice the spec's, and the spec
    saturates the largest elements to +-448 instead. Evidence: block max 449 -> MLX scale 0x80
    (X = 2), element 224 (0x76); spec scale 0x7F (X = 1), element 448 (0x7E). Consequence: MLX is
    not a byte-level fixed point -- re-quantizing its own dequantized output changes the bytes when
    the block's largest element code decodes to 224 (e.g. block max 225 -> scale 0x7F, element 224;
    re-quantized -> scale 0x7E, element 448; same values). The spec rule is a fixed point.
D2. All-zero block. MLX: scale 0x7F (X = 1). Spec/reference: log2(0) -> minimum exponent, scale
    0x00 (X = 2**-127). Elements are 0 either way. Evidence: zeros((1, 32)) -> MLX scales [127].
D3. Tiny blocks: no clamping of the exponent. When ceil(log2(amax / 448)) < -127 (amax at or
    below 448 * 2**-128, about 1.3e-36), MLX stores (e + 127) mod 256: e = -128 gives 0xFF
    (a NaN scale), smaller e wrap to huge scales -- while the elements are still encoded relative
    to the true 2**e. Evidence: block max 1e-40 -> scale 242 (2**115), element 288 (0x79), so
    mx.dequantize returns 288 * 2**115 ~ 1.2e37 for an input of 1e-40; block max 2**-120 -> scale
    0xFF, dequantized to inf. Spec/reference: clamp to -127 (scale 0x00) and let the elements
    underflow: 1e-40 / 2**-127 ~ 0.017 -> E4M3 0x09 (0.017578125).
D4. Inf/NaN inputs. MLX never produces the E4M3 NaN code or the E8M0 NaN scale for them. The
    scale exponent comes from casting NaN/inf to int32 (x86-64: INT_MIN), so the division is by
    2**INT_MIN = 0: every finite nonzero element becomes +-inf -> saturated to +-448, zeros become
    0/0 = NaN -> +-448 with the sign of the platform's default NaN (x86-64: negative, so 0xFE;
    bfloat16 arithmetic re-canonicalises NaN to positive, so 0x7E), NaN inputs keep their own sign.
    The scale byte is uint8(float(INT_MIN) + 127): 0x80 (X = 2) for float32 input, 0x00 for
    bfloat16/float16 input. So a NaN or Inf anywhere in a float32 block dequantizes the whole
    block to finite +-896 values. Evidence: [nan, 1, -2, 0, ...] float32 -> scale 0x80, elements
    0x7E 0x7E 0xFE 0xFE...; dequantized [896, 896, -896, -896, ...]. These values depend on the
    host's float->int and default-NaN conventions (observed on x86-64); the codec reproduces them
    by doing the same arithmetic in NumPy on the same host, with the scale bytes hard-coded from
    the x86-64 observation. Spec/reference: scale 0xFF (NaN), whole block NaN; here every element
    is also written as the E4M3 NaN code 0x7F.
D5. Scale 0xFF on decode. MLX evaluates 2**(255 - 127) = inf, so elements decode to +-inf and
    zeros to NaN. Spec: 0xFF is NaN, the whole block is NaN. Evidence: mx.dequantize with scale
    255 and elements [1, 0, 0.5] -> [inf, nan, inf].
D6. Float16 dequantize is not X * P rounded once. MLX forms 2**(s - 127) in float16 first, so a
    scale outside float16's range becomes inf or 0 before the multiply. Evidence: element 2**-9
    with scale 2**16 (byte 143): MLX float16 -> inf (true value 128); zero elements -> NaN; element
    256 with scale 2**-30 (byte 97): MLX -> 0 (true value 2**-22, a float16 subnormal). float32
    and bfloat16 outputs are exact/correctly rounded (their exponent range holds every scale but
    2**128). ``decode(..., spec=True)`` rounds X * P once.
D7. Scale computed in the input precision. For float16 input amax / 448 is rounded to float16: it
    underflows to 0 for amax <= 448 * 2**-25 (~1.3e-5), so MLX uses X = 1 and the whole block
    quantizes to +-0; a little above, in float16's subnormal range, it is rounded coarsely and can
    come out below amax / 448, so the largest elements saturate. Evidence: float16 block max
    2**-17 -> MLX scale 0x7F, every element +-0 (0x00/0x80); spec X = 2**(-17 - 8) = 2**-25 (scale
    0x66), element 256 (0x78), exact. Block max 954 * 2**-24: 954/448 * 2**-24 rounds to 2**-23,
    954 * 2**-24 / 2**-23 = 477 saturates to 448. The spec takes the exponent from amax itself,
    which is exact in any precision. (bfloat16 has float32's exponent range, so there this
    rounding only matters where D3 already applies.)

Public API: ``encode(w, *, spec=False) -> (words, scales)``, ``decode(words, scales,
dtype=np.float32, *, spec=False) -> ndarray``; constants ``BLOCK``, ``E4M3_MAX``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BLOCK = 32  # values per scale
E4M3_MAX = 448.0  # largest finite E4M3 value, 1.75 * 2**8
E4M3_EMAX = 8  # exponent of E4M3_MAX: "emax_elem" in OCP MX v1.0
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E4M3_NAN = 0x7F

E4M3 = ml_dtypes.float8_e4m3fn
E8M0 = ml_dtypes.float8_e8m0fnu
BF16 = ml_dtypes.bfloat16
F32 = np.float32

INPUT_DTYPES = (np.dtype(F32), np.dtype(BF16), np.dtype(np.float16))

# x86-64 observation for blocks whose max is NaN or inf (difference D4): uint8(float(INT_MIN) + 127)
# evaluated in the input dtype. float32: -2147483648 + 127 rounds to -2147483520 -> low byte 0x80;
# bfloat16 keeps -2**31 (byte 0x00); float16 overflows to -inf (byte 0x00).
_MLX_NONFINITE_SCALE = {np.dtype(F32): 0x80, np.dtype(BF16): 0x00, np.dtype(np.float16): 0x00}


# --- helpers --------------------------------------------------------------------------------


def _blocks(w: np.ndarray) -> np.ndarray:
    """(..., K) -> (n_blocks, 32) in w's own dtype, after checking dtype and K."""
    if w.dtype not in INPUT_DTYPES:
        raise TypeError(f"encode takes float32, bfloat16 or float16, got {w.dtype}")
    if w.ndim == 0:
        raise ValueError("encode needs an array of shape (..., K), got a scalar")
    k = w.shape[-1]
    if k == 0 or k % BLOCK:
        raise ValueError(f"the last axis K={k} must be a positive multiple of {BLOCK}")
    return np.ascontiguousarray(w).reshape(-1, BLOCK)


def _to_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> E4M3 byte: round-to-nearest-even, |x| > 448 saturates to 0x7E, NaN -> 0x7E.

    This is MLX's ToFP8 (mx.to_fp8); the sign bit is copied from x, also for NaN and -0.0.
    """
    x = np.asarray(x, F32)
    sign = np.signbit(x).astype(np.uint8) << 7
    mag = np.abs(x)
    with np.errstate(invalid="ignore", over="ignore"):
        code = np.where(mag > E4M3_MAX, F32(0), mag).astype(E4M3).view(np.uint8)
    code = np.where((mag > E4M3_MAX) | np.isnan(mag), np.uint8(0x7E), code)
    return code | sign


def _ceil_log2(k: np.ndarray) -> np.ndarray:
    """Exact ceil(log2(k)) for finite k > 0 (int64)."""
    mant, exp = np.frexp(k.astype(np.float64))  # k = mant * 2**exp, 0.5 <= mant < 1
    return np.where(mant == 0.5, exp - 1, exp).astype(np.int64)


def _floor_log2(a: np.ndarray) -> np.ndarray:
    """Exact floor(log2(a)) for finite a > 0 (int64)."""
    _, exp = np.frexp(a.astype(np.float64))
    return (exp - 1).astype(np.int64)


def _pack(codes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(n_blocks, 32) uint8 -> uint32 (..., K // 4); byte 4j + i goes to bits 8i .. 8i + 7 of word j."""
    b = codes.reshape(-1, 4).astype(np.uint32)
    words = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)
    return words.reshape(*shape[:-1], shape[-1] // 4)


def _unpack(words: np.ndarray) -> np.ndarray:
    """uint32 (..., K // 4) -> uint8 (..., K), the inverse of _pack."""
    w = np.asarray(words, np.uint32)[..., None]
    b = (w >> np.array([0, 8, 16, 24], np.uint32)) & np.uint32(0xFF)
    return b.astype(np.uint8).reshape(*w.shape[:-2], w.shape[-2] * 4)


# --- encode ---------------------------------------------------------------------------------


def _encode_mlx(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dt = blocks.dtype
    f = blocks.astype(F32)  # exact for all three input dtypes
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(f), axis=-1)  # NaN propagates, as in MLX
    with np.errstate(invalid="ignore", over="ignore"):
        k = (amax / F32(E4M3_MAX)).astype(dt).astype(F32)  # MLX divides in the input dtype (D7)
    finite = np.isfinite(k)
    positive = finite & (k > 0)
    e = np.zeros(k.shape, np.int64)
    e[positive] = _ceil_log2(k[positive])

    # elements: w / 2**e in the input dtype. For finite k, 2**e is exact in float32 (e >= -149) and
    # the quotient is computed in float32 then rounded to dt, which is what MLX's bf16/fp16 ops do.
    pow2 = np.ldexp(F32(1), e).astype(F32)
    pow2[~finite] = 0  # D4: 2**INT_MIN == 0
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        q = f / pow2[:, None]
    q = q.astype(dt)
    if dt == np.dtype(BF16):  # MLX's bfloat16 rounding turns every NaN into +NaN (0x7FC0)
        q = np.where(np.isnan(q), BF16(np.nan), q)
    codes = _to_e4m3(q.astype(F32))

    scales = ((e + E8M0_BIAS) % 256).astype(np.uint8)  # D3: no clamping, wraps modulo 256
    scales[~finite] = _MLX_NONFINITE_SCALE[dt]
    return codes, scales


def _encode_spec(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = blocks.astype(np.float64)
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(f), axis=-1)
    finite = np.isfinite(amax)
    shared = np.full(amax.shape, -E8M0_BIAS, np.int64)  # zero blocks: the minimum exponent (D2)
    nz = finite & (amax > 0)
    shared[nz] = _floor_log2(amax[nz]) - E4M3_EMAX
    shared = np.clip(shared, -E8M0_BIAS, E8M0_BIAS)  # D3: clamp to E8M0's range

    # V / X is exact in float64 and has at most 24 significant bits, so it is exact in float32 too
    # (X >= 2**-127 and |V / X| < 2**9 unless clamped, where it is tiny): one rounding, to E4M3.
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite blocks are overwritten below
        q = (f / np.ldexp(1.0, shared)[:, None]).astype(F32)
    q = np.clip(q, -E4M3_MAX, E4M3_MAX)  # "clamping normal numbers to max"
    codes = _to_e4m3(q)
    scales = (shared + E8M0_BIAS).astype(np.uint8)

    codes[~finite] = E4M3_NAN  # D4: NaN scale, NaN elements
    scales[~finite] = E8M0_NAN
    return codes, scales


def encode(w: np.ndarray, *, spec: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MXFP8-encode w (float32, ml_dtypes.bfloat16 or float16; shape (..., K), K % 32 == 0).

    Returns ``(words, scales)``: uint32 (..., K // 4) and uint8 (..., K // 32), exactly the arrays
    ``mx.quantize(w, group_size=32, bits=8, mode="mxfp8")`` returns (for 1-D input, MLX's answer
    for w[None] with the leading axis dropped). ``spec=True`` follows OCP MX v1.0 instead where
    MLX departs from it (module docstring, D1-D4).
    """
    w = np.asarray(w)
    blocks = _blocks(w)
    codes, scales = _encode_spec(blocks) if spec else _encode_mlx(blocks)
    return _pack(codes, w.shape), scales.reshape(*w.shape[:-1], w.shape[-1] // BLOCK)


# --- decode ---------------------------------------------------------------------------------


def decode(words: np.ndarray, scales: np.ndarray, dtype=np.float32, *, spec: bool = False) -> np.ndarray:
    """Decode (words, scales) to dtype (float32, ml_dtypes.bfloat16 or float16), shape (..., K).

    Default: exactly ``mx.dequantize(wq, scales, group_size=32, bits=8, mode="mxfp8", dtype=...)``
    -- element and 2**(s - 127) each cast to dtype, then multiplied in dtype. Note MLX's own default
    output dtype is bfloat16; pass ``dtype=ml_dtypes.bfloat16`` for that. ``spec=True``: X * P
    rounded once to dtype, and a 0xFF scale makes its whole block NaN (D5, D6).
    """
    dtype = np.dtype(dtype)
    if dtype not in INPUT_DTYPES:
        raise TypeError(f"decode returns float32, bfloat16 or float16, got {dtype}")
    words = np.asarray(words)
    scales = np.asarray(scales)
    if words.dtype != np.uint32 or scales.dtype != np.uint8:
        raise TypeError(f"need uint32 words and uint8 scales, got {words.dtype} and {scales.dtype}")
    if words.ndim == 0 or words.shape[:-1] != scales.shape[:-1] or words.shape[-1] != 8 * scales.shape[-1]:
        raise ValueError(f"words {words.shape} and scales {scales.shape} do not describe blocks of {BLOCK}")

    p = _unpack(words).view(E4M3).astype(F32)  # exact; codes 0x7F / 0xFF are NaN
    s = np.repeat(scales, BLOCK, axis=-1)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        if not spec:
            # MLX: 2**(s - 127) as a plain power, so 0xFF is 2**128 = inf (D5); 2**-127 is exact
            x = np.ldexp(F32(1), s.astype(np.int64) - E8M0_BIAS).astype(F32)
            return p.astype(dtype) * x.astype(dtype)
        # E8M0 proper: 0xFF is NaN, so its block is NaN. X * P is exact in float64 and in float32
        # (<= 4 significant bits, exponent in [-136, 136]; beyond float32's range it overflows in
        # bf16/fp16 too), so the casts round it once.
        v = (p.astype(np.float64) * s.view(E8M0).astype(np.float64)).astype(F32)
        return v.astype(dtype)
