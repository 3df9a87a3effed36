"""MXFP8 quantization: rmlx's vectorised loops (``rmlx/_mxfp8.c``) where they are built, else MLX's.

Why: MLX 0.32's CPU backend quantizes to mxfp8 at ~9 ns per value on one thread: quantize-on-load of a
12B checkpoint's 11.8 G decoder weights is ~107 s of CPU (``python benchmarks/bench.py --only codec``).
The C loops compute MLX's bytes (the C file's header: the arithmetic), split over threads.

:func:`quantize` returns ``None`` where the loops do not apply -- not built, not on the CPU on Linux,
``RMLX_NATIVE_KERNELS=1``, another dtype or shape, or a block MLX's own arithmetic must compute
(non-finite, or a maximum at or below 448 * 2**-128) -- and the caller runs ``mx.quantize``. The parity
harness does not take the equality on trust: ``rmlx.nn.kernels`` reports each call to its observers,
which compare ``mx.quantize`` on a sample of rows bit for bit (``parity/kernels.py``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading

import mlx.core as mx
import numpy as np

BLOCK = 32
HOW = "rmlx C loops (rmlx/_mxfp8.c), MLX's arithmetic"
_PER_THREAD = 1 << 16  # blocks (2 Mi values) below which a call stays on one thread


def _load() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("rmlx._mxfp8")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    ptr, n = ctypes.c_void_p, ctypes.c_longlong
    for name in ("rmlx_mxfp8_quantize_f32", "rmlx_mxfp8_quantize_bf16"):
        getattr(lib, name).argtypes = [ptr, n, ptr, ptr]
        getattr(lib, name).restype = ctypes.c_longlong
    return lib


_LIB = _load()
_THREADS = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


def built() -> bool:
    return _LIB is not None


def enabled() -> bool:
    """Does :func:`quantize` run the C loops (else it returns None)?"""
    return (_LIB is not None and sys.platform == "linux" and sys.byteorder == "little"  # MLX's word packing
            and mx.default_device() == mx.cpu and os.environ.get("RMLX_NATIVE_KERNELS") != "1")


def _split(n: int, fn) -> list:
    """``fn(start, stop)`` over block ranges covering [0, n), on threads of this call (ctypes releases the
    GIL; no pool, which a forked worker process would inherit without its threads); their results."""
    parts = min(_THREADS, max(1, n // _PER_THREAD))
    bounds = [n * i // parts for i in range(parts + 1)]
    out: list = [None] * parts

    def part(i: int) -> None:
        try:
            out[i] = fn(bounds[i], bounds[i + 1])
        except BaseException as e:  # raised below, in the caller's thread: no range is left unwritten
            out[i] = e

    threads = [threading.Thread(target=part, args=(i,)) for i in range(1, parts)]
    for t in threads:
        t.start()
    part(0)
    for t in threads:
        t.join()
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


def quantize(w: mx.array) -> tuple[mx.array, mx.array] | None:
    """``mx.quantize(w, group_size=32, bits=8, mode="mxfp8")`` for a float32 or bfloat16 ``w`` of shape
    (..., K) (K a multiple of 32), or ``None`` (module docstring)."""
    if not enabled() or w.dtype not in (mx.float32, mx.bfloat16) or w.ndim < 2 or w.shape[-1] % BLOCK or not w.size:
        return None
    src = mx.contiguous(w)
    mx.eval(src)
    if w.dtype == mx.bfloat16:
        data, fn = np.frombuffer(memoryview(src.view(mx.uint16)), np.uint16), _LIB.rmlx_mxfp8_quantize_bf16
    else:
        data, fn = np.frombuffer(memoryview(src), np.float32), _LIB.rmlx_mxfp8_quantize_f32
    n = data.size // BLOCK
    codes, scales = np.empty(data.size, np.uint8), np.empty(n, np.uint8)
    item = data.itemsize

    def run(a: int, b: int) -> int:
        return fn(data.ctypes.data + a * BLOCK * item, b - a, codes.ctypes.data + a * BLOCK, scales.ctypes.data + a)

    if sum(_split(n, run)):
        return None  # a block of MLX's own arithmetic (non-finite or tiny): MLX computes the weight
    lead = w.shape[:-1]  # element 4j in word j's low byte: MLX's view of its element bytes (little-endian)
    return (mx.array(codes.view(np.uint32).reshape(*lead, w.shape[-1] // 4)),
            mx.array(scales.reshape(*lead, w.shape[-1] // BLOCK)))
