"""A fast BLAS under MLX on Linux CPUs, loaded before MLX.

MLX's Linux CPU wheel links the reference (netlib) BLAS: an fp32 GEMM of 280x6912 by 6912x3840 runs
at ~2 GFLOP/s (7 s). MLX calls ``cblas_sgemm``/``dgemm``/``cgemm`` and LAPACK through the global
symbol scope, so a BLAS loaded with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported takes their
place. rmlx loads Intel oneMKL's runtime (``libmkl_rt``, the PyPI package ``mkl``, a dependency of
rmlx on Linux x86-64) that way the first time ``rmlx`` or ``parity`` is imported: the same GEMM then
takes ~50 ms. Why MKL: ``cmeel-openblas`` needs a system ``libgfortran.so.5`` (absent on a bare
Debian image), and ``scipy-openblas32`` exports only prefixed ``scipy_cblas_*`` symbols.

- MLX's CPU allocator returns buffers 8 bytes past a 16-byte boundary, and MKL's sgemm writes a C
  that is not 64-byte aligned in 17-40 % more time at the 12B decoder's shapes (an AMD EPYC, 2 cores;
  docs/performance.md). When the optional extension ``rmlx._aligned_sgemm`` is built (setup.py), its
  ``cblas_sgemm`` goes into the global scope ahead of MKL's: a product of at least ``ALIGN_FROM``
  multiply-adds whose C is misaligned (and at most ``max_scratch()`` bytes) runs MKL's kernel into an
  aligned scratch and is copied into C.
  ``RMLX_NATIVE_SGEMM=1`` leaves it out (MLX calls MKL's ``cblas_sgemm`` directly).
- ``RMLX_BLAS=reference`` opts out (MLX keeps its reference BLAS).
- Threads: MKL's GNU OpenMP layer (the runtime torch uses too) when ``libgomp`` is on the system,
  else its sequential layer; ``MKL_THREADING_LAYER`` set by the user wins.
- ``in_use()`` says what MLX calls and why; the CLI prints it in one line, every record stores it.

Nothing here imports mlx.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

_STATE: dict[str, str] = {}
ALIGN_FROM = 2**30  # m * n * k; the 12B projections at 280 tokens are all >= 2.2e9
_SHIM: ctypes.CDLL | None = None
_SHIM_NEXT: ctypes.c_void_p | None = None  # MKL's cblas_sgemm, where the shim forwards


def _find_mkl() -> Path | None:
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found = sorted(Path(prefix, "lib").glob("libmkl_rt.so*"))
        if found:
            return found[0]
    return None


def load() -> dict[str, str]:
    """Load the fast BLAS once (idempotent); returns ``in_use()``."""
    global _SHIM_NEXT
    if _STATE:
        return _STATE
    choice = os.environ.get("RMLX_BLAS", "auto")
    if sys.platform != "linux":
        _STATE.update(blas="platform", why=f"{sys.platform}: MLX's own BLAS (Accelerate on macOS)")
    elif choice == "reference":
        _STATE.update(blas="reference", why="RMLX_BLAS=reference")
    elif choice != "auto":
        _STATE.update(blas="reference", why=f"RMLX_BLAS={choice!r} is not 'auto' or 'reference'; kept the reference")
    elif "mlx.core" in sys.modules:
        _STATE.update(blas="reference", why="mlx was imported before rmlx: import rmlx (or parity) first")
    else:
        path = _find_mkl()
        if path is None:
            _STATE.update(blas="reference", why=f"no libmkl_rt under {sys.prefix}/lib (pip install mkl; "
                                                f"{platform.machine()} wheels only on x86-64)")
        else:
            layer = os.environ.setdefault(
                "MKL_THREADING_LAYER", "GNU" if ctypes.util.find_library("gomp") else "SEQUENTIAL")
            try:
                ctypes.CDLL(str(path))  # loads at all? (local scope: nothing of it is global yet)
            except OSError as e:
                _STATE.update(blas="reference", why=f"loading {path} failed: {e}")
            else:
                shim, shim_why = _load_shim()  # into the global scope before MKL: its cblas_sgemm comes first
                mkl = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)  # promoted to the global scope
                if shim is not None:
                    _SHIM_NEXT = ctypes.cast(mkl.cblas_sgemm, ctypes.c_void_p)
                    align_from(ALIGN_FROM)
                    first = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
                    if first != ctypes.cast(shim.cblas_sgemm, ctypes.c_void_p).value:  # e.g. LD_PRELOAD
                        shim_why = _unaligned("another cblas_sgemm comes first in the global scope")
                _STATE.update(blas="mkl", why=f"{path.name}, threading {layer}", sgemm_output=shim_why)
    return _STATE


def _load_shim() -> tuple[ctypes.CDLL | None, str]:
    """rmlx._aligned_sgemm loaded with RTLD_GLOBAL (None and why not)."""
    global _SHIM
    if os.environ.get("RMLX_NATIVE_SGEMM") == "1":
        return None, _unaligned("RMLX_NATIVE_SGEMM=1")
    import importlib.util

    spec = importlib.util.find_spec("rmlx._aligned_sgemm")
    if spec is None or not spec.origin:
        return None, _unaligned("rmlx._aligned_sgemm not built: setup.py")
    try:
        _SHIM = ctypes.CDLL(spec.origin, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return None, _unaligned(f"loading rmlx._aligned_sgemm failed: {e}")
    _SHIM.rmlx_aligned_sgemm_setup.argtypes = [ctypes.c_void_p, ctypes.c_double]
    _SHIM.rmlx_aligned_sgemm_redirected.restype = ctypes.c_longlong
    _SHIM.rmlx_aligned_sgemm_max_scratch.restype = ctypes.c_size_t
    return _SHIM, f"sgemm output 64-byte aligned when m*n*k >= {ALIGN_FROM}"


def _unaligned(why: str) -> str:
    """``sgemm_output`` when the shim is not in front of MKL, and why."""
    return f"sgemm output where MLX allocates it ({why})"


def align_from(products: float) -> None:
    """Set the size (m * n * k) from which a misaligned C goes through the aligned scratch; ``math.inf``
    turns it off. For benchmarks and tests, between products (the setting is not synchronised with
    MLX's threads). No-op without the shim."""
    if _SHIM is not None and _SHIM_NEXT is not None:
        _SHIM.rmlx_aligned_sgemm_setup(_SHIM_NEXT, ctypes.c_double(products))


def max_scratch() -> int | None:
    """The largest C (bytes, rows padded to 64 bytes) the shim computes through its scratch; a larger
    one goes to MKL as it is (None: the shim is not loaded)."""
    return None if _SHIM is None else int(_SHIM.rmlx_aligned_sgemm_max_scratch())


def aligned_calls() -> int | None:
    """How many sgemm calls went through the aligned scratch so far (None: the shim is not loaded)."""
    return None if _SHIM is None else int(_SHIM.rmlx_aligned_sgemm_redirected())


def in_use() -> dict[str, str]:
    """``{"blas": "mkl" | "reference" | "platform", "why": ...}``, and with MKL ``"sgemm_output"``: whether
    the aligned-output ``cblas_sgemm`` is in front of it (the same bits either way: tests/test_blas.py)."""
    return load()


def notice() -> str:
    s = in_use()
    extra = f"; {s['sgemm_output']}" if "sgemm_output" in s else ""
    return f"rmlx: MLX BLAS: {s['blas']} ({s['why']}){extra}"
