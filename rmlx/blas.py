"""A fast BLAS under MLX on Linux CPUs, loaded before MLX.

MLX's Linux CPU wheel links the reference (netlib) BLAS: an fp32 GEMM of 280x6912 by 6912x3840 runs
at ~2 GFLOP/s (7 s). MLX calls ``cblas_sgemm``/``dgemm``/``cgemm`` and LAPACK through the global
symbol scope, so a BLAS loaded with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported takes their
place. rmlx loads Intel oneMKL's runtime (``libmkl_rt``, the PyPI package ``mkl``, a dependency of
rmlx on Linux x86-64) that way the first time ``rmlx`` or ``parity`` is imported: the same GEMM then
takes ~50 ms. Why MKL: ``cmeel-openblas`` needs a system ``libgfortran.so.5`` (absent on a bare
Debian image), and ``scipy-openblas32`` exports only prefixed ``scipy_cblas_*`` symbols.

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


def _find_mkl() -> Path | None:
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found = sorted(Path(prefix, "lib").glob("libmkl_rt.so*"))
        if found:
            return found[0]
    return None


def load() -> dict[str, str]:
    """Load the fast BLAS once (idempotent); returns ``in_use()``."""
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
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                _STATE.update(blas="mkl", why=f"{path.name}, threading {layer}")
            except OSError as e:
                _STATE.update(blas="reference", why=f"loading {path} failed: {e}")
    return _STATE


def in_use() -> dict[str, str]:
    """``{"blas": "mkl" | "reference" | "platform", "why": ...}``."""
    return load()


def notice() -> str:
    s = in_use()
    return f"rmlx: MLX BLAS: {s['blas']} ({s['why']})"
