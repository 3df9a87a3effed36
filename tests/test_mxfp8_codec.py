"""reference.mxfp8 (NumPy + ml_dtypes MXFP8 codec) against mlx 0.32.4's mxfp8 quantize/dequantize.

Byte-for-byte equality with MLX on fixed inputs and under Hypothesis; decode == mx.dequantize; the
round-trip error bound and the fixed-point property; one test per MLX-vs-OCP-v1.0 difference (D1-D7
in reference/mxfp8.py's docstring), each showing both behaviours on a concrete input; and
mx.quantized_matmul against a float64 product with the decoded weights.
"""

from __future__ import annotations

import subprocess
import sys

import hypothesis.extra.numpy as nps
import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reference.mxfp8 import BLOCK, _to_e4m3, decode, encode

BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn
F32 = np.float32
E4M3_NAN_CODE = 0x7F
MX_DTYPE = {np.dtype(F32): mx.float32, np.dtype(BF16): mx.bfloat16, np.dtype(np.float16): mx.float16}
SHAPES = [(32,), (4, 64), (3, 5, 96), (64, 6912)]


# --- MLX side -------------------------------------------------------------------------------


def to_numpy(a: mx.array) -> np.ndarray:
    """mx.array -> numpy; bfloat16 goes through float32 (exact) and back to ml_dtypes.bfloat16."""
    if a.dtype == mx.bfloat16:
        return np.array(a.astype(mx.float32)).astype(BF16)
    return np.array(a)


def mlx_input(w32: np.ndarray, dtype) -> mx.array:
    """MLX's input for w32 in dtype, converted by MLX itself (mx.array(...).astype)."""
    return mx.array(np.asarray(w32, F32)).astype(MX_DTYPE[np.dtype(dtype)])


def mlx_encode(a: mx.array) -> tuple[np.ndarray, np.ndarray]:
    """mx.quantize mxfp8; MLX needs ndim >= 2, so 1-D goes through a leading axis of 1."""
    flat = a.ndim == 1
    out = mx.quantize(a[None] if flat else a, group_size=BLOCK, bits=8, mode="mxfp8")
    assert len(out) == 2, "mxfp8 quantize returns (wq, scales), no biases"
    wq, s = (np.array(x) for x in out)
    assert wq.dtype == np.uint32 and s.dtype == np.uint8
    return (wq[0], s[0]) if flat else (wq, s)


def mlx_decode(words: np.ndarray, scales: np.ndarray, dtype=None) -> np.ndarray:
    flat = words.ndim == 1
    w, s = (words[None], scales[None]) if flat else (words, scales)
    kw = {} if dtype is None else {"dtype": MX_DTYPE[np.dtype(dtype)]}
    out = to_numpy(mx.dequantize(mx.array(w), mx.array(s), group_size=BLOCK, bits=8, mode="mxfp8", **kw))
    return out[0] if flat else out


def assert_same_as_mlx(w32: np.ndarray, dtype=F32) -> tuple[np.ndarray, np.ndarray]:
    """encode(w32 in dtype) == mx.quantize(the same values in dtype), words and scales."""
    a = mlx_input(w32, dtype)
    ours_in = np.asarray(w32, F32).astype(dtype)
    # the two libraries' float32 -> bf16/fp16 conversions agree (both round to nearest even)
    np.testing.assert_array_equal(to_numpy(a).astype(F32), ours_in.astype(F32))
    wq, s = mlx_encode(a)
    words, scales = encode(ours_in)
    np.testing.assert_array_equal(words, wq, err_msg="element words differ from mx.quantize")
    np.testing.assert_array_equal(scales, s, err_msg="scale bytes differ from mx.quantize")
    return words, scales


def f32(x: float) -> float:
    """x rounded to float32, as a Python float (Hypothesis wants bounds it can represent exactly)."""
    return float(F32(x))


def assert_same_values(ours: np.ndarray, theirs: np.ndarray, msg: str = "") -> None:
    """Equal dtype, shape and values, NaN matching NaN (bf16 compared through float32, exactly)."""
    assert ours.dtype == theirs.dtype, f"dtype {ours.dtype} vs {theirs.dtype}"
    np.testing.assert_array_equal(ours.astype(F32), theirs.astype(F32), err_msg=msg)


def one_block(*values, fill=0.0, dtype=F32) -> np.ndarray:
    """A (1, 32) block starting with values, the rest fill."""
    b = np.full((1, BLOCK), fill, F32)
    b[0, : len(values)] = values
    return b.astype(dtype)


def element_codes(words: np.ndarray) -> np.ndarray:
    """uint32 words -> the E4M3 bytes, element order (little-endian byte order within a word)."""
    return np.ascontiguousarray(words).astype("<u4").view(np.uint8).reshape(*words.shape[:-1], -1)


# --- byte-for-byte against MLX --------------------------------------------------------------

RNG = np.random.default_rng(20240601)


def _normal(shape):
    return RNG.standard_normal(shape).astype(F32)


def _student_t(shape):
    return RNG.standard_t(2, shape).astype(F32)


def _zeros(shape):
    return np.zeros(shape, F32)


def _near_subnormal(shape):
    # block max 1 -> X = 2**-8; E4M3 subnormals are multiples of 2**-9 * X = 2**-17, so values around
    # 2**-17 .. 2**-14 (incl. exact halfway points) land in and near the subnormal binade
    w = (RNG.integers(-16, 17, shape) * 2.0**-18 + RNG.standard_normal(shape) * 2.0**-20).astype(F32)
    w.reshape(-1, BLOCK)[:, 0] = 1.0
    return w


def _around_448(shape):
    vals = np.array([448, -448, 447, 449, 464, -465, 479.9, 480, 500, -512, 896, 1e4, 4.4e2], F32)
    return RNG.choice(vals, shape) * RNG.choice(np.array([1, 2.0**-20, 2.0**20], F32), shape[:-1] + (1,))


def _huge_and_tiny(shape):
    w = RNG.standard_normal(shape).astype(F32) * 1e-6
    w.reshape(-1, BLOCK)[:, ::7] = 3e4 * RNG.choice([-1, 1], w.reshape(-1, BLOCK)[:, ::7].shape)
    return w


GENERATORS = {
    "normal": _normal,
    "student_t_df2": _student_t,
    "zeros": _zeros,
    "near_e4m3_subnormals": _near_subnormal,
    "at_and_beyond_448": _around_448,
    "huge_and_tiny_mixed": _huge_and_tiny,
}


@pytest.mark.parametrize("dtype", [F32, BF16, np.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("kind", list(GENERATORS))
def test_encode_matches_mlx_byte_for_byte(kind, shape, dtype):
    if dtype is np.float16 and kind in ("student_t_df2", "huge_and_tiny_mixed", "at_and_beyond_448"):
        w = np.clip(GENERATORS[kind](shape), -6e4, 6e4)  # stay finite in float16
    else:
        w = GENERATORS[kind](shape)
    words, scales = assert_same_as_mlx(w, dtype)
    assert words.shape == shape[:-1] + (shape[-1] // 4,) and scales.shape == shape[:-1] + (shape[-1] // 32,)


@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bf16", "fp16"])
def test_every_16_bit_value_as_block_max_matches_mlx(dtype):
    """Every finite bf16/fp16 value (incl. subnormals, zero, -0) as a block maximum, with random
    smaller companions: covers the scale rounding of amax / 448 in the input dtype exhaustively."""
    vals = np.arange(2**16, dtype=np.uint16).view(dtype)
    vals = vals[np.isfinite(vals.astype(F32))].astype(F32)
    companions = RNG.uniform(-1, 1, (vals.size, BLOCK - 1)) * np.abs(vals)[:, None]
    assert_same_as_mlx(np.concatenate([vals[:, None], companions.astype(F32)], axis=1), dtype)


def test_float32_scale_boundaries_match_mlx():
    """Block maxima at, just below and just above 448 * 2**k for every k a float32 can hold,
    including the subnormal range and the tiny blocks of D3."""
    base = np.ldexp(F32(448), np.arange(-157, 119)).astype(F32)
    base = base[base > 0]
    maxima = np.concatenate([np.nextafter(base, F32(0)), base, np.nextafter(base, F32(np.inf))])
    companions = RNG.uniform(-1, 1, (maxima.size, BLOCK - 1)) * maxima[:, None]
    assert_same_as_mlx(np.concatenate([maxima[:, None], companions.astype(F32)], axis=1))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_torch_roundtrip_at_every_e4m3_rounding_boundary(dtype):
    """Every E4M3 value, every midpoint between neighbours (ties to even) and the float32 values
    next to each, both signs, in blocks whose maximum 448 makes the scale 2**0: the quotients
    themselves are rounded, subnormal steps included."""
    codes = np.arange(0x7F, dtype=np.uint8).view(E4M3).astype(F32)  # 0 ... 448, no NaN
    mid = ((codes[:-1].astype(np.float64) + codes[1:]) / 2).astype(F32)  # exact in float32
    points = np.concatenate([codes, mid, np.nextafter(mid, F32(0)), np.nextafter(mid, F32(np.inf)),
                             np.nextafter(codes, F32(0)), np.nextafter(codes, F32(np.inf))])
    points = np.concatenate([points, -points, [F32(2.0**-149), F32(-0.0)]])
    points = np.concatenate([points, np.zeros(-points.size % (BLOCK - 1), F32)]).reshape(-1, BLOCK - 1)
    w = np.concatenate([np.full((points.shape[0], 1), 448, F32), points], axis=1)
    assert_torch_roundtrip_is_the_codecs(w, dtype)


@settings(deadline=None)
@given(nps.arrays(np.uint32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96])),
                  elements=st.integers(0, 2**32 - 1)))
def test_any_float32_bit_pattern_matches_mlx(bits):
    """Arbitrary float32 bit patterns (NaN, inf, subnormals, huge) byte for byte."""
    assert_same_as_mlx(bits.view(F32))


@settings(deadline=None)
@given(nps.arrays(F32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64])),
                  elements=st.floats(-f32(3e38), f32(3e38), width=32)),
       st.sampled_from([F32, BF16, np.float16]))
def test_any_finite_values_match_mlx(w, dtype):
    if dtype is np.float16:
        w = np.clip(w, -65504, 65504)
    assert_same_as_mlx(w, dtype)


# --- decode == mx.dequantize ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16, np.float16], ids=["fp32", "bf16", "fp16"])
def test_decode_matches_mx_dequantize_for_every_scale_and_code(dtype):
    """All 256 element codes under all 256 scale bytes (incl. 0x00, 0xFF and NaN codes)."""
    codes = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # row r: every code, scale byte r
    words = codes.reshape(256, 64, 4).astype(np.uint32)
    words = words[..., 0] | words[..., 1] << 8 | words[..., 2] << 16 | words[..., 3] << 24
    scales = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 8, axis=1)
    assert_same_values(decode(words, scales, dtype), mlx_decode(words, scales, dtype))


def test_mx_dequantize_default_dtype_is_bfloat16():
    words, scales = encode(_normal((4, 64)))
    out = mx.dequantize(mx.array(words), mx.array(scales), group_size=32, bits=8, mode="mxfp8")
    assert out.dtype == mx.bfloat16, "MLX's default output dtype for mxfp8 (even for float32 input)"
    assert_same_values(decode(words, scales, BF16), to_numpy(out))


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("dtype", [F32, BF16, np.float16], ids=["fp32", "bf16", "fp16"])
def test_decode_of_mlx_output_matches_mx_dequantize(shape, dtype):
    wq, s = mlx_encode(mx.array(_student_t(shape)))
    out = decode(wq, s, dtype)
    assert out.shape == shape and out.dtype == np.dtype(dtype)
    assert_same_values(out, mlx_decode(wq, s, dtype))


# --- round trip and fixed point -------------------------------------------------------------


def e4m3_half_step(q: np.ndarray) -> np.ndarray:
    """Half the E4M3 spacing in the binade of q (q measured in units of the block scale X).

    E4M3 has 3 fraction bits: in the binade [2**b, 2**(b+1)), b >= -6, neighbours are 2**(b-3)
    apart; below 2**-6 (subnormals, and the gap to zero) they are 2**-9 apart. So the half step is
    2**(max(floor(log2|q|), -6) - 4), and 2**-10 for q == 0. Round-to-nearest-even never moves a
    value by more than this, including upward across a binade edge (the lower binade's step
    applies) -- as long as |q| <= 448. Above 448 the element saturates to 448 and the error is
    |q| - 448 (which is within the half step 16 up to 464, and exceeds it beyond).
    """
    q = np.abs(np.asarray(q, np.float64))
    _, exp = np.frexp(np.where(q > 0, np.minimum(q, 448.0), 1.0))
    b = np.where(q > 0, np.maximum(exp - 1, -6), -6)
    return np.ldexp(1.0, b - 4)


def round_trip_bound(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """|decode(encode(w)) - w| <= X * max(half_step(w / X), |w / X| - 448), X = 2**(byte - 127)."""
    x = np.repeat(np.ldexp(1.0, scales.astype(np.int64) - 127), BLOCK, axis=-1)
    q = np.asarray(w, np.float64) / x
    return x * np.maximum(e4m3_half_step(q), np.abs(q) - 448.0)


# magnitudes 0 or [1e-30, 1e30]: every block max is far above D3's 448 * 2**-128 ~ 1.3e-36, so the
# scale byte is the true exponent (MLX's wrap-around of D3 is tested on its own below)
SIGNED_MAGNITUDES = st.one_of(
    st.just(0.0),
    st.floats(f32(1e-30), f32(1e30), width=32),
    st.floats(-f32(1e30), -f32(1e-30), width=32),
)
BLOCKS = nps.arrays(F32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64])), elements=SIGNED_MAGNITUDES)


@settings(deadline=None)
@given(BLOCKS, st.sampled_from([F32, BF16, np.float16]), st.booleans())
@example(one_block(480.0, 470.0, 3 * 2.0**-10, -(2.0**-10)), F32, True)  # saturation, subnormal ties
@example(one_block(954 * 2.0**-24, 1e-5), np.float16, False)  # D7: MLX saturates 477 to 448
def test_round_trip_is_within_half_an_e4m3_step(w, dtype, spec):
    if dtype is np.float16:
        w = np.clip(w, -6e4, 6e4)
    w = w.astype(dtype)
    words, scales = encode(w, spec=spec)
    err = np.abs(decode(words, scales).astype(np.float64) - w.astype(np.float64))
    bound = round_trip_bound(w.astype(np.float64), scales)
    assert np.all(err <= bound), f"round-trip error {err.max()} above the half-step bound"
    if not spec and dtype is not np.float16:
        # MLX's scale rounds up (D1), so no element saturates: the plain half step suffices
        x = np.repeat(np.ldexp(1.0, scales.astype(np.int64) - 127), BLOCK, axis=-1)
        assert np.all(np.abs(w.astype(np.float64)) / x <= 448)


@settings(deadline=None)
@given(BLOCKS, st.sampled_from([F32, BF16, np.float16]))
@example(one_block(225.0, -3.0, 1e-3), F32)  # largest element 224: MLX's re-encoding differs
@example(one_block(954 * 2.0**-24, 1e-5), np.float16)  # D7: the float16 scale rounds down, 477 saturates
@example(one_block(2.0**-17), np.float16)  # D7: the float16 scale underflows, the block is zeros
def test_encode_decode_is_a_fixed_point(w, dtype):
    """encode(decode(q)) == q for q = encode(w). With spec=True always; with MLX's rule except for
    blocks whose largest element is 224 (code 0x76/0xF6): their re-encoding halves the scale and
    doubles every element (D1's consequence), which decodes to the same values."""
    if dtype is np.float16:
        w = np.clip(w, -6e4, 6e4)
    w = w.astype(dtype)

    q_spec = encode(w, spec=True)
    again = encode(decode(*q_spec), spec=True)
    np.testing.assert_array_equal(again[0], q_spec[0])
    np.testing.assert_array_equal(again[1], q_spec[1])

    words, scales = encode(w)
    values = decode(words, scales)
    words2, scales2 = encode(values)
    pmax = np.abs(element_codes(words).view(E4M3).astype(F32).reshape(-1, BLOCK)).max(-1)
    at_224 = (pmax == 224).reshape(scales.shape)
    np.testing.assert_array_equal(scales2[~at_224], scales[~at_224])
    np.testing.assert_array_equal(scales2[at_224], scales[at_224] - 1)
    codes, codes2 = element_codes(words), element_codes(words2)
    keep = np.repeat(~at_224, BLOCK, axis=-1)
    np.testing.assert_array_equal(codes2[keep], codes[keep])
    np.testing.assert_array_equal(decode(words2, scales2), values)


# --- one test per MLX-vs-OCP-v1.0 difference ------------------------------------------------


def test_D1_scale_rounds_amax_over_448_up_instead_of_floor_log2_amax_minus_8():
    w = one_block(449.0, 1.0)
    words, scales = assert_same_as_mlx(w)
    assert scales[0, 0] == 0x80 and element_codes(words)[0, 0] == 0x76, (
        "D1 (MLX): X = 2**ceil(log2(449 / 448)) = 2, 449 / 2 -> 224 (0x76)")
    s_words, s_scales = encode(w, spec=True)
    assert s_scales[0, 0] == 0x7F and element_codes(s_words)[0, 0] == 0x7E, (
        "D1 (spec): X = 2**(floor(log2 449) - 8) = 1, 449 saturates to 448 (0x7E)")
    # the two rules agree up to a block max of 1.75 * 2**p, and differ for significands in (1.75, 2)
    for amax, same in [(448.0, True), (1.75 * 2.0**-30, True), (1.76 * 2.0**-30, False), (1.99 * 2.0**5, False)]:
        agree = encode(one_block(amax))[1][0, 0] == encode(one_block(amax), spec=True)[1][0, 0]
        assert agree == same, f"D1: scale choice for block max {amax}"


def test_D1_consequence_mlx_requantizing_its_own_output_changes_bytes():
    w = one_block(225.0, -3.0)
    wq, s = mlx_encode(mx.array(w))
    assert s[0, 0] == 0x7F and element_codes(wq)[0, 0] == 0x76  # X = 1, 225 -> 224
    back = mx.dequantize(mx.array(wq), mx.array(s), group_size=32, bits=8, mode="mxfp8", dtype=mx.float32)
    wq2, s2 = mlx_encode(back)
    assert s2[0, 0] == 0x7E and element_codes(wq2)[0, 0] == 0x7E, (
        "D1: MLX re-quantizes 224 * 1 as 448 * 2**-1 -- a different byte pair for the same value")
    np.testing.assert_array_equal(encode(decode(wq, s))[1], s2)
    spec = encode(w, spec=True)  # floor(log2 225) - 8 = -1: X = 2**-1, 225 / X = 450 saturates to 448
    assert spec[1][0, 0] == 0x7E and element_codes(spec[0])[0, 0] == 0x7E
    again = encode(decode(*spec), spec=True)
    np.testing.assert_array_equal(again[1], spec[1], err_msg="D1: the spec rule is a fixed point")


def test_D2_all_zero_block_scale_is_one_in_mlx_but_minimum_exponent_in_spec():
    w = np.zeros((1, 32), F32)
    words, scales = assert_same_as_mlx(w)
    assert scales[0, 0] == 0x7F, "D2 (MLX): an all-zero block gets X = 1 (0x7F)"
    s_words, s_scales = encode(w, spec=True)
    assert s_scales[0, 0] == 0x00, "D2 (spec/reference): log2(0) -> the minimum exponent, X = 2**-127 (0x00)"
    assert not words.any() and not s_words.any()
    np.testing.assert_array_equal(decode(s_words, s_scales), w)


def test_D3_tiny_blocks_wrap_the_scale_exponent_instead_of_clamping_to_minus_127():
    w = one_block(F32(1e-40), F32(3e-41))  # float32 subnormals
    words, scales = assert_same_as_mlx(w)
    assert scales[0, 0] == 242, "D3 (MLX): e = ceil(log2(1e-40 / 448)) = -141 is stored as (-141 + 127) % 256"
    assert element_codes(words)[0, 0] == 0x79, "D3 (MLX): the element is still 1e-40 / 2**-141 -> 288"
    mlx_values = mlx_decode(words, scales, F32)
    assert mlx_values[0, 0] == 288 * 2.0**115, "D3 (MLX): dequantizes 1e-40 to 288 * 2**115"

    s_words, s_scales = encode(w, spec=True)
    assert s_scales[0, 0] == 0x00, "D3 (spec/reference): shared exponent clamped to -127"
    assert element_codes(s_words)[0, 0] == 0x09, "D3 (spec): 1e-40 / 2**-127 ~ 0.0170 -> 0.017578125 (0x09)"
    assert abs(decode(s_words, s_scales)[0, 0] - F32(1e-40)) <= 2.0**-10 * 2.0**-127

    w = one_block(2.0**-120)  # ceil(log2(2**-120 / 448)) = -128 -> byte 0xFF, E8M0's NaN
    words, scales = assert_same_as_mlx(w)
    assert scales[0, 0] == 0xFF and np.isinf(mlx_decode(words, scales, F32)[0, 0]), (
        "D3 (MLX): exponent -128 becomes the NaN scale 0xFF and dequantizes to inf")
    assert encode(w, spec=True)[1][0, 0] == 0x00


@pytest.mark.parametrize(
    "dtype,scale_byte,zero_code",
    [(F32, 0x80, 0xFE), (BF16, 0x00, 0x7E), (np.float16, 0x00, 0xFE)],
    ids=["fp32", "bf16", "fp16"],
)
def test_D4_nan_and_inf_blocks_become_finite_448s_in_mlx_but_nan_in_spec(dtype, scale_byte, zero_code):
    """The scale byte and the sign of 0/0 are x86-64 artefacts (see the module docstring)."""
    for first in (np.nan, np.inf, -np.inf):
        w = one_block(first, 1.0, -2.0, dtype=dtype)
        words, scales = assert_same_as_mlx(w, dtype)
        codes = element_codes(words)[0]
        assert scales[0, 0] == scale_byte, f"D4 (MLX): block with {first} gets scale byte {scales[0, 0]:#x}"
        assert codes[1] == 0x7E and codes[2] == 0xFE, "D4 (MLX): finite elements become +-inf -> +-448"
        assert codes[3] == zero_code, "D4 (MLX): zeros become 0/0 = NaN -> 448 with the default NaN's sign"
        assert E4M3_NAN_CODE not in codes & 0x7F, "D4 (MLX): no element is ever the E4M3 NaN"
        if dtype is F32:
            values = mlx_decode(words, scales, F32)[0]
            assert np.all(np.isfinite(values)) and values[1] == 896, "D4 (MLX): the block dequantizes finite"

        s_words, s_scales = encode(w, spec=True)
        assert s_scales[0, 0] == 0xFF, "D4 (spec/reference): non-finite block maximum -> NaN scale 0xFF"
        assert np.all(np.isnan(decode(s_words, s_scales, spec=True))), "D4 (spec): the whole block is NaN"



def test_D5_scale_0xff_decodes_to_inf_in_mlx_but_nan_in_spec():
    codes = np.zeros(32, np.uint8)
    codes[:3] = [0x38, 0x00, 0x30]  # 1.0, 0.0, 0.5
    words = codes.reshape(8, 4).astype(np.uint32)
    words = (words[:, 0] | words[:, 1] << 8 | words[:, 2] << 16 | words[:, 3] << 24)[None]
    scales = np.array([[0xFF]], np.uint8)
    mlx_values = mlx_decode(words, scales, F32)[0]
    np.testing.assert_array_equal(decode(words, scales)[0], mlx_values)
    assert mlx_values[0] == np.inf and np.isnan(mlx_values[1]) and mlx_values[2] == np.inf, (
        "D5 (MLX): 0xFF is evaluated as 2**128 = inf")
    assert np.all(np.isnan(decode(words, scales, spec=True))), "D5 (spec): E8M0 0xFF is NaN, the block is NaN"


def test_D6_float16_dequantize_overflows_or_flushes_the_scale_before_multiplying():
    codes = np.zeros((2, 32), np.uint8)
    codes[0, :2] = [0x01, 0x00]  # 2**-9, 0  with scale 2**16: true values 128, 0
    codes[1, 0] = 0x78  # 256         with scale 2**-30: true value 2**-22 (a float16 subnormal)
    words = codes.reshape(2, 8, 4).astype(np.uint32)
    words = words[..., 0] | words[..., 1] << 8 | words[..., 2] << 16 | words[..., 3] << 24
    scales = np.array([[127 + 16], [127 - 30]], np.uint8)
    mlx_values = mlx_decode(words, scales, np.float16)
    assert_same_values(decode(words, scales, np.float16), mlx_values)
    assert mlx_values[0, 0] == np.inf and np.isnan(mlx_values[0, 1]) and mlx_values[1, 0] == 0, (
        "D6 (MLX): 2**16 is inf and 2**-30 is 0 in float16, before the multiply")
    spec = decode(words, scales, np.float16, spec=True)
    assert spec[0, 0] == 128 and spec[0, 1] == 0 and spec[1, 0] == np.float16(2.0**-22), (
        "D6 (spec): X * P rounded once to float16")
    # float32 and bfloat16 outputs hold every scale but 2**128: there MLX is X * P rounded once
    for dtype in (F32, BF16):
        assert_same_values(decode(words, scales, dtype), decode(words, scales, dtype, spec=True))


def test_D7_float16_input_amax_over_448_underflows_to_zero_and_the_block_to_zeros():
    w = one_block(2.0**-17, -(2.0**-18), 3 * 2.0**-20, dtype=np.float16)
    words, scales = assert_same_as_mlx(w, np.float16)
    assert scales[0, 0] == 0x7F and not np.any(decode(words, scales)), (
        "D7 (MLX): 2**-17 / 448 rounds to 0 in float16, so X = 1 and every element rounds to 0")
    s_words, s_scales = encode(w, spec=True)
    assert s_scales[0, 0] == 127 - 25 and element_codes(s_words)[0, 0] == 0x78, (
        "D7 (spec): X = 2**(floor(log2 2**-17) - 8) = 2**-25, element 256 (0x78)")
    np.testing.assert_array_equal(decode(s_words, s_scales), w.astype(F32))
    # the same values in float32 are quantized exactly by MLX too (the loss is the float16 division)
    words32, scales32 = assert_same_as_mlx(w.astype(F32))
    np.testing.assert_array_equal(decode(words32, scales32), w.astype(F32))


# --- element conversion: where MLX and the spec agree ---------------------------------------


def test_element_conversion_equals_mx_to_fp8():
    """The codec's float -> E4M3 step (ml_dtypes RNE cast + saturation + NaN -> +-448) against
    MLX's own converter on every float16 value and a million float32 bit patterns."""
    every_f16 = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(F32)
    f32_bits = np.random.default_rng(3).integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32)
    for x in (every_f16, f32_bits.view(F32), np.linspace(-500, 500, 200_001, dtype=F32)):
        np.testing.assert_array_equal(_to_e4m3(x), np.array(mx.to_fp8(mx.array(x))))


def test_element_rounding_is_nearest_even_with_saturation_in_both():
    """Halfway cases in the normal and subnormal binades, and saturation, at X = 1 (block max 448)."""
    vals = [448, 9.5, 10.5, -11.5, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10, 0.0, -0.0, 2.0**-6 - 2.0**-11]
    want = [0x7E, 0x52, 0x52, 0xD4, 0x00, 0x02, 0x02, 0x00, 0x80, 0x08]
    w = one_block(*vals)
    for spec in (False, True):
        words, scales = encode(w, spec=spec)
        assert scales[0, 0] == 0x7F
        np.testing.assert_array_equal(element_codes(words)[0, : len(vals)], want)
    assert_same_as_mlx(w)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 16, 48, 100])
def test_k_not_a_multiple_of_32_is_refused(k):
    with pytest.raises(ValueError, match=f"K={k}"):
        encode(np.zeros((2, k), F32))


def test_unsupported_dtype_and_bad_decode_shapes_are_refused():
    with pytest.raises(TypeError):
        encode(np.zeros((1, 32), np.float64))
    with pytest.raises(ValueError):
        decode(np.zeros((1, 8), np.uint32), np.zeros((1, 2), np.uint8))


def test_the_codec_does_not_import_mlx():
    code = "import sys, reference.mxfp8; print('mlx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- quantized_matmul -----------------------------------------------------------------------


@pytest.mark.parametrize("m,n,k", [(4, 64, 6912), (7, 128, 64)], ids=["vision_6912", "decoder_64"])
def test_quantized_matmul_matches_float64_product_of_decoded_weights(m, n, k):
    """mx.quantized_matmul(x, wq, scales, transpose=True, mode="mxfp8") vs x @ decode(wq, scales).T in
    float64, float32 x.

    Tolerance. The decoded weights X * P are exact in float32, so the float64 product is the exact
    answer up to 2**-53 and the whole difference is MLX's float32 arithmetic. MLX's CPU kernel
    (fp_qmm_t_simd in mlx/backend/cpu/quantized.cpp) keeps 8 float32 lanes; per 32-block each lane
    adds 4 products x*P into a block accumulator, then adds X * (block accumulator) -- exact, X is a
    power of two -- into a running lane sum, and finally sums the 8 lanes. Each term x_i w_i thus
    passes through at most 1 (product) + 3 (block) + K/32 (running) + 7 (lanes) = K/32 + 11 float32
    roundings, and the standard error analysis of summation (Higham, Accuracy and Stability of
    Numerical Algorithms, section 4.2) gives
        |out - exact| <= gamma_n * sum_i |x_i| |w_i|,  gamma_n = n u / (1 - n u),  u = 2**-24,
    with n = K/32 + 11: 227 u = 1.4e-5 relative for K = 6912, 13 u = 7.7e-7 for K = 64. (For any
    summation order, n = K + 1 would do.) Measured on this machine (seed below): largest
    |err| / sum|x||w| = 0.32 u at K = 6912 (max |err| 1.7e-6, outputs up to 4.7) and 2.2 u at
    K = 64 (max |err| 1.2e-7, outputs up to 0.43) -- the bound is far from tight, as rounding errors
    mostly cancel, but it is a guarantee, not a fitted number.
    """
    rng = np.random.default_rng(7)
    x = rng.standard_normal((m, k)).astype(F32)
    w = (rng.standard_normal((n, k)) * 0.02).astype(F32)
    wq, scales = assert_same_as_mlx(w)
    out = mx.quantized_matmul(mx.array(x), mx.array(wq), mx.array(scales), transpose=True,
                              group_size=32, bits=8, mode="mxfp8")
    assert out.dtype == mx.float32 and out.shape == (m, n)
    w_dec = decode(wq, scales).astype(np.float64)
    exact = x.astype(np.float64) @ w_dec.T
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w_dec).T
    u = 2.0**-24
    steps = k // 32 + 11
    gamma = steps * u / (1 - steps * u)
    err = np.abs(np.array(out).astype(np.float64) - exact)
    assert np.all(err <= gamma * magnitude), (
        f"max |err| / sum|x||w| = {(err / magnitude).max() / u:.2f} u, bound {steps} u")


# --- reference.mxfp8_torch: the same round trip, computed by torch ---------------------------


def assert_torch_roundtrip_is_the_codecs(w32: np.ndarray, dtype=F32) -> None:
    """reference.mxfp8_torch.roundtrip gives decode(*encode(w)) bit for bit (NaN payloads included)."""
    import torch

    from reference.mxfp8_torch import roundtrip

    w = w32.astype(dtype)
    t = torch.from_numpy(w32.copy())
    ours = roundtrip(t.to(torch.bfloat16) if dtype is BF16 else t).numpy()
    theirs = np.asarray(decode(*encode(w)), F32)
    assert ours.shape == theirs.shape
    differ = ours.view(np.uint32) != theirs.view(np.uint32)
    assert not differ.any(), (w.reshape(-1)[differ.reshape(-1)][:8], ours[differ][:8], theirs[differ][:8])
    if dtype is F32:  # in place (out=w): the same bits, the blocks MLX's arithmetic takes included
        inplace = t.clone()
        assert roundtrip(inplace, out=inplace) is inplace
        np.testing.assert_array_equal(inplace.numpy().view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(GENERATORS))
def test_torch_roundtrip_equals_the_codec(kind, dtype):
    assert_torch_roundtrip_is_the_codecs(GENERATORS[kind]((64, 6912)), dtype)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_torch_roundtrip_at_every_scale_boundary(dtype):
    """Block maxima around 448 * 2**k for every k a float32 holds (the tiny, wrapping scales of D3
    included), companions down to the subnormal quotients, and NaN / inf blocks (D4)."""
    base = np.ldexp(F32(448), np.arange(-157, 119)).astype(F32)
    base = base[base > 0]
    maxima = np.concatenate([np.nextafter(base, F32(0)), base, np.nextafter(base, F32(np.inf))])
    companions = RNG.uniform(-1, 1, (maxima.size, BLOCK - 1)) * maxima[:, None] * 2.0 ** RNG.integers(
        -160, 1, (maxima.size, 1))
    w = np.concatenate([maxima[:, None], companions.astype(F32)], axis=1)
    w[::97, 3] = np.nan
    w[1::89, 5] = -np.inf
    assert_torch_roundtrip_is_the_codecs(w, dtype)


@settings(deadline=None)
@given(nps.arrays(np.uint32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96])),
                  elements=st.integers(0, 2**32 - 1)),
       st.sampled_from([F32, BF16]))
def test_torch_roundtrip_of_any_bit_pattern(bits, dtype):
    assert_torch_roundtrip_is_the_codecs(bits.view(F32), dtype)


def test_torch_roundtrip_refuses_what_the_codec_refuses():
    import torch

    from reference.mxfp8_torch import roundtrip

    with pytest.raises(TypeError, match="float16"):
        roundtrip(torch.zeros(2, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="multiple of 32"):
        roundtrip(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        roundtrip(torch.zeros(2, 32), out=torch.zeros(2, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        roundtrip(torch.zeros(2, 64), out=torch.zeros(64, 2).T)
