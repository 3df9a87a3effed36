"""rmlx.nn.mxcodec (MXFP8 quantization in C, rmlx/_mxfp8.c) against mx.quantize, byte for byte: random,
edge and Hypothesis-drawn float32 / bfloat16 weights, every bf16 value as a block maximum, weights split
over threads; the blocks it leaves to MLX; and its check in a run (parity.kernels), which a codec
differing from MLX's in one row fails."""

import json
import sys

import rmlx  # noqa: F401  (before mlx: the BLAS)

# isort: split
import hypothesis.extra.numpy as nps
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.cli import main
from parity.defects import patched
from parity.kernels import KernelCheck
from rmlx.nn import kernels, mxcodec
from tests.conftest import FIXTURES

RNG = np.random.default_rng(20261208)
F32 = np.float32
TINY = FIXTURES / "models" / "tiny"


def _mlx(w: mx.array) -> tuple[np.ndarray, np.ndarray]:
    q, s = mx.quantize(w, group_size=32, bits=8, mode="mxfp8")
    return np.array(q), np.array(s)


def assert_same_as_mlx(w32: np.ndarray, dtype=mx.float32) -> None:
    w = mx.array(w32).astype(dtype)
    fast = mxcodec.quantize(w)
    assert fast is not None, "the C loops should take this weight"
    q, s = (np.array(a) for a in fast)
    mq, ms = _mlx(w)
    assert q.dtype == mq.dtype == np.uint32 and s.dtype == ms.dtype == np.uint8
    assert q.shape == mq.shape and s.shape == ms.shape
    bad = np.argwhere(q != mq)
    assert bad.size == 0, ("element words differ", bad[:4], q[tuple(bad[0])], mq[tuple(bad[0])])
    np.testing.assert_array_equal(s, ms, err_msg="scale bytes differ from mx.quantize")


def test_the_loops_are_built_and_run_here():
    # the extension is optional for an install without a C compiler; CI and this machine have one
    assert mxcodec.built(), "rmlx._mxfp8 is not built: python -m pip install -e . compiles it (setup.py)"
    assert mxcodec.enabled() == (sys.platform == "linux")


WEIGHTS = {
    "normal": lambda shape: RNG.standard_normal(shape).astype(F32) * 0.02,
    "student_t_df2": lambda shape: RNG.standard_t(2, shape).astype(F32),
    "zeros_and_signed_zeros": lambda shape: np.where(RNG.random(shape) < 0.5, F32(0), F32(-0.0)),
    # block max 1: E4M3 subnormals of the block are multiples of 2**-17
    "near_e4m3_subnormals": lambda shape: np.concatenate(
        [np.ones(shape[:-1] + (1,), F32),
         (RNG.integers(-16, 17, shape[:-1] + (shape[-1] - 1,)) * 2.0**-18).astype(F32)], axis=-1),
    # block maxima where amax / 448 rounds onto or just off a power of two (elements saturate at 448)
    "scale_boundaries": lambda shape: (np.ldexp(F32(448), RNG.integers(-120, 110, shape[:-1] + (1,)))
                                       * RNG.choice(np.array([1, 1 + 2**-23, 1 - 2**-24, 1.75, 0.5], F32),
                                                    shape)).astype(F32),
    "huge_and_tiny": lambda shape: np.where(RNG.random(shape) < 0.1, F32(3e4), F32(1e-7)) * RNG.choice(
        np.array([-1, 1], F32), shape),
}


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(WEIGHTS))
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (64, 6912), (2, 3, 64)])
def test_quantize_matches_mlx_byte_for_byte(kind, shape, dtype):
    assert_same_as_mlx(WEIGHTS[kind](shape), dtype)


def test_every_bf16_value_as_a_block_maximum():
    """Every finite bf16 value (subnormals, zeros) as a block's maximum with smaller companions: the
    rounding of amax / 448 to bf16 and the scale exponent, exhaustively (tiny ones go to MLX)."""
    vals = np.arange(2**16, dtype=np.uint32) << 16
    vals = vals.view(F32)
    vals = vals[np.isfinite(vals)]
    w = np.concatenate([vals[:, None], (RNG.uniform(-1, 1, (vals.size, 31)) * np.abs(vals)[:, None]).astype(F32)],
                       axis=1)
    k = np.abs(vals) / 448
    kept = k > 2.0**-128 * 1.1  # e >= -127 in either precision (bf16 rounds k coarsely there): the C loops
    assert_same_as_mlx(w[kept], mx.bfloat16)
    assert_same_as_mlx(w[kept], mx.float32)
    for row in w[~kept & (k > 2.0**-130)]:  # around the threshold, one block at a time: MLX's bytes or MLX's
        for dtype in (mx.float32, mx.bfloat16):
            block = mx.array(row[None]).astype(dtype)
            fast = mxcodec.quantize(block)
            if fast is not None:
                assert all(np.array_equal(np.array(a), b) for a, b in zip(fast, _mlx(block), strict=True)), row[0]
    assert all(mxcodec.quantize(mx.array(row[None])) is None for row in w[(k > 0) & (k < 2.0**-129)])  # MLX's


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_views_of_a_weight(dtype):
    """Row slices (an offset into the buffer), column slices, strided rows and a transpose: the bytes of
    the values the view shows."""
    big = mx.array(RNG.standard_normal((6, 96)).astype(F32)).astype(dtype)
    for w in (big[2:5], big[:, 32:], big[::2], mx.array(RNG.standard_normal((96, 64)).astype(F32)).astype(dtype).T):
        fast = mxcodec.quantize(w)
        assert fast is not None and all(np.array_equal(np.array(a), b) for a, b in zip(fast, _mlx(w), strict=True))


def test_a_weight_split_over_threads():
    """Large enough for every thread the loops use: the ranges meet exactly (no block twice or never)."""
    shape = (mxcodec._PER_THREAD * 8 * 32 // 4096 + 3, 4096)  # 8 threads' worth and a ragged end
    w = RNG.standard_normal(shape).astype(F32)
    w[::97] *= 2.0**40
    assert_same_as_mlx(w)


@settings(deadline=None, max_examples=200)
@given(nps.arrays(np.uint32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64, 96])),
                  elements=st.integers(0, 2**32 - 1)), st.sampled_from([mx.float32, mx.bfloat16]))
def test_any_bit_pattern_matches_mlx_or_goes_to_mlx(bits, dtype):
    w = mx.array(bits.view(F32)).astype(dtype)
    fast = mxcodec.quantize(w)
    blocks = np.array(w.astype(mx.float32)).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    k = np.array(mx.array(amax / F32(448)).astype(dtype).astype(mx.float32))
    mlx_arithmetic = ~np.isfinite(amax) | ~np.isfinite(k) | ((k > 0) & (k <= 2.0**-128))
    if mlx_arithmetic.any():
        assert fast is None, "a non-finite or tiny block must go to mx.quantize"
        return
    assert fast is not None
    q, s = (np.array(a) for a in fast)
    mq, ms = _mlx(w)
    np.testing.assert_array_equal(q, mq)
    np.testing.assert_array_equal(s, ms)


@pytest.mark.parametrize("odd", [np.nan, np.inf, 1e-40])
def test_blocks_of_mlx_own_arithmetic_go_to_mlx(odd):
    w = RNG.standard_normal((4, 64)).astype(F32)
    w[2, 32:] = 0
    w[2, 40] = odd
    assert mxcodec.quantize(mx.array(w)) is None
    q, s = kernels.quantize_mx(mx.array(w), 32, 8, "mxfp8")  # what the port then computes: MLX's own
    mq, ms = _mlx(mx.array(w))
    np.testing.assert_array_equal(np.array(q), mq)
    np.testing.assert_array_equal(np.array(s), ms)


def test_not_taken_off_linux_cpu_or_when_asked(monkeypatch):
    w = mx.array(RNG.standard_normal((2, 32)).astype(F32))
    assert mxcodec.quantize(w.astype(mx.float16)) is None  # float16: MLX's own
    assert mxcodec.quantize(w[0]) is None  # 1-D: mx.quantize refuses it; so does the port
    assert mxcodec.quantize(mx.zeros((0, 32))) is None  # empty: whatever MLX does with it
    assert mxcodec.quantize(mx.zeros((2, 48))) is None  # K not a multiple of 32: MLX's error
    monkeypatch.setenv("RMLX_NATIVE_KERNELS", "1")
    assert mxcodec.quantize(w) is None


def test_quantize_on_load_uses_and_names_the_loops():
    layer = kernels.Linear(64, 48, bias=True)
    kernels.reset()
    q = layer.to_quantized(group_size=32, bits=8, mode="mxfp8")
    assert isinstance(q, kernels.QuantizedLinear) and q.bias is layer.bias and q.get("biases") is None
    assert kernels.in_use() == {"mxfp8 quantize (fp32)": mxcodec.HOW}
    mq, ms = _mlx(layer.weight)
    np.testing.assert_array_equal(np.array(q.weight), mq)
    np.testing.assert_array_equal(np.array(q.scales), ms)


def test_a_failing_thread_fails_the_call():
    """An error in any thread's range is raised, never a weight with a range left unwritten."""
    w = mx.array(RNG.standard_normal((mxcodec._PER_THREAD * 2 * 32 // 64, 64)).astype(F32))

    n = mxcodec._PER_THREAD * 2

    def fails_last(a, b):  # the last range: another thread's wherever there are two
        if b == n:
            raise RuntimeError(f"range {a}..{b}")
        return 0

    with pytest.raises(RuntimeError, match="range"):
        mxcodec._split(n, fails_last)
    assert mxcodec.quantize(w) is not None  # and the loops are fine afterwards


def _one_row_off(real, at: int = 0):
    """A codec that gives MLX's bytes but for row ``at``, whose first element word is off by one code."""
    def quantize(w):
        out = real(w)
        if out is None:
            return None
        q, s = out
        row = mx.arange(q.shape[0])[:, None] == min(at, q.shape[0] - 1)
        col = mx.arange(q.shape[1])[None] == 0
        return mx.where(row & col, q ^ 1, q), s
    return quantize


def test_the_check_holds_the_loops_to_mlx_bit_for_bit():
    w = mx.array(RNG.standard_normal((40, 96)).astype(F32))
    check = KernelCheck(rows=40)
    with kernels.observe(check):
        kernels.quantize_mx(w, 32, 8, "mxfp8")
        with patched((mxcodec, "quantize", _one_row_off(mxcodec.quantize, at=5))):
            kernels.quantize_mx(w.astype(mx.bfloat16), 32, 8, "mxfp8")
    good, bad = sorted(check.summary()["checks"], key=lambda c: c["kernel"], reverse=True)
    assert good["kernel"] == "mxfp8 quantize (fp32)" and good["passed"] and good["bit_identical_to_mlx"] == 1.0
    assert bad["kernel"] == "mxfp8 quantize (bf16)" and not bad["passed"]
    assert 0 < 1 - bad["bit_identical_to_mlx"] < 0.01 and bad["max_abs_vs_mlx"] > 0


def test_a_codec_differing_from_mlx_fails_the_run(tmp_path, capsys):
    """One code off in row 0 (always a sampled row): the check fails, and the stage of that dequantized
    weight, held to the reference's codec, is the first divergence."""
    out = tmp_path / "r.json"
    with patched((mxcodec, "quantize", _one_row_off(mxcodec.quantize))):
        code = main(["run", "--model", str(TINY), "--case", "text-4", "--no-oracle", "--decode-steps", "0",
                     "--quantize", "mxfp8", "--json", str(out), "--report-dir", str(tmp_path / "r")])
    assert code == 1
    k = json.loads(out.read_text())["kernels"]
    failed = [c for c in k["checks"] if not c["passed"]]
    assert failed and all(c["kernel"].startswith("mxfp8 quantize") for c in failed)
    assert "mxfp8 quantize (fp32)" in k["used"]
    text = capsys.readouterr().out
    assert "kernel check FAILED: mxfp8 quantize (fp32)" in text
    assert "First divergent stage: layers.0.attn.q_proj.weight (case tiny/text-4)" in text
