"""The port's matrix products where MLX's Linux CPU backend is slow: bf16 and MX-quantized weights.

Why: MLX 0.32's CPU backend on Linux runs fp32 GEMMs through the BLAS (MKL, ``rmlx/blas.py``), but
computes a bf16 GEMM and ``quantized_matmul`` in its own generic loops. At the 12B shapes
(280 x 3840 by 3840 x 6912, ``python benchmarks/bench.py --only kernels``): bf16 ~3 s where the fp32
GEMM takes ~0.1 s, mxfp8 ~20 s.

What runs instead (:func:`enabled`: on the CPU on Linux with MKL loaded, unless
``RMLX_NATIVE_KERNELS=1``):

- bf16 x bf16 (``Linear``, the tied lm_head): MKL's ``cblas_gemm_bf16bf16f32``, products of bf16
  values summed in fp32 (AMX or AVX512-BF16 where the CPU has them), rounded to bf16 once. That is
  what MLX's own bf16 GEMM computes up to the order of the fp32 sums.
- MX-quantized weights (``QuantizedLinear``, modes ``mxfp8``/``mxfp4``): the weight dequantized with
  ``mx.dequantize`` -- exact: an FP8/FP4 element times a power-of-two scale is an fp32 (and a bf16,
  within bf16's exponent range) -- then the fp32 GEMM (fp32 activations) or the bf16 one above
  (bf16 activations). MLX's ``quantized_matmul`` also sums the exact products in fp32.
- MXFP8 quantization (:func:`quantize_mx`, which ``QuantizedLinear.from_linear`` calls): the C loops of
  ``rmlx.nn.mxcodec``, MLX's bytes (``mx.quantize`` is a scalar loop on one thread here).

The products differ from MLX's own kernel only by the order of fp32 sums (and, for bf16 outputs, the
one rounding to bf16 that this can flip): :func:`bound`; the quantization is MLX's to the byte. The
parity harness takes neither on trust: each distinct (kernel, shape) a run uses is also computed by
MLX's own kernel on a sample of rows and held to that bound, or to MLX's bytes (``parity/kernels.py``),
and every record names the kernels that computed the candidate (:func:`in_use`). ``observe`` is how it
sees the calls; the port never checks itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from rmlx import blas
from rmlx.nn import mxcodec
from rmlx.nn.base import cpu_streams

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_MX_MODES = ("mxfp8", "mxfp4")  # block-scaled by powers of two: dequantization is exact
_BF16_GEMM = "MKL cblas_gemm_bf16bf16f32 (fp32 sums, one rounding to bf16)"
_USED: dict[str, str] = {}  # kernel -> what computed it, since the last ``reset``
_OBSERVERS: list[Callable] = []


def _mkl_gemm_bf16():
    """MKL's ``cblas_gemm_bf16bf16f32`` from the libmkl_rt that ``rmlx.blas`` loaded (None: not there)."""
    if blas.in_use()["blas"] != "mkl":
        return None
    try:
        fn = ctypes.CDLL(None).cblas_gemm_bf16bf16f32  # loaded with RTLD_GLOBAL: in the global scope
    except AttributeError:
        return None
    i32, f32, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [i32, i32, i32, i32, i32, i32, f32, ptr, i32, ptr, i32, f32, ptr, i32]
    fn.restype = None
    return fn


_GEMM_BF16 = _mkl_gemm_bf16()


def enabled() -> bool:
    """Do ``Linear`` and ``QuantizedLinear`` run the kernels above (else MLX's own ops)?"""
    return (_GEMM_BF16 is not None and sys.platform == "linux" and mx.default_device() == mx.cpu
            and os.environ.get("RMLX_NATIVE_KERNELS") != "1")


def in_use() -> dict[str, str]:
    """{kernel: what computed it} for every matrix-product kind used since :func:`reset`."""
    return dict(_USED)


def reset() -> None:
    _USED.clear()


@contextlib.contextmanager
def observe(callback: Callable) -> Iterator[None]:
    """Call ``callback(kind, x, w, bias, y, native)`` after each product this module computes in place
    of MLX's own kernel: ``x`` its input (..., K), ``w`` the (dequantized) weight (N, K), ``bias`` the
    bias added before the rounding (or None), ``y`` its output (..., N), ``native(rows)`` MLX's own
    kernel on some rows of ``x`` (2-D). And ``callback.codec(kind, n, k, result, native)`` after each
    quantization of an (N, K) weight that ``rmlx.nn.mxcodec`` computes in place of ``mx.quantize``:
    ``result`` its arrays (row i of each is weight row i), ``native(rows)`` ``mx.quantize`` of those rows
    (an index array), the same arrays."""
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.remove(callback)


def _note(kind: str, how: str, x: mx.array, w: mx.array, bias: mx.array | None, y: mx.array,
          native: Callable) -> mx.array:
    _USED[kind] = how
    for cb in list(_OBSERVERS):
        cb(kind, x, w, bias, y, native)
    return y


def _note_codec(kind: str, n: int, k: int, result: tuple[mx.array, ...], native: Callable) -> None:
    _USED[kind] = mxcodec.HOW
    for cb in list(_OBSERVERS):
        cb.codec(kind, n, k, result, native)


def quantize_mx(w: mx.array, group_size: int | None, bits: int | None, mode: str) -> tuple[mx.array, ...]:
    """``mx.quantize(w, group_size, bits, mode=mode)``: ``rmlx.nn.mxcodec``'s loops where they apply
    (mxfp8, float32 or bfloat16 weights on Linux CPU), else MLX's."""
    fast = mxcodec.quantize(w) if mode == "mxfp8" and group_size in (None, 32) and bits in (None, 8) else None
    if fast is None:
        return tuple(mx.quantize(w, group_size, bits, mode=mode))
    _note_codec(f"mxfp8 quantize ({'bf16' if w.dtype == mx.bfloat16 else 'fp32'})", int(w.shape[0]),
                int(w.shape[-1]), fast, lambda rows: tuple(mx.quantize(w[rows], 32, 8, mode="mxfp8")))
    return fast


def _as_u16(a: mx.array) -> np.ndarray:
    """The bits of an evaluated, row-contiguous bf16 array, without a copy."""
    return np.frombuffer(memoryview(a.view(mx.uint16)), dtype=np.uint16).reshape(a.shape)


def gemm_bf16(x: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array:
    """x (..., K) bf16 @ w (N, K) bf16 .T (+ ``bias``), fp32 sums, rounded to bf16 once (MKL; evaluates
    x and w). The bias is added to the fp32 sums before the rounding, as a fused ``addmm`` does."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = w.shape[0]
    a = mx.contiguous(x.reshape(-1, k))
    b = mx.contiguous(w)
    mx.eval(a, b)
    m = a.shape[0]
    out = np.empty((m, n), dtype=np.float32)
    if m and n:
        a16, b16 = _as_u16(a), _as_u16(b)
        _GEMM_BF16(_ROW_MAJOR, _NO_TRANS, _TRANS, m, n, k, 1.0, a16.ctypes.data, k, b16.ctypes.data, k, 0.0,
                   out.ctypes.data, n)
    y = mx.array(out)
    if bias is not None:
        y = y + bias.astype(mx.float32)
    return y.astype(mx.bfloat16).reshape(*lead, n)


def matmul_t(x: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array:
    """``x @ w.T (+ bias)`` for a weight ``w`` (N, K), the bias fused as ``mx.addmm`` (and torch's
    ``F.linear``) fuse it: MKL's bf16 GEMM for bf16 operands when :func:`enabled`."""
    if x.dtype == mx.bfloat16 and w.dtype == mx.bfloat16 and x.ndim >= 2 and enabled():
        y = gemm_bf16(x, w, bias)
        return _note("bf16 matmul", _BF16_GEMM, x, w, bias, y,
                     lambda rows: rows @ w.T if bias is None else mx.addmm(bias, rows, w.T))
    return x @ w.T if bias is None else mx.addmm(bias, x, w.T)


def bmm_t(a: mx.array, b: mx.array) -> mx.array:
    """``a @ b.swapaxes(-1, -2)`` for a (..., M, K) and b (..., N, K) of the same leading shape (the
    attention's q k^T and p v): MKL's bf16 GEMM per leading index for bf16 operands when :func:`enabled`
    (MLX's own bf16 batched matmul is its generic loop too)."""
    if not (a.dtype == mx.bfloat16 and b.dtype == mx.bfloat16 and enabled()):
        return a @ b.swapaxes(-1, -2)
    lead, (m, k), n = a.shape[:-2], a.shape[-2:], b.shape[-2]
    a3, b3 = a.reshape(-1, m, k), b.reshape(-1, n, k)
    outs = [gemm_bf16(a3[i], b3[i]) for i in range(a3.shape[0])]
    _note("bf16 matmul", _BF16_GEMM, a3[0], b3[0], None, outs[0],
          lambda rows: rows @ b3[0].T)  # the first slice is observed: the same kernel as the rest
    return mx.stack(outs).reshape(*lead, m, n)


class Linear(nn.Linear):
    """``nn.Linear`` whose bf16 product is :func:`matmul_t`; quantizes to :class:`QuantizedLinear`."""

    def __call__(self, x: mx.array) -> mx.array:
        return matmul_t(x, self["weight"], self.get("bias"))

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` whose MX-quantized product dequantizes exactly and runs the fp32 or bf16
    GEMM (module docstring); other modes run ``mx.quantized_matmul``. Quantizes with :func:`quantize_mx`."""

    @classmethod
    def from_linear(cls, linear_layer: nn.Module, group_size: int | None = None, bits: int | None = None,
                    mode: str = "affine"):
        """``nn.QuantizedLinear.from_linear`` with the weight quantized by :func:`quantize_mx`."""
        output_dims, input_dims = linear_layer.weight.shape
        ql = cls(input_dims, output_dims, False, group_size, bits, mode=mode)
        ql.weight, ql.scales, *biases = quantize_mx(linear_layer.weight, group_size, bits, mode)
        ql.biases = biases[0] if biases else None
        if "bias" in linear_layer:
            ql.bias = linear_layer.bias
        return ql

    def _native(self, x: mx.array) -> mx.array:
        return mx.quantized_matmul(x, self["weight"], scales=self["scales"], biases=self.get("biases"),
                                   transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode)

    def _dequantized(self, dtype: mx.Dtype, rows: slice = slice(None)) -> mx.array:
        return mx.dequantize(self["weight"][rows], self["scales"][rows], None, group_size=self.group_size,
                             bits=self.bits, mode=self.mode, dtype=dtype)

    def __call__(self, x: mx.array) -> mx.array:
        if self.mode in _MX_MODES and x.dtype in (mx.float32, mx.bfloat16) and x.ndim >= 2 and enabled():
            if x.dtype == mx.bfloat16:
                w = self._dequantized(mx.bfloat16)
                y, how = gemm_bf16(x, w), "exact dequantization to bf16 + " + _BF16_GEMM
            else:
                # the output columns in two halves on MLX's two CPU streams: one half's dequantization
                # (MLX's own loop, single-threaded) overlaps the other's GEMM (measured 0.155 -> 0.106 s at
                # 280 x 6912 -> 3840); the sums of each column are fp32 sums as in one GEMM of the whole
                n, halves = self["weight"].shape[0], []
                for stream, rows in zip(cpu_streams(), (slice(0, n // 2), slice(n // 2, n)), strict=True):
                    with mx.stream(stream):
                        halves.append(x @ self._dequantized(mx.float32, rows).T)
                w = self._dequantized(mx.float32) if _OBSERVERS else None  # the observers' copy only
                y, how = mx.concatenate(halves, axis=-1), "exact dequantization to fp32 + the fp32 GEMM (MKL sgemm)"
            y = _note(f"{self.mode} matmul ({'bf16' if x.dtype == mx.bfloat16 else 'fp32'})", how, x, w, None, y,
                      self._native)
        else:
            y = self._native(x)
        return y + self["bias"] if "bias" in self else y  # as nn.QuantizedLinear adds it


def bound(abs_products: np.ndarray, y: np.ndarray, k: int, out_dtype: str) -> np.ndarray:
    """How far a product computed with fp32 sums may be from the exact product (elementwise):
    ``gamma_K * sum_k |x_k| |w_k|`` (any order of K fp32 additions of exact products; Higham, Accuracy
    and Stability of Numerical Algorithms, eq. 3.5), plus half a bf16 ulp of ``y`` when the result is
    rounded to bf16 once. ``abs_products``: ``|x| @ |W|.T`` in float64."""
    u = 2.0**-24
    b = (k * u / (1 - k * u)) * abs_products
    if out_dtype == "bfloat16":
        mag = np.maximum(np.abs(y.astype(np.float64)), np.finfo(np.float32).tiny)
        b = b + np.exp2(np.floor(np.log2(mag)) - 8)  # half a bf16 ulp (8 significant bits)
    return b
