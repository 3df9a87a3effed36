"""The fast BLAS under MLX on Linux (rmlx/blas.py): on by default, off with RMLX_BLAS=reference, and a
throughput floor that fails if the fast path silently stops working."""

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
