"""rmlx ops against the float64 oracle in reference.gemma4_unified.numpy_oracle."""

import hypothesis.extra.numpy as nps
import hypothesis.strategies as st
import mlx.core as mx
import numpy as np
from hypothesis import given, settings

from reference.gemma4_unified import numpy_oracle
from rmlx.nn.base import layer_norm


@settings(deadline=None, max_examples=30)
@given(data=st.data())
def test_layer_norm_matches_float64(data):
    n = data.draw(st.sampled_from([16, 32, 48, 100, 6912]), label="dims")
    rows = data.draw(st.integers(1, 4), label="rows")
    x = data.draw(nps.arrays(np.float32, (rows, n), elements=st.floats(0, 1, width=32)), label="x")
    rng = np.random.default_rng(n)
    w = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    b = (0.1 * rng.standard_normal(n)).astype(np.float32)
    got = np.array(layer_norm(mx.array(x), mx.array(w), mx.array(b), 1e-5))
    want = numpy_oracle.layer_norm(x, w, b, 1e-5)
    # fp32 error grows with the normalised magnitude: a near-constant row with one outlier normalises to
    # ~77 (a falsifying example of the dev profile), where 4e-5 is 5e-7 of the row's scale
    scale = np.maximum(1.0, np.abs(want).max(-1, keepdims=True))
    excess = np.abs(got - want) - (2e-5 * scale + 1e-5 * np.abs(want))
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert (excess <= 0).all(), f"{got[worst]} vs {want[worst]} at {worst} (row scale {scale[worst[0], 0]:.3g})"


def test_layer_norm_constant_rows_give_the_bias_exactly():
    """A solid patch (zero variance) must collapse to the bias exactly, as in torch."""
    n = 6912
    b = np.linspace(-1, 1, n, dtype=np.float32)
    w = np.full(n, 1.5, np.float32)
    for v in (0.0, np.float32(128) * np.float32(1 / 255), 1.0):
        x = np.full((1, n), v, np.float32)
        np.testing.assert_array_equal(np.array(layer_norm(mx.array(x), mx.array(w), mx.array(b), 1e-5)), b[None])


def test_layer_norm_is_more_accurate_than_mx_fast_on_pixel_rows():
    """Why rmlx has its own LayerNorm: on 6912-wide rows of pixel values mx.fast.layer_norm's fp32
    reduction drifts by ~1e-3; ours stays at the torch level (~1e-6)."""
    rng = np.random.default_rng(0)
    x = (rng.integers(100, 130, (64, 6912)).astype(np.float32) * np.float32(1 / 255))
    w = np.ones(6912, np.float32)
    b = np.zeros(6912, np.float32)
    want = numpy_oracle.layer_norm(x, w, b, 1e-5)
    ours = np.abs(np.array(layer_norm(mx.array(x), mx.array(w), mx.array(b), 1e-5)) - want).max()
    fast = np.abs(np.array(mx.fast.layer_norm(mx.array(x), mx.array(w), mx.array(b), 1e-5)) - want).max()
    assert ours < 5e-6, ours
    assert fast > 10 * ours, (fast, ours)


def test_halves_is_bit_identical_to_the_whole_computation():
    """rmlx.nn.base.halves splits row-independent work over two CPU streams: the same bits as unsplit,
    at sizes that split (odd row counts too) and at sizes that do not."""
    import mlx.nn as nn

    from rmlx.nn import base

    rng = np.random.default_rng(3)
    for shape in [(1, 1127, 1024), (1, 4, 9, 16)]:
        x = mx.array(rng.standard_normal(shape).astype(np.float32) * 3)
        up = mx.array(rng.standard_normal(shape).astype(np.float32))
        w = mx.array((1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32))
        cases = [
            (lambda a, b: nn.gelu_approx(a) * b, (x, up), -2),
            (lambda a: mx.softmax(a, axis=-1), (x,), 1 if len(shape) == 4 else -2),
            (lambda a, w=w: base.rms_norm_rows(a, w, 1e-6), (x,), -2),
            (lambda a, w=w: base.layer_norm_rows(a, w, w, 1e-5), (x,), -2),
        ]
        for fn, args, axis in cases:
            whole, split = fn(*args), base.halves(fn, *args, axis=axis)
            assert np.array_equal(np.array(whole), np.array(split)), (shape, axis)
    assert x.size < base.HALVES_MIN  # the last shape ran whole; the first (1.15M values) in halves


def test_vision_embedder_in_row_halves_gives_the_unsplit_bits(model_dir, monkeypatch):
    """The vision embedder keeps its rows in two halves between matmuls (rmlx.nn.base.split_rows): with
    every step split (threshold 2 values) the soft tokens and every tapped stage equal the unsplit run's,
    for one image (valid rows lead: a view) and for two images of different sizes (padding inside: a gather)."""
    from rmlx.models.gemma4_unified.image import preprocess_batch
    from rmlx.models.gemma4_unified.load import load_model
    from rmlx.nn import base
    from rmlx.tap import tapping

    embedder = load_model(model_dir).vision_embedder
    rng = np.random.default_rng(5)
    wide, tall = (rng.integers(0, 256, s).astype(np.uint8) for s in [(96, 240, 3), (144, 96, 3)])
    for images in ([wide], [wide, tall]):
        pixel_values, positions = preprocess_batch(images, 70)
        runs = []
        for threshold in (1 << 40, 2):
            monkeypatch.setattr(base, "HALVES_MIN", threshold)
            captured = {}
            with tapping(lambda name, x, got=captured: got.setdefault(name, np.array(x)) is not None and x):
                soft = np.array(embedder(mx.array(pixel_values), mx.array(positions)))
            runs.append((soft, captured, len(base.split_rows(mx.array(pixel_values)))))
        (whole, whole_stages, one), (split, split_stages, two) = runs
        assert (one, two) == (1, 2)
        assert whole.shape[1] == (positions[..., 0] != -1).sum() and np.array_equal(whole, split)
        assert whole_stages.keys() == split_stages.keys() and len(whole_stages) == 7
        for name, value in whole_stages.items():
            assert np.array_equal(value, split_stages[name]), name
        monkeypatch.setattr(base, "HALVES_MIN", 2)
        assert np.array_equal(np.array(embedder(mx.array(pixel_values), mx.array(positions))), whole)  # no handler
