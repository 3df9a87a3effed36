"""The fast BLAS under MLX on Linux (rmlx/blas.py): on by default, off with RMLX_BLAS=reference, the
aligned-output cblas_sgemm in front of it (rmlx/_aligned_sgemm.c), and a throughput floor that fails if
the fast path silently stops working."""

import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

LINUX_X86 = sys.platform == "linux" and platform.machine() == "x86_64"


def blas_in(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, **env)).stdout
    return out.strip()


@pytest.mark.skipif(not LINUX_X86, reason="the mkl wheel exists for Linux x86-64 only; MLX elsewhere has its own")
def test_mkl_is_loaded_by_default_and_reported():
    assert blas_in("import rmlx; print(rmlx.blas.in_use()['blas'])") == "mkl"
    assert blas_in("import parity.provenance as r; print(r.versions()['blas'])").startswith("mkl (libmkl_rt")
    # the extension that aligns sgemm's output (setup.py) is built and in front of MKL
    assert "sgemm output 64-byte aligned" in blas_in("import rmlx; print(rmlx.blas.notice())")


def test_opt_out_and_too_late_are_said():
    assert blas_in("import rmlx; print(rmlx.blas.notice())", RMLX_BLAS="reference") == \
        "rmlx: MLX BLAS: reference (RMLX_BLAS=reference)"
    late = blas_in("import mlx.core, rmlx; print(rmlx.blas.notice())")
    assert "mlx was imported before rmlx" in late or not LINUX_X86


def test_cli_headline_says_which_blas(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "run", "--model", "fixtures/models/tiny", "--case",
                           "text-only", "--no-oracle", "--decode-steps", "0", "--report-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr
    headline = next(line for line in proc.stdout.splitlines() if line.startswith("wall time"))
    assert ", blas " in headline and ("blas mkl (" in headline or not LINUX_X86), headline


@pytest.mark.skipif(not LINUX_X86, reason="the floor is for the Linux fast path")
def test_gemm_throughput_floor_against_numpy():
    """fp32 280x6912 @ 6912x3840 (the vision patch_dense): MLX within 4x of NumPy's matmul in the same
    process (measured 0.8-1.3x with MKL; the reference BLAS is ~140x slower)."""
    import mlx.core as mx

    import rmlx  # noqa: F401

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((280, 6912), dtype=np.float32), rng.standard_normal((6912, 3840), dtype=np.float32)
    ma, mb = mx.array(a), mx.array(b)

    def median(fn):
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    t_numpy = median(lambda: a @ b)
    t_mlx = median(lambda: mx.eval(ma @ mb))
    assert t_mlx <= 4 * t_numpy, f"MLX fp32 GEMM {t_mlx:.3f} s vs NumPy {t_numpy:.3f} s: the fast BLAS is not in use"


def _misaligned(shape, rng, offset=8) -> np.ndarray:
    """A float32 array whose data starts ``offset`` bytes past a 64-byte boundary (as MLX's allocator's do)."""
    n = int(np.prod(shape))
    raw = np.empty(n * 4 + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start:start + n * 4].view(np.float32).reshape(shape)
    out[...] = rng.standard_normal(shape, dtype=np.float32)
    return out


def _sgemm(fn, layout, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc) -> None:
    """``fn`` (a ctypes ``cblas_sgemm``) with alpha 1 on NumPy arrays ``a``, ``b``, ``c``."""
    import ctypes

    fn(layout, trans_a, trans_b, m, n, k, ctypes.c_float(1.0), ctypes.c_void_p(a.ctypes.data), lda,
       ctypes.c_void_p(b.ctypes.data), ldb, ctypes.c_float(beta), ctypes.c_void_p(c.ctypes.data), ldc)


def _global_sgemm():
    """The ``cblas_sgemm`` MLX resolves: the first in the process's global scope."""
    import ctypes

    return ctypes.CDLL(None).cblas_sgemm


@pytest.mark.skipif(not LINUX_X86, reason="the aligned-output cblas_sgemm sits in front of MKL (Linux x86-64)")
@pytest.mark.parametrize("layout, beta, pad", [(101, 0.0, 0), (101, 0.5, 3), (102, 0.0, 5), (102, -1.0, 0)])
def test_aligned_sgemm_is_mkls_product_bit_for_bit(layout, beta, pad):
    """The global ``cblas_sgemm`` (rmlx._aligned_sgemm) against MKL's own on a C 8 bytes past a 64-byte
    boundary, above the size at which it computes through its aligned scratch: the same bits, C's
    padding between rows untouched, and the call counted."""
    import ctypes

    from rmlx import blas

    assert blas.aligned_calls() is not None, blas.notice()
    m, n, k = 1024, 1040, 1032  # m n k >= 2^30; n not a multiple of 16
    assert m * n * k >= blas.ALIGN_FROM
    rng = np.random.default_rng(0)
    a, b = _misaligned((m, k), rng), _misaligned((n, k), rng)  # C = A B^T
    rows, cols = (m, n) if layout == 101 else (n, m)
    lda = ldb = k
    if layout == 102:  # column-major: the same arrays read as A^T (k x m) and B^T (k x n)
        trans_a, trans_b = 112, 111
    else:
        trans_a, trans_b = 111, 112
    c0 = _misaligned((rows, cols + pad), rng)
    assert c0.ctypes.data % 64 == 8
    results = {}
    mkl = ctypes.CDLL(str(blas._find_mkl()))
    for name, fn in (("shim", _global_sgemm()), ("mkl", mkl.cblas_sgemm)):
        c = _misaligned((rows, cols + pad), rng)
        c[...] = c0
        before = blas.aligned_calls()
        _sgemm(fn, layout, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, cols + pad)
        results[name] = (c, blas.aligned_calls() - before)
    (shim, calls), (ref, ref_calls) = results["shim"], results["mkl"]
    assert (calls, ref_calls) == (1, 0)
    np.testing.assert_array_equal(shim, ref)
    np.testing.assert_array_equal(shim[:, cols:], c0[:, cols:])  # the padding between rows
    expected = (a.astype(np.float64) @ b.T.astype(np.float64)) if layout == 101 else \
        (b.astype(np.float64) @ a.T.astype(np.float64))
    np.testing.assert_allclose(shim[:, :cols], expected + beta * c0[:, :cols], rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not LINUX_X86, reason="the aligned-output cblas_sgemm sits in front of MKL (Linux x86-64)")
def test_mlx_matmul_goes_through_the_aligned_output_and_keeps_its_bits():
    """An MLX fp32 matmul above ALIGN_FROM is computed through the aligned scratch (counted) and gives the
    bits of the same matmul with the shim set aside (``align_from(inf)``); below, it is not redirected."""
    import math

    import mlx.core as mx

    from rmlx import blas

    rng = np.random.default_rng(1)
    a, w = mx.array(rng.standard_normal((1024, 1040), dtype=np.float32)), \
        mx.array(rng.standard_normal((1032, 1040), dtype=np.float32))
    small = a[:8]
    mx.eval(a, w, small)
    before = blas.aligned_calls()
    y, y_small = a @ w.T, small @ w.T
    mx.eval(y, y_small)
    assert blas.aligned_calls() - before == 1
    blas.align_from(math.inf)
    try:
        direct = a @ w.T
        mx.eval(direct)
    finally:
        blas.align_from(blas.ALIGN_FROM)
    assert blas.aligned_calls() - before == 1
    np.testing.assert_array_equal(np.array(y), np.array(direct))


@pytest.mark.skipif(not LINUX_X86, reason="the aligned-output cblas_sgemm sits in front of MKL (Linux x86-64)")
def test_a_c_larger_than_the_scratch_goes_to_mkl_as_it_is():
    """No product's scratch exceeds ``max_scratch()``: a misaligned C just over it (above ALIGN_FROM too)
    is computed by MKL in place, not counted."""

    from rmlx import blas

    limit = blas.max_scratch()
    assert limit == 256 << 20, blas.notice()
    m = n = 8208  # 8208 x 8208 fp32 (rows already 64-byte multiples) is 257 MiB
    k = -(-blas.ALIGN_FROM // (m * n))
    assert m * n * 4 > limit and m * n * k >= blas.ALIGN_FROM
    rng = np.random.default_rng(2)
    a, b, c = _misaligned((m, k), rng), _misaligned((n, k), rng), _misaligned((m, n), rng)
    before = blas.aligned_calls()
    _sgemm(_global_sgemm(), 101, 111, 112, m, n, k, a, k, b, k, 0.0, c, n)
    assert blas.aligned_calls() == before
    rows = rng.choice(m, 16, replace=False)
    np.testing.assert_allclose(c[rows], a[rows].astype(np.float64) @ b.T.astype(np.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not LINUX_X86, reason="the aligned-output cblas_sgemm sits in front of MKL (Linux x86-64)")
def test_arguments_mkl_rejects_leave_c_as_mkl_leaves_it():
    """A large product with a leading dimension of A shorter than its rows: MKL reports it and computes
    nothing; the shim must not copy a scratch MKL never wrote into C."""

    from rmlx import blas

    m, n, k = 1024, 1040, 1032
    rng = np.random.default_rng(3)
    a, b, c = _misaligned((m, k), rng), _misaligned((n, k), rng), _misaligned((m, n), rng)
    before, c0 = blas.aligned_calls(), c.copy()
    _sgemm(_global_sgemm(), 101, 111, 112, m, n, k, a, k - 1, b, k, 0.0, c, n)
    assert blas.aligned_calls() == before
    np.testing.assert_array_equal(c, c0)


def test_aligned_output_opt_out_is_said():
    notice = blas_in("import rmlx; print(rmlx.blas.notice())", RMLX_NATIVE_SGEMM="1")
    assert "RMLX_NATIVE_SGEMM=1" in notice or not LINUX_X86, notice
    assert blas_in("import rmlx; print(rmlx.blas.aligned_calls())", RMLX_NATIVE_SGEMM="1") == "None"
    if LINUX_X86:  # another cblas_sgemm first in the global scope: the shim is never reached, and says so
        from rmlx import blas

        preloaded = blas_in("import rmlx; print(rmlx.blas.notice())", LD_PRELOAD=str(blas._find_mkl()))
        assert "another cblas_sgemm comes first in the global scope" in preloaded, preloaded
