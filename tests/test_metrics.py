"""Properties of parity.metrics.compare (torch.testing semantics, plus ULPs and min tolerance)."""

import math

import hypothesis.extra.numpy as nps
import hypothesis.strategies as st
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given

from parity.metrics import (
    SMALLEST_NORMAL,
    StageDiff,
    Tol,
    compare,
    compare_all,
    first_divergence,
    max_ulp,
    missing_and_extra,
    percentile,
    ulp_floor,
)

F32 = nps.arrays(np.float32, nps.array_shapes(max_dims=4, max_side=16),
                 elements=st.floats(-1e3, 1e3, width=32, allow_nan=False))


@given(F32)
def test_identity_passes_with_zero_tolerance(x):
    d = compare("s", x, x.copy(), Tol(0.0, 0.0))
    assert d.passed and d.max_abs == 0 and d.mismatched == 0 and d.max_ulp == 0
    assert d.nmse_db is None


@given(st.data())
def test_min_tolerance_is_the_boundary(data):
    """The reported minimum atol passes at the stage's rtol; anything clearly smaller fails."""
    e = data.draw(F32, label="expected")
    small = st.floats(-0.0078125, 0.0078125, width=32)
    noise = data.draw(nps.arrays(np.float32, e.shape, elements=small), label="noise")
    a = e + noise
    tol = Tol(rtol=1e-4, atol=0.0)
    d = compare("s", a, e, tol)
    need = d.min_tolerance["atol"]
    assert compare("s", a, e, Tol(tol.rtol, need * (1 + 1e-12) + 1e-300)).passed
    if need > 0:
        assert not compare("s", a, e, Tol(tol.rtol, need * 0.5)).passed


def test_shape_mismatch_is_its_own_error():
    d = compare("s", np.zeros((2, 3)), np.zeros((3, 2)), Tol(1e-6, 1e-6))
    assert not d.passed and "Shape mismatch" in d.error and "(2, 3)" in d.error and "(3, 2)" in d.error


@pytest.mark.parametrize("bad,side", [(np.nan, "candidate"), (np.inf, "candidate")])
def test_nonfinite_fails_with_location(bad, side):
    a = np.zeros((2, 3), np.float32)
    a[1, 2] = bad
    d = compare("s", a, np.zeros((2, 3), np.float32), Tol(1.0, 1.0))
    assert not d.passed and side in d.error and "(1, 2)" in d.error


def test_closeness_rule_and_indices():
    e = np.array([[1.0, 64.0], [0.0, -2.0]])
    a = e + np.array([[2.0**-10, 2.0**-11], [0.0, 0.0]])  # exact binary offsets
    d = compare("s", a, e, Tol(rtol=1e-5, atol=1e-4))
    # |a-e| <= atol + rtol*|e|: 9.8e-4 > 1e-4 + 1e-5 at (0, 0); 4.9e-4 <= 1e-4 + 6.4e-4 at (0, 1)
    assert d.mismatched == 1 and d.max_abs_index == (0, 0)
    assert d.max_rel == pytest.approx(2.0**-10) and d.max_rel_index == (0, 0)
    assert "Mismatched elements: 1 / 4" in d.message()


def test_ulp_distance_float32_and_bfloat16():
    x = np.array([1.0, -1.0, 0.0], np.float32)
    y = np.nextafter(x, np.float32(np.inf))
    assert max_ulp(y, x, "float32") == 1
    one_bf16_ulp = float(np.array(1.0, ml_dtypes.bfloat16) + np.array(2**-7, ml_dtypes.bfloat16)) - 1.0
    assert one_bf16_ulp == 2**-7
    assert max_ulp(np.array([1.0 + 2**-7]), np.array([1.0]), "bfloat16") == 1
    assert max_ulp(np.array([1.0 + 2**-7]), np.array([1.0]), "float32") == 2**16


@given(pair=st.integers(1, 64).flatmap(lambda n: st.tuples(*[nps.arrays(
    np.float32, n, elements=st.floats(width=32, allow_nan=False, allow_infinity=False))] * 2)),
    dtype=st.sampled_from(["float32", "bfloat16", "float64"]))
def test_ulp_distance_is_the_steps_between_on_the_number_line(pair, dtype):
    """Oracle: each float's signed position on the number line (-0.0 and +0.0 the same point), the
    distance their difference -- what max_ulp computes without that mapping (by the sign bits)."""
    a, e = pair
    cast = {"float32": np.float32, "float64": np.float64, "bfloat16": ml_dtypes.bfloat16}[dtype]
    ints = {"float32": np.int32, "float64": np.int64, "bfloat16": np.int16}[dtype]

    def position(x):  # Python ints: across the sign, float64 distances pass 2^63
        return [-(b & np.iinfo(ints).max) if b < 0 else b for b in x.astype(cast).view(ints).tolist()]

    assert max_ulp(a, e, dtype) == max(abs(p - q) for p, q in zip(position(a), position(e), strict=True))


def test_cosine_and_nmse():
    e = np.array([1.0, 2.0, 3.0])
    d = compare("s", e * 1.001, e, Tol(0, 0))
    assert d.cosine == pytest.approx(1.0)
    assert d.nmse_db == pytest.approx(10 * math.log10(1e-6), abs=1e-6)


def test_collect_all_and_first_divergence_in_forward_order():
    cap = {"a": np.zeros(3), "b": np.zeros(3), "c": np.zeros(3)}
    cand = {"a": np.zeros(3), "b": np.ones(3), "c": np.ones(3)}
    diffs = compare_all(cand, cap, [("a", Tol(0, 0)), ("b", Tol(0, 0)), ("c", Tol(0, 0))])
    assert [d.passed for d in diffs] == [True, False, False]
    assert first_divergence(diffs).stage == "b"
    assert isinstance(diffs[0], StageDiff) and bool(diffs[0])


def test_missing_stage_is_reported_not_ignored():
    diffs = compare_all({"a": np.zeros(1)}, {"a": np.zeros(1), "b": np.zeros(1)}, [("a", Tol(0, 0)), ("b", Tol(0, 0))])
    assert not diffs[1].passed and "candidate" in diffs[1].error
    assert missing_and_extra({"a": 1, "x": 1}, {"a": 1, "b": 1}) == (["b"], ["x"])


def test_to_dict_is_json_safe():
    import json

    e = np.array([0.0, 1.0])
    d = compare("s", np.array([1.0, 1.0]), e, Tol(0.0, 0.5))  # needs infinite rtol at e == 0
    json.dumps(d.to_dict(), allow_nan=False)
    assert d.to_dict()["min_tolerance"]["rtol"] == "inf"


def test_ulps_are_not_counted_where_the_reference_is_near_zero():
    """1e-6 off a reference of 1e-30 is 6.7e8 float32 ULPs: an alarm about nothing, since the stage's
    atol allows 100 % relative error there. Only values with |reference| >= ulp_floor (the stage's
    atol, at least the dtype's smallest normal) count; with none among the differing ones: None."""
    tol = Tol(rtol=1.3e-6, atol=2e-4)
    e = np.full(16, 1e-30, np.float32)
    a = e + np.float32(1e-6)
    assert max_ulp(a, e, "float32") == 669250909  # the raw distance
    d = compare("s", a, e, tol)
    assert d.passed and d.max_ulp is None and d.to_dict()["max_ulp"] is None
    # values not near zero: an ordinary count, the raw distance over those elements only
    e2 = np.concatenate([e, np.linspace(0.5, 2.0, 16, dtype=np.float32)])
    a2 = np.concatenate([a, np.nextafter(e2[16:], np.float32(np.inf))])  # one ULP up
    assert compare("s", a2, e2, tol).max_ulp == 1
    assert compare("s", e2, e2.copy(), tol).max_ulp == 0  # all equal: 0 whatever the magnitudes
    # the floor is the stage's atol, at least the dtype's smallest normal (exact stages count every normal)
    assert ulp_floor(tol, "float32") == 2e-4
    assert ulp_floor(Tol(0.0, 0.0), "float32") == SMALLEST_NORMAL["float32"] == float(np.finfo(np.float32).tiny)
    assert ulp_floor(Tol(0.0, 0.0), "float16") == float(np.finfo(np.float16).tiny)
    assert SMALLEST_NORMAL["bfloat16"] == float(ml_dtypes.finfo(ml_dtypes.bfloat16).tiny)  # (not imported there)
    assert compare("s", a, e, Tol(0.0, 0.0)).max_ulp > 1e8  # an exact stage: 1e-30 is a normal float32
    sub = np.full(4, 1e-40, np.float32)  # subnormal references: under every floor
    assert compare("s", sub * 2, sub, Tol(0.0, 0.0)).max_ulp is None
    # integers have no floor
    assert compare("s", np.array([0, 1, 3]), np.array([0, 1, 2]), Tol(0.0, 0.0)).max_ulp == 1


def test_ulp_floor_never_changes_the_verdict():
    """ULPs are informational: the same arrays pass or fail, mismatch for mismatch, whatever max_ulp is."""
    rng = np.random.default_rng(3)
    e = (rng.standard_normal(4096) * np.logspace(-30, 1, 4096)).astype(np.float32)
    for scale in (1e-7, 1e-4, 1e-2):
        a = (e + rng.standard_normal(e.shape) * scale).astype(np.float32)
        for tol in (Tol(1.3e-6, 2e-4), Tol(0.0, 0.0), Tol(1.6e-2, 1.5)):
            d = compare("s", a, e, tol)
            diff = np.abs(a.astype(np.float64) - e)
            assert d.mismatched == int((diff > tol.atol + tol.rtol * np.abs(e.astype(np.float64))).sum())
            assert d.passed == (d.mismatched == 0)


def _oracle(a: np.ndarray, e: np.ndarray, tol: Tol) -> dict:
    """Every statistic of ``compare`` the plain way: whole float64 arrays, the textbook formulas."""
    a64, e64 = a.astype(np.float64).ravel(), e.astype(np.float64).ravel()
    diff, mag = np.abs(a64 - e64), np.abs(e64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / mag)
        need = np.where(diff <= tol.atol, 0.0, (diff - tol.atol) / mag)
    bits = [x.astype(np.float32).view(np.int32).astype(np.int64) for x in (a, e)]
    ordered = [np.where(b < 0, -(b & 0x7FFFFFFF), b).ravel() for b in bits]
    counted = mag >= max(tol.atol, SMALLEST_NORMAL["float32"])  # ULPs only where |e| is not near zero
    ulp = int(np.abs(ordered[0] - ordered[1])[counted].max(initial=0))
    return {"mismatched": int((diff > tol.atol + tol.rtol * mag).sum()),
            "max_abs": diff.max(), "max_abs_index": np.unravel_index(diff.argmax(), e.shape),
            "max_rel": rel.max(), "max_rel_index": np.unravel_index(rel.argmax(), e.shape),
            "mean_abs": diff.mean(), "p99_abs": float(np.percentile(diff.astype(np.float32), 99)),
            "max_ulp": ulp if ulp or diff.max() == 0 else None,
            "cosine": a64 @ e64 / np.sqrt((a64 @ a64) * (e64 @ e64)),
            "atol": max(float((diff - tol.rtol * mag).max()), 0.0), "rtol": need.max()}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", ["noise", "zeros", "ties", "exact-signs"])
def test_chunked_compare_equals_the_whole_array_formulas(monkeypatch, workers, case):
    """compare() works in chunks (and threads, and selects p99 instead of sorting): every statistic
    equals the whole-array float64 formulas, across chunk boundaries, whatever the worker count."""
    import parity.metrics as metrics

    monkeypatch.setattr(metrics, "CHUNK", 1 << 12)  # 1M values: 256 chunks in 32 groups
    monkeypatch.setattr(metrics, "PERCENTILE_BLOCK", 1 << 14)  # p99's count and gather in 64 blocks
    rng = np.random.default_rng(7)
    e = (rng.standard_normal((1024, 1024)) * 3).astype(np.float32)
    if case == "zeros":
        e[rng.random(e.shape) < 0.3] = 0.0
    a = (e + rng.standard_normal(e.shape).astype(np.float32) * 1e-4).astype(np.float32)
    if case == "ties":
        a = np.round(a * 64) / 64
        e = np.round(e * 64) / 64
    if case in ("zeros", "exact-signs"):
        same = rng.random(e.shape) < 0.5
        a[same] = e[same]  # exactly equal values: 0/0 in the relative error where both are 0
        a[0, :8] = -a[0, :8]  # sign flips: the ULP distance across zero
        e[1, :8] = rng.standard_normal(8).astype(np.float32) * 1e-30  # near zero: no ULPs counted there
        a[1, :8] = e[1, :8] + np.float32(1e-6)
    tol = Tol(rtol=1e-5, atol=1e-5)
    d = compare("s", a, e, tol, workers=workers)
    want = _oracle(a, e, tol)
    assert d.mismatched == want["mismatched"]
    assert d.max_abs == want["max_abs"] and d.max_abs_index == want["max_abs_index"]
    assert d.max_rel == want["max_rel"] and d.max_rel_index == want["max_rel_index"]
    assert d.p99_abs == want["p99_abs"] and d.max_ulp == want["max_ulp"]
    assert d.min_tolerance == {"atol": want["atol"], "rtol": want["rtol"]}
    assert d.mean_abs == pytest.approx(want["mean_abs"], rel=1e-12)
    assert d.cosine == pytest.approx(want["cosine"], rel=1e-12)


@given(nps.arrays(np.float32, st.integers(1, 3000),
                  elements=st.floats(0, 1e6, width=32) | st.sampled_from([0.0, 1.0, 2.0**-149])),
       st.sampled_from([0.0, 50.0, 99.0, 99.9, 100.0]))
def test_percentile_of_a_small_array_is_numpys(x, q):
    """Below 2^16 values percentile() partitions once instead of calling np.percentile: the same number."""
    assert percentile(x, q) == float(np.percentile(x, q))


@pytest.mark.parametrize("chunk", [1 << 17, 1 << 6])
@given(nps.arrays(st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32, np.bool_]),
                  nps.array_shapes(max_dims=3, max_side=40)),
       st.sampled_from([Tol(0.0, 0.0), Tol(1e-5, 1e-6), Tol(0.0, 1e-3)]))
def test_bit_identical_arrays_take_the_one_pass_path_with_the_same_result(chunk, x, tol):
    """Two arrays with the same bytes are compared in one pass (metrics._identical): every field of the
    StageDiff equals the full chunked path's, NaN/Inf arrays go to the full path (it names them)."""
    import parity.metrics as metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "CHUNK", chunk)  # 1 << 6: several chunks and groups in a 40^3 array
        fast = compare("s", x, x.copy(), tol)
        mp.setattr(metrics, "_same_bits", lambda a, e: False)
        assert fast == compare("s", x, x.copy(), tol)


def test_bit_identical_bfloat16_and_signed_zeros():
    """bfloat16 (a 2-byte dtype of ml_dtypes) takes the one-pass path; -0.0 against +0.0 is not the same
    bytes, so it takes the full path, which finds them equal."""
    import parity.metrics as metrics

    b = np.linspace(-3, 3, 96, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(8, 12)
    assert metrics._same_bits(b.reshape(-1), b.copy().reshape(-1))
    assert compare("s", b, b.copy(), Tol(0, 0)).passed
    z = np.zeros(64, np.float32)
    assert not metrics._same_bits(-z, z)
    assert compare("s", -z, z, Tol(0, 0)).passed
