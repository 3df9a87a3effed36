"""Stage comparison, shaped like torch.testing's ``assert_close``. NumPy in, frozen dataclasses out.

No I/O, no logging, no framework imports. Both sides are upcast to float64 before subtracting;
"close" means ``|a - e| <= atol + rtol * |e|``; NaN/Inf on either side fails with its location.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Tol:
    """Both fields required (torch's rule): never one without the other."""

    rtol: float
    atol: float


@dataclass(frozen=True)
class StageDiff:
    stage: str
    passed: bool
    tolerance: Tol
    dtype: str  # the dtype the comparison is made in (for ULPs)
    shape: tuple[int, ...]
    numel: int = 0
    mismatched: int = 0
    max_abs: float = 0.0
    max_abs_index: tuple[int, ...] = ()
    max_rel: float = 0.0
    max_rel_index: tuple[int, ...] = ()
    mean_abs: float = 0.0
    p99_abs: float = 0.0
    max_ulp: int | None = 0  # None: every differing value's reference is under ulp_floor (ULPs mean nothing there)
    cosine: float = 1.0
    nmse_db: float | None = None  # None: no error at all (NMSE = 0, -inf dB)
    min_tolerance: dict = field(default_factory=dict)  # {"atol": at this rtol, "rtol": at this atol}
    error: str | None = None  # structural problem (shape, dtype kind, non-finite), when there is one

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["name"] = d.pop("stage")
        d["tolerance"] = {"rtol": self.tolerance.rtol, "atol": self.tolerance.atol}
        return {k: _json_float(v) for k, v in d.items()}

    def message(self) -> str:
        """torch ``_make_mismatch_msg`` layout."""
        head = f"Stage '{self.stage}' is not close!" if not self.passed else f"Stage '{self.stage}' is close."
        if self.error:
            return f"{head}\n\n{self.error}"
        t = self.tolerance
        return (f"{head}\n\n"
                f"Mismatched elements: {self.mismatched} / {self.numel} "
                f"({100 * self.mismatched / max(self.numel, 1):.1f}%)\n"
                f"Greatest absolute difference: {self.max_abs:.3g} at index {self.max_abs_index} "
                f"(up to {t.atol:g} allowed)\n"
                f"Greatest relative difference: {self.max_rel:.3g} at index {self.max_rel_index} "
                f"(up to {t.rtol:g} allowed)")


def _json_float(v):
    """JSON has no inf/NaN: inf becomes the string "inf", NaN null; tuples become lists."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (tuple, list)):
        return [_json_float(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_float(x) for k, x in v.items()}
    return v


def fmt(v, spec: str = ".3g", null: str = "nan") -> str:
    """The one number formatter of reports: a record number in ``spec``; strings ("inf", "missing")
    as they are; null as ``null`` ("nan" for a NaN the record stored as null, "exact" for an nmse_db)."""
    return v if isinstance(v, str) else (null if v is None else format(v, spec))


def _bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to ``dtype``, its bits as signed integers of the same width (a view when x is in it)."""
    if dtype == "bfloat16":
        import ml_dtypes  # here, not at the top: its import takes ~0.7 s, and most runs compare float32

        return x.astype(ml_dtypes.bfloat16).view(np.int16)
    if dtype == "float16":
        return x.astype(np.float16).view(np.int16)
    if dtype == "float64":
        return x.astype(np.float64, copy=False).view(np.int64)
    return x.astype(np.float32, copy=False).view(np.int32)


# the smallest positive normal number of each compared dtype; bfloat16 keeps float32's 8 exponent bits,
# so its smallest normal is float32's (``ml_dtypes.finfo(ml_dtypes.bfloat16).tiny``, tests/test_metrics.py)
SMALLEST_NORMAL = {
    "float32": float(np.finfo(np.float32).tiny), "float16": float(np.finfo(np.float16).tiny),
    "bfloat16": float(np.finfo(np.float32).tiny), "float64": float(np.finfo(np.float64).tiny)}


def ulp_floor(tol: Tol, dtype: str) -> float:
    """The smallest |reference| at which a stage's ULP distance is counted: the stage's ``atol``, and
    at least ``dtype``'s smallest normal number. Informational only: no verdict uses ULPs.

    A ULP is an error relative to the value's own spacing, which shrinks without bound towards zero:
    1e-6 off a reference of 1e-30 is 6.7e8 float32 ULPs, 1e-6 off 1.0 is 8. Under ``|e| < atol`` the
    stage's tolerance itself allows an error as large as the value (a relative error of 100 % and more
    passes there): the verdict is absolute, and a relative unit there only raises a false alarm. At
    ``|e| >= atol`` a passing error is at most ``atol + rtol |e| <= (1 + rtol) |e|``, about 2^24 float32
    ULPs (2^8 bfloat16) at most: the count stays on the scale of the dtype's precision. Exact stages
    (atol 0) count every normal value; below the smallest normal the spacing is constant (subnormals),
    an absolute unit, not a relative one. Integer values have no floor (:func:`compare` applies none).
    ``StageDiff.max_ulp`` is None when every differing value's reference is under the floor."""
    return max(tol.atol, SMALLEST_NORMAL.get(dtype, SMALLEST_NORMAL["float32"]))


def max_ulp(actual: np.ndarray, expected: np.ndarray, dtype: str) -> int:
    """The largest distance in ULPs of ``dtype`` between paired values (-0.0 and +0.0 are one point).

    Floats are sign and magnitude: of two values of one sign the bit patterns differ by their distance
    (the sign bit cancels), so one integer subtraction covers them; of opposite signs, the distance is
    the sum of the two magnitudes (the rare pairs are gathered for it)."""
    if actual.size == 0:
        return 0
    if not np.issubdtype(expected.dtype, np.floating):
        return int(np.abs(actual.astype(np.int64) - expected.astype(np.int64)).max())
    ba, be = _bits(actual, dtype).reshape(-1), _bits(expected, dtype).reshape(-1)
    d = np.subtract(ba, be, dtype=np.int64)
    signs = np.bitwise_xor(ba, be)  # negative where the signs differ
    if signs.min() >= 0:
        return int(max(d.max(), -d.min()))
    opposite = signs < 0
    magnitude = np.iinfo(ba.dtype).max
    # unsigned: across the sign, float64 distances pass 2^63
    cross = (ba[opposite] & magnitude).astype(np.uint64) + (be[opposite] & magnitude).astype(np.uint64)
    same = d[~opposite]
    return max(int(cross.max()), int(same.max(initial=0)), -int(same.min(initial=0)))


def _nonfinite(actual: np.ndarray, expected: np.ndarray) -> str | None:
    for side, x in (("candidate", actual), ("reference", expected)):
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            idx = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
            count = int((~np.isfinite(x)).sum())
            return f"Non-finite values on the {side} side: {count}, the first {x[idx]} at index {idx}"
    return None


def compare(stage: str, actual: np.ndarray, expected: np.ndarray, tol: Tol, dtype: str = "float32",
            workers: int = 1) -> StageDiff:
    """Compare one stage. ``dtype`` is the dtype the values were computed in (ULP unit). ``workers``:
    threads for a large array (NumPy releases the GIL); the result does not depend on it."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return StageDiff(stage, False, tol, dtype, tuple(expected.shape), numel=int(expected.size),
                         error=f"Shape mismatch: candidate {tuple(actual.shape)}, reference {tuple(expected.shape)}")
    kinds = {np.dtype(actual.dtype).kind, np.dtype(expected.dtype).kind}
    if len(kinds - {"i", "u", "b"}) and len(kinds & {"i", "u", "b"}):
        return StageDiff(stage, False, tol, dtype, tuple(expected.shape), numel=int(expected.size),
                         error=f"Dtype mismatch: candidate {actual.dtype}, reference {expected.dtype}")
    n = int(expected.size)
    if n == 0:
        return StageDiff(stage, True, tol, dtype, tuple(expected.shape))
    flat_a, flat_e = actual.reshape(-1), expected.reshape(-1)
    starts = list(range(0, n, CHUNK))
    groups = [starts[i:i + GROUP] for i in range(0, len(starts), GROUP)]  # fixed: the sums' order too
    if _same_bits(flat_a, flat_e):
        same = _identical(stage, flat_e, groups, tol, dtype, tuple(expected.shape))
        if same is not None:
            return same
    diffs = np.empty(n, np.float32)

    def run(group: list[int]) -> _Accumulator:
        acc = _Accumulator(tol, dtype, diffs)
        scratch = _Scratch(min(CHUNK, n))  # one per unit of work, freed with it (not held until the merge)
        for start in group:
            acc.add(flat_a[start:start + CHUNK], flat_e[start:start + CHUNK], start, scratch)
        return acc

    with np.errstate(invalid="ignore", over="ignore"):  # non-finite values are reported below, not warned
        if workers > 1 and len(groups) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                parts = list(pool.map(run, groups))
        else:
            parts = [run(g) for g in groups]
    for part in parts[1:]:
        parts[0].merge(part)
    if not math.isfinite(parts[0].act2 + parts[0].ref2):  # a NaN or Inf on either side (float64 sums of
        bad = _nonfinite(actual, expected)               # float32 squares cannot overflow): find and name it
        return StageDiff(stage, False, tol, dtype, tuple(expected.shape), numel=n, error=bad)
    return parts[0].result(stage, tuple(expected.shape))


def _same_bits(a: np.ndarray, e: np.ndarray) -> bool:
    """Are two flat arrays of one dtype the same bytes? (A block at a time: the first difference ends it.)"""
    if a.dtype != e.dtype or a.dtype.itemsize not in (1, 2, 4, 8):
        return False
    bits = np.dtype(f"u{a.dtype.itemsize}")
    step = CHUNK * GROUP
    return all(np.array_equal(np.ascontiguousarray(a[i:i + step]).view(bits),
                              np.ascontiguousarray(e[i:i + step]).view(bits)) for i in range(0, a.size, step))


def _identical(stage: str, flat: np.ndarray, groups: list[list[int]], tol: Tol, dtype: str,
               shape: tuple[int, ...]) -> StageDiff | None:
    """The StageDiff the chunked statistics give two bit-identical arrays, from one pass (the sum of squares
    in the same chunks and order: the cosine is S / (sqrt(S) sqrt(S)), the same float); None when the values
    are not all finite (then the full path names them). A bit-exact stage costs ~1/8 of a compare."""
    buf = np.empty(min(CHUNK, flat.size), np.float64)
    total = None
    for group in groups:
        part = 0.0
        for start in group:
            chunk = buf[:min(CHUNK, flat.size - start)]
            np.copyto(chunk, flat[start:start + CHUNK], casting="unsafe")
            part += float(np.einsum("i,i->", chunk, chunk))
        total = part if total is None else total + part
    if not math.isfinite(total):
        return None
    norm = math.sqrt(total)
    first = tuple(int(i) for i in np.unravel_index(0, shape))
    return StageDiff(stage, True, tol, dtype, shape, numel=int(flat.size), max_abs=0.0, max_abs_index=first,
                     max_rel=0.0, max_rel_index=first, mean_abs=0.0, p99_abs=0.0,
                     cosine=1.0 if norm == 0 else total / (norm * norm), nmse_db=None, max_ulp=0,
                     min_tolerance={"atol": 0.0, "rtol": 0.0})


GROUP = 8  # chunks per unit of work (a thread's share)
CHUNK = 1 << 17  # elements per step: four float64 scratch arrays of 1 MiB per unit of work, reused (fresh
# temporaries were page-faulted on every call). Smaller chunks make NumPy calls so short that two workers
# serialise on the GIL (measured with both workers on 33.5M values: 0.38 s at 2^17, 0.41 s at 2^16)


PERCENTILE_BLOCK = 1 << 22  # values per step of percentile()'s count and gather


def percentile(x: np.ndarray, q: float) -> float:
    """``np.percentile(x, q)`` (linear interpolation) of a flat array: the same number for float32 (within
    3e-14 relative for float64). Below 2^16 values, one partition (3.7 us against np.percentile's 44 us
    at 640 values, ``timeit``). Above, found by selecting among the values above a threshold taken from a
    strided sample (a pass to count, one to gather), not by partitioning the whole array (~13 ns per
    value at 4M values; this: ~2). Falls back to ``np.percentile`` when the sample misjudges (the
    threshold is above the value sought)."""
    n = x.size
    frac = q / 100
    pos = n * frac + (1 + frac * (1 - 2)) - 1  # NumPy's virtual index for "linear" (alpha = beta = 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    if n < 1 << 16:  # the two order statistics by one partition (np.percentile's overhead is ~20x that here)
        top = np.partition(x, (lo, hi))
        return _lerp(top[lo], top[hi], pos - lo)
    sample = np.sort(x[:: n >> 14])
    threshold = sample[max(int(len(sample) * (frac - 0.01)), 0)]  # one point below: ~1 % of the values above it
    blocks = [x[i:i + PERCENTILE_BLOCK] for i in range(0, n, PERCENTILE_BLOCK)]  # boolean temporaries: not n bytes
    below = sum(int(np.count_nonzero(b < threshold)) for b in blocks)
    if below > lo:
        return float(np.percentile(x, q))
    top = np.partition(np.concatenate([b[b >= threshold] for b in blocks]), (lo - below, hi - below))
    return _lerp(top[lo - below], top[hi - below], pos - lo)


def _lerp(a, b, gamma: float) -> float:
    """NumPy's ``_lerp`` of two order statistics: their difference in the array's dtype, then the weight."""
    diff_b_a = b - a
    return float(b - diff_b_a * (1 - gamma) if gamma >= 0.5 else a + diff_b_a * gamma)


class _Scratch:
    """float64 work arrays for :meth:`_Accumulator.add`, reused from chunk to chunk (fresh temporaries
    cost page faults)."""

    def __init__(self, size: int):
        self.floats = [np.empty(size, np.float64) for _ in range(4)]
        self.mask = np.empty(size, bool)


class _Accumulator:
    """The statistics of ``compare`` over flat chunks (so a 1 GiB logits array needs no float64 copy).
    Every statistic is exact over the chunks except p99, taken over float32 copies of |a - e|."""

    def __init__(self, tol: Tol, dtype: str, diffs: np.ndarray):
        self.tol, self.dtype, self.diffs = tol, dtype, diffs  # diffs: |a - e| of the whole array, float32
        self.n = diffs.size
        self.mismatched = self.ulp = 0
        self.abs = (-1.0, 0)  # (value, flat index): the first maximum, as argmax
        self.rel = (-1.0, 0)
        self.sum_abs = self.err2 = self.ref2 = self.act2 = self.dot = 0.0
        self.need_atol = self.need_rtol = 0.0

    def merge(self, other: _Accumulator) -> None:
        """Fold in the statistics of a later part of the array."""
        self.mismatched += other.mismatched
        self.ulp = max(self.ulp, other.ulp)
        if other.abs[0] > self.abs[0]:
            self.abs = other.abs
        if other.rel[0] > self.rel[0]:
            self.rel = other.rel
        for k in ("sum_abs", "err2", "ref2", "act2", "dot"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.need_atol = max(self.need_atol, other.need_atol)
        self.need_rtol = max(self.need_rtol, other.need_rtol)

    def add(self, actual: np.ndarray, expected: np.ndarray, offset: int, scratch: _Scratch) -> None:
        # One pass per statistic where it can be had (NumPy cannot fuse), into the scratch arrays
        tol, n = self.tol, actual.size
        a, e, diff, work = (buf[:n] for buf in scratch.floats)
        np.copyto(a, actual, casting="unsafe")
        np.copyto(e, expected, casting="unsafe")
        # einsum's own loop, not BLAS: a BLAS dot on a worker thread opens an OpenMP team per call
        self.ref2 += float(np.einsum("i,i->", e, e))
        self.act2 += float(np.einsum("i,i->", a, a))
        self.dot += float(np.einsum("i,i->", a, e))
        np.subtract(a, e, out=diff)
        np.abs(diff, out=diff)
        self.err2 += float(np.einsum("i,i->", diff, diff))
        self.sum_abs += float(diff.sum())
        mag = np.abs(e, out=e)
        slack = np.multiply(mag, tol.rtol, out=a)  # |e| * rtol; allowed = atol + slack
        self.need_atol = max(self.need_atol, float(np.subtract(diff, slack, out=work).max()))
        slack += tol.atol
        self.mismatched += int(np.count_nonzero(np.greater(diff, slack, out=scratch.mask[:n])))
        i = int(diff.argmax())
        top_diff = float(diff[i])
        if top_diff > self.abs[0]:
            self.abs = (top_diff, offset + i)
        with np.errstate(divide="ignore", invalid="ignore"):
            # relative error: 0/0 (equal zeros) is NaN here, which fmax skips: it counts as 0
            rel = np.divide(diff, mag, out=work)
            top = float(np.fmax.reduce(rel))
            top = 0.0 if math.isnan(top) else top
            if top > self.rel[0]:  # the first index of the maximum (0 when it is 0: every value is 0 or 0/0)
                self.rel = (top, offset + (int(np.argmax(rel == top)) if top > 0 else 0))
            if top_diff > tol.atol:  # rtol needed at this atol: (|a-e| - atol) / |e| where |a-e| > atol
                np.subtract(diff, tol.atol, out=rel)  # (elsewhere <= 0 or NaN, which cannot raise it)
                rel /= mag
                self.need_rtol = max(self.need_rtol, float(np.fmax.reduce(rel)))
        self.diffs[offset:offset + n] = diff
        if top_diff > 0:  # else every pair is equal: 0 ULPs (-0.0 and +0.0 are one point)
            self.ulp = max(self.ulp, self._ulp(actual, expected, mag, scratch.mask[:n]))

    def _ulp(self, actual: np.ndarray, expected: np.ndarray, mag: np.ndarray, keep: np.ndarray) -> int:
        """The largest ULP distance of the pairs whose |reference| (``mag``) is at least :func:`ulp_floor`
        (every pair of integer values); 0 when there are none."""
        if not np.issubdtype(expected.dtype, np.floating):
            return max_ulp(actual, expected, self.dtype)
        np.greater_equal(mag, ulp_floor(self.tol, self.dtype), out=keep)
        if keep.all():
            return max_ulp(actual, expected, self.dtype)
        return max_ulp(actual[keep], expected[keep], self.dtype) if keep.any() else 0

    def result(self, stage: str, shape: tuple[int, ...]) -> StageDiff:
        na, ne = math.sqrt(self.act2), math.sqrt(self.ref2)
        cosine = 1.0 if na == ne == 0 else (0.0 if na == 0 or ne == 0 else self.dot / (na * ne))
        if self.err2 == 0:
            nmse_db = None
        elif self.ref2 == 0:
            nmse_db = math.inf
        else:
            nmse_db = 10 * math.log10(self.err2 / self.ref2)
        p99 = percentile(self.diffs, 99)
        return StageDiff(
            stage, self.mismatched == 0, self.tol, self.dtype, shape, numel=self.n, mismatched=self.mismatched,
            max_abs=self.abs[0], max_abs_index=tuple(int(i) for i in np.unravel_index(self.abs[1], shape)),
            max_rel=self.rel[0], max_rel_index=tuple(int(i) for i in np.unravel_index(self.rel[1], shape)),
            mean_abs=self.sum_abs / self.n, p99_abs=p99, cosine=cosine, nmse_db=nmse_db,
            max_ulp=self.ulp if self.ulp or self.abs[0] == 0 else None,  # 0: all equal; None: no ULP to show
            min_tolerance={"atol": max(self.need_atol, 0.0), "rtol": self.need_rtol},
        )


def compare_all(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                stages: Iterable[tuple[str, Tol]], dtype: str = "float32") -> list[StageDiff]:
    """Every stage in the given (forward) order. A stage missing on either side is a failed diff."""
    return [compare(name, actual[name], expected[name], tol, dtype)
            if name in actual and name in expected else missing(name, tol, dtype, actual, expected)
            for name, tol in stages]


def missing(name: str, tol: Tol, dtype: str, actual: Mapping, expected: Mapping) -> StageDiff:
    """The failed diff of a stage absent from the candidate's and/or the reference's capture."""
    side = [s for s, cap in (("candidate", actual), ("reference", expected)) if name not in cap]
    return StageDiff(name, False, tol, dtype, (), error=f"Stage missing on the {' and '.join(side)} side")


def missing_and_extra(actual: Mapping, expected: Mapping) -> tuple[list[str], list[str]]:
    """(missing in candidate, extra in candidate), both sorted (torch's mapping branch)."""
    return sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())


def first_divergence(diffs: Iterable[StageDiff]) -> StageDiff | None:
    """The first failing stage in forward order: once stage N-1 drifts, stage N will too."""
    return next((d for d in diffs if not d.passed), None)


UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11, "float64": 2.0**-53}


def oracle_distance(reference: np.ndarray, candidate: np.ndarray, oracle: np.ndarray, dtype: str = "float32"
                    ) -> dict | None:
    """Both sides' distance to the float64 oracle, as the largest absolute difference and as the RMS
    difference, and ``ratio``: the candidate's RMS distance over the reference's, the reference's floored
    at one unit roundoff of ``dtype`` times the oracle's RMS (a reference that rounds exactly to the
    oracle does not make any candidate error infinitely worse); an all-zero oracle floors it at one unit
    roundoff absolute (values at unit scale), so that an exact-zero stage is not failed by any nonzero
    error of the candidate's however small. None: shapes differ or a value is not finite."""
    r, c, o = (np.asarray(x) for x in (reference, candidate, oracle))
    if not (r.shape == c.shape == o.shape) or o.size == 0:
        return None
    o = o.astype(np.float64, copy=False)
    stats = []
    for side in (r, c):
        d = np.subtract(side, o, dtype=np.float64)  # widened element by element: one temporary
        top = float(np.abs(d, out=d).max())
        stats.append((top, math.sqrt(float(np.einsum("i,i->", d.reshape(-1), d.reshape(-1))) / d.size)))
    (ref_top, ref_rms), (cand_top, cand_rms) = stats
    scale = math.sqrt(float(np.einsum("i,i->", o.reshape(-1), o.reshape(-1))) / o.size)
    # a non-finite value anywhere makes a maximum or a sum of squares non-finite (NaN - x is NaN, inf - inf too)
    if not all(map(math.isfinite, (ref_top, cand_top, ref_rms, cand_rms, scale))):
        return None
    floor = UNIT_ROUNDOFF.get(dtype, 2.0**-24) * (scale if scale > 0 else 1.0)
    return {"reference_max_abs": ref_top, "candidate_max_abs": cand_top,
            "reference_rms": ref_rms, "candidate_rms": cand_rms, "floor": floor,
            "ratio": cand_rms / max(ref_rms, floor)}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k largest values; ties at the boundary go to the lower index (what a
    stable argsort of -x keeps). A partition, not a sort: O(V) per row."""
    neg = -x
    kth = np.partition(neg, k - 1, axis=-1)[:, k - 1]
    out = np.empty((x.shape[0], k), np.int64)
    for r, (row, t) in enumerate(zip(neg, kth, strict=True)):
        idx = np.flatnonzero(row <= t)
        out[r] = idx[np.argsort(row[idx], kind="stable")][:k]
    return out


def logits_agreement(actual: np.ndarray, expected: np.ndarray, k: int = 5, per_position: bool = False,
                     workers: int = 1, tie_margin: float | None = None) -> dict:
    """Next-token agreement over every position of (..., V) logits, the statistics of llama.cpp's
    ``perplexity --kl-divergence`` (:func:`logit_statistics`). ``per_position``: also ``"positions_data"``,
    the per-position arrays (not JSON) that :func:`logit_statistics` pools over a run, and ``"kl"``.
    Positions are taken a few at a time (float64 softmax temporaries stay small at any vocabulary), on
    ``workers`` threads; the result does not depend on their number. A position where either side has a
    NaN or Inf counts as a top-1 disagreement with infinite KL (``nonfinite_positions``)."""
    a = actual.reshape(-1, actual.shape[-1])
    e = expected.reshape(-1, expected.shape[-1])
    k = min(k, e.shape[-1])
    rows = max(1, (CHUNK * 4) // max(e.shape[-1], 1))

    def block(start: int):
        ca, ce = a[start:start + rows].astype(np.float64), e[start:start + rows].astype(np.float64)
        bad = ~(np.isfinite(ca).all(-1) & np.isfinite(ce).all(-1))
        ca[bad], ce[bad] = 0.0, 0.0  # placeholders: their statistics are set below
        la, le = _log_softmax(ca), _log_softmax(ce)
        kl = (np.exp(le) * (le - la)).sum(-1)
        overlap = np.array([len(set(x) & set(y)) / k for x, y in zip(_topk(ca, k), _topk(ce, k), strict=True)])
        r = np.arange(len(ce))
        top, cand_top = ce.argmax(-1), ca.argmax(-1)
        same = top == cand_top
        dp = np.exp(la[r, top]) - np.exp(le[r, top])  # the candidate's probability of the reference's token
        margin = le[r, top] - le[r, cand_top]  # how far the reference prefers its token over the candidate's
        err = np.abs(ca - ce)
        kl[bad], same[bad], overlap[bad], dp[bad], margin[bad] = np.inf, False, 0.0, np.nan, np.inf
        return kl, overlap, same, dp, margin, np.where(bad, np.inf, err.max(-1))

    starts = range(0, e.shape[0], rows)
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(block, starts))
    else:
        parts = [block(s) for s in starts]
    data = {key: np.concatenate([p[i] for p in parts])
            for i, key in enumerate(("kl", "overlap", "same", "dp", "margin", "err"))}
    out = logit_statistics(data, k, tie_margin)
    if per_position:
        out["kl"] = data["kl"]
        out["positions_data"] = data
    return out


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if x.size else math.nan


def logit_statistics(data: Mapping[str, np.ndarray], k: int = 5, tie_margin: float | None = None) -> dict:
    """Summary statistics of per-position logit agreement (``data`` from :func:`logits_agreement`,
    one case's or several concatenated):

    - ``top1_agreement`` ("same top p") and its standard error;
    - KL(reference || candidate) in nats: mean and its standard error, median, p90, p99, p99.9, max;
    - Δp, the candidate's minus the reference's probability of the reference's top token: mean, p1,
      p99, max |Δp|;
    - the mean top-k overlap;
    - near-tie-aware top-1: ``top1_flips`` positions where the argmax differs, of which
      ``top1_flips_decisive`` at a reference log-prob margin above ``tie_margin``, twice the 99th
      percentile of the per-position max |Δlogit| (a logit error of the typical size flips no wider
      margin). A near-tie flip is noise; a decisive one is a defect. ``tie_margin`` given: that margin
      instead (a decode step's one position takes its prefill's, measured over every prompt position).
    """
    kl, same, dp = data["kl"], data["same"], data["dp"]
    n = int(kl.size)
    finite = np.isfinite(kl)
    fk, fdp = kl[finite], dp[np.isfinite(dp)]
    p = float(same.mean()) if n else math.nan
    err = data["err"][np.isfinite(data["err"])]
    tie = tie_margin if tie_margin is not None else 2 * _pct(err, 99) if err.size else 0.0
    flips = ~same
    decisive = flips & (data["margin"] > tie)
    return {
        "positions": n, "nonfinite_positions": int(n - finite.sum()),
        "first_nonfinite_position": int(np.flatnonzero(~finite)[0]) if n > finite.sum() else None,
        "top1_agreement": p, "top1_agreement_se": math.sqrt(p * (1 - p) / n) if n else math.nan,
        "top1_flips": int(flips.sum()), "top1_flips_decisive": int(decisive.sum()), "tie_margin": tie,
        "kl_mean": float(kl.mean()) if n else math.nan,
        "kl_se": float(fk.std(ddof=1) / math.sqrt(fk.size)) if fk.size > 1 else 0.0,
        "kl_median": _pct(fk, 50), "kl_p90": _pct(fk, 90), "kl_p99": _pct(fk, 99), "kl_p999": _pct(fk, 99.9),
        "kl_max": float(kl.max()) if n else math.nan,
        "dp_mean": float(fdp.mean()) if fdp.size else math.nan, "dp_p1": _pct(fdp, 1), "dp_p99": _pct(fdp, 99),
        "dp_max_abs": float(np.abs(fdp).max()) if fdp.size else math.nan,
        f"top{k}_overlap": float(data["overlap"].mean()) if n else math.nan,
    }
