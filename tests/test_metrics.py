"""Properties of parity.metrics.compare (torch.testing semantics, plus ULPs and min tolerance)."""

import math

import hypothesis.extra.numpy as nps
import hypothesis.strategies as st
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given

from parity.metrics import StageDiff, Tol, compare, compare_all, first_divergence, max_ulp, missing_and_extra

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
