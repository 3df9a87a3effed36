"""The check of every kernel that computes the candidate in place of MLX's own (``rmlx.nn.kernels``).

A speed-up must never hide a kernel difference. For each distinct (kernel, K, N) a run uses, the
first call's output is checked on ``ROWS`` rows spread over its input:

- against the exact product (float64: the products of bf16 or fp32 values are exact there, and their
  sum is within 2^-53 K of exact): every element within ``rmlx.nn.kernels.bound`` -- the fp32 summation
  bound, plus half a bf16 ulp when the output is rounded to bf16. This decides ``passed``;
- against MLX's own kernel on the same rows (how MLX would have computed the candidate): how many
  elements are bit-identical, the largest difference, and whether MLX's own kernel meets the same
  bound (so a violation is pinned on the right kernel).

The MX quantization ``rmlx.nn.mxcodec`` computes in place of ``mx.quantize`` has an exact answer,
MLX's: its bytes on ``ROWS`` rows spread over the weight are held to ``mx.quantize`` of the same rows
bit for bit (``codec``).

The record's ``kernels`` section (``summary``) names what computed the candidate and every check;
a failed check fails the run.
"""

from __future__ import annotations

import rmlx  # noqa: F401  (before mlx: it loads the BLAS MLX calls, rmlx/blas.py)

# isort: split
import mlx.core as mx
import numpy as np

from parity.capture import to_numpy
from rmlx.nn import kernels

ROWS = 8
_CHUNK = 2048  # weight rows per float64 block (bounds memory at real sizes: 2048 x 15360 x 8 B = 252 MB)


def _f64(a: mx.array) -> np.ndarray:
    return to_numpy(a).astype(np.float64)  # bf16 widened exactly


class KernelCheck:
    """An observer for ``rmlx.nn.kernels.observe``: checks the first call of each distinct kernel shape."""

    def __init__(self, rows: int = ROWS):
        self.rows = rows
        self.results: dict[tuple, dict] = {}
        self.case = 0  # the plan index of the case running now (set by the runner)
        self.first_case: dict[tuple, int] = {}  # the case each check comes from
        self.used: dict[str, str] = {}  # kernels other processes of the run used (``merge``)

    def __call__(self, kind: str, x: mx.array, w: mx.array, bias: mx.array | None, y: mx.array, native) -> None:
        k, n = int(x.shape[-1]), int(w.shape[0])
        key = (kind, k, n)
        if key in self.results:
            return
        x2, y2 = x.reshape(-1, k), y.reshape(-1, n)
        m = x2.shape[0]
        if m == 0:
            return
        idx = mx.array(np.unique(np.linspace(0, m - 1, min(self.rows, m)).astype(np.int64)))
        xs, ys = x2[idx], y2[idx]
        ns = native(xs)
        mx.eval(xs, ys, ns)
        xs64, ys64, ns64 = _f64(xs), _f64(ys), _f64(ns)
        exact = np.empty_like(ys64)
        absprod = np.empty_like(ys64)
        for start in range(0, n, _CHUNK):
            wb = _f64(w[start:start + _CHUNK])
            exact[:, start:start + _CHUNK] = xs64 @ wb.T
            absprod[:, start:start + _CHUNK] = np.abs(xs64) @ np.abs(wb).T
        if bias is not None:  # added to the fp32 sums before the rounding: one more term
            exact += _f64(bias)
            absprod += np.abs(_f64(bias))
        terms = k + (bias is not None)
        out_dtype = "bfloat16" if y.dtype == mx.bfloat16 else "float32"
        with np.errstate(invalid="ignore", divide="ignore"):
            # + the float64 sum's own error (K 2^-53 of the absolute products): the "exact" side's slack
            b = kernels.bound(absprod, ys64, terms, out_dtype) + terms * 2.0**-53 * absprod
            ours, mlx_own = np.abs(ys64 - exact), np.abs(ns64 - exact)
            ratio = float(np.nanmax(np.where(b > 0, ours / b, np.where(ours > 0, np.inf, 0.0))))
            mlx_ratio = float(np.nanmax(np.where(b > 0, mlx_own / b, np.where(mlx_own > 0, np.inf, 0.0))))
        bad = np.argwhere(~np.isfinite(ys64))
        finite = bad.size == 0
        self.first_case[key] = self.case
        self.results[key] = {
            "kernel": kind, "how": kernels.in_use().get(kind, ""), "k": k, "n": n, "rows": int(idx.size),
            "output_dtype": out_dtype,
            "max_abs_vs_exact": float(ours.max()), "bound_ratio": ratio,
            "mlx_bound_ratio": mlx_ratio, "max_abs_vs_mlx": float(np.abs(ys64 - ns64).max()),
            "bit_identical_to_mlx": float((ys64 == ns64).mean()),
            "passed": finite and ratio <= 1.0,
            # (sampled row, column) of the first NaN/Inf the kernel gave, and the row's index in its input
            "first_nonfinite": None if finite else [int(np.asarray(idx)[bad[0][0]]), int(bad[0][-1])],
        }

    def codec(self, kind: str, n: int, k: int, result: tuple[mx.array, ...], native) -> None:
        """The first call of each distinct (codec, K, N): ``result``'s rows against ``native(rows)``, MLX's
        own op on the same rows, bit for bit (``rmlx.nn.kernels.observe``)."""
        key = (kind, k, n)
        if key in self.results or n == 0:
            return
        idx = np.unique(np.linspace(0, n - 1, min(self.rows, n)).astype(np.int64))
        rows = mx.array(idx)
        ours = [r[rows] for r in result]
        theirs = list(native(rows))
        mx.eval(ours, theirs)
        pairs = [(np.array(a), np.array(b)) for a, b in zip(ours, theirs, strict=True)]
        alike = [a.shape == b.shape and a.dtype == b.dtype for a, b in pairs]
        same = all(alike)
        # the share of equal bytes in each array (1.0 exactly when every byte is equal; 0 if unlike), averaged
        identical = sum(float((a.view(np.uint8) == b.view(np.uint8)).mean()) if s else 0.0
                        for s, (a, b) in zip(alike, pairs, strict=True)) / len(pairs)
        passed = identical == 1.0
        diff = 0.0 if passed else float("inf")
        if same and not passed:  # how far apart the two decode: each through MLX's own dequantization
            a, b = (mx.dequantize(q, sc, None, group_size=32, bits=8, mode="mxfp8", dtype=mx.float32)
                    for q, sc in (ours, theirs))
            with np.errstate(invalid="ignore"):
                diff = float(np.nanmax(np.abs(np.array(a, np.float64) - np.array(b, np.float64))))
        self.first_case[key] = self.case
        self.results[key] = {
            "kernel": kind, "how": kernels.in_use().get(kind, ""), "k": k, "n": n, "rows": int(idx.size),
            "output_dtype": "/".join(str(a.dtype) for a, _ in pairs), "exact": "bit for bit MLX's own",
            "max_abs_vs_exact": diff, "bound_ratio": 0.0 if passed else float("inf"),
            "mlx_bound_ratio": 0.0, "max_abs_vs_mlx": diff, "bit_identical_to_mlx": identical,
            "passed": passed, "first_nonfinite": None,
        }

    def merge(self, results: dict[tuple, dict], first_case: dict[tuple, int], used: dict[str, str]) -> None:
        """Take in another process's checks of the same run (``parity.jobs``): of two checks of one
        shape, the one from the earlier case in plan order, as one process would have kept."""
        for key, r in results.items():
            if key not in self.results or first_case[key] < self.first_case[key]:
                self.results[key], self.first_case[key] = r, first_case[key]
        self.used.update(used)

    def summary(self) -> dict:
        """The record's ``kernels`` section: what computed the candidate, and each check."""
        checks = sorted(self.results.values(), key=lambda r: (r["kernel"], r["k"], r["n"]))
        used = dict(sorted((self.used | kernels.in_use()).items()))
        return {"enabled": kernels.enabled(), "used": used, "rows_per_shape": self.rows,
                "checks": checks, "passed": all(c["passed"] for c in checks)}
