"""Capture on the rmlx side, through the one seam ``rmlx.tap``.

``record()`` returns a handler that stores every tapped value as NumPy; ``teacher(reference)``
does the same and hands the *reference's* value back to the model, so each candidate stage is fed
the reference's input to that stage (its error is then its own).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import rmlx  # noqa: F401  (before mlx: it loads the BLAS MLX calls, rmlx/blas.py)

# isort: split
import mlx.core as mx
import numpy as np

Capture = dict[str, np.ndarray]  # keyed by public stage name


def to_numpy(x: Any) -> np.ndarray:
    """mx.array or ndarray -> a C-contiguous ndarray copy (bf16 widened to float32 exactly). An mx.array is
    copied through its buffer (``memoryview``): 2.6x faster than ``np.array(x)``'s conversion (0.15 against
    0.39 s for 15360 x 3840 float32; 2.9 against 11.4 us for 10 x 64, ``time.perf_counter`` over repeats)."""
    if isinstance(x, mx.array):
        if x.dtype == mx.bfloat16:
            x = x.astype(mx.float32)
        return np.array(memoryview(x), order="C")
    return np.array(x, copy=True)


def like(value: np.ndarray, x: Any) -> Any:
    """``value`` in the type and dtype of ``x`` (an mx.array or an ndarray)."""
    if isinstance(x, mx.array):
        return mx.array(value).astype(x.dtype)
    return np.asarray(value).astype(x.dtype)


_WATCHERS: list[list] = []


@contextmanager
def watching() -> Iterator[list]:
    """Collect every :class:`Recorder` made inside the block (the runner reads the candidate's partial
    capture from it when the candidate raises)."""
    seen: list = []
    _WATCHERS.append(seen)
    try:
        yield seen
    finally:
        _WATCHERS.remove(seen)


DEFER_BYTES = 64 << 20  # a deferring Recorder evaluates and copies what it holds once it holds this much


class Recorder:
    """A ``tap`` handler. With ``reference`` set it teacher-forces: records the candidate's value,
    returns the reference's (when the shapes agree; otherwise the candidate's own, and the
    comparison reports the shape mismatch).

    ``defer``: hold each tapped mx.array unevaluated (a ``stop_gradient`` node of its own, so a later
    ``x[...] = v`` in the port, which rebinds ``x``, cannot change it) and evaluate them together in
    :meth:`settled` (or once ``DEFER_BYTES`` are held): one evaluation per forward instead of one per
    stage, the same kernels on the same inputs, so the same values. On a tiny checkpoint MLX's
    per-evaluation overhead is most of the port's time (the self-test's 8 cases in teacher mode: 263 ms
    evaluated at every tap, 188 ms deferred). Without it, each stage is evaluated as it is tapped."""

    def __init__(self, reference: Capture | None = None, defer: bool = False):
        self.capture: Capture = {}
        self.reference = reference
        self.defer = defer
        self._held = 0  # bytes of unevaluated captures
        for seen in _WATCHERS:
            seen.append(self)
        self.seconds = 0.0  # spent copying captures out (a harness cost, not the model's)

    def __call__(self, name: str, x: Any) -> Any:
        if isinstance(x, mx.array) and self.defer:
            self.capture[name] = mx.stop_gradient(x)
            self._held += x.nbytes
            if self._held >= DEFER_BYTES:
                self.settled()
        else:
            if isinstance(x, mx.array):
                mx.eval(x)  # the model's own work (MLX is lazy), so that only the copy below is timed
            t0 = time.perf_counter()
            self.capture[name] = to_numpy(x)
            self.seconds += time.perf_counter() - t0
        if self.reference is not None and name in self.reference:
            ref = self.reference[name]
            if tuple(ref.shape) == tuple(x.shape):
                return like(ref, x)
        return x

    def settled(self) -> Capture:
        """The capture as NumPy, every deferred value evaluated (together) and copied. A value whose
        evaluation raises (the port raised while computing it) is left out, as a stage never reached."""
        lazy = {k: v for k, v in self.capture.items() if isinstance(v, mx.array)}
        if lazy:
            try:
                mx.eval(*lazy.values())
            except Exception:
                for k, v in lazy.items():
                    try:
                        mx.eval(v)
                    except Exception:
                        del self.capture[k]
            t0 = time.perf_counter()
            for k in lazy:
                if k in self.capture:
                    self.capture[k] = to_numpy(self.capture[k])
            self.seconds += time.perf_counter() - t0
            self._held = 0
        return self.capture
