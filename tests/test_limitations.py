"""The documented limitation of the encoder-free path: LayerNorm over a zero-variance patch.

An achromatic solid image (white, gray, black) gives patches whose 6912 values are all equal, so
patch_ln1 normalises them to zero and outputs exactly its bias: the three images become
indistinguishable at vision.patch_ln1. Chromatic solids (R, G, B vary across channels) keep a
non-zero variance and stay pairwise distinct. Checked on both sides (rmlx and HF).
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from parity.adapters.gemma4_unified.stages import VISION
from parity.capture import Recorder
from parity.stages import hook_points
from rmlx.models.gemma4_unified.image import load_image, preprocess
from rmlx.tap import tapping
from tests.conftest import FIXTURES

ACHROMATIC = ["solid-white", "solid-gray", "solid-black"]
CHROMATIC = ["solid-red", "solid-green", "solid-blue", "solid-yellow"]


@pytest.fixture(scope="module")
def ln1_rows(model_dir, adapters):
    adapter = adapters(model_dir)
    rows = {}
    for name in ACHROMATIC + CHROMATIC:
        img = load_image(FIXTURES / "images" / f"{name}.png")
        pv, pos, n = preprocess(img, 280)
        recorder = Recorder()
        with tapping(recorder):
            adapter.candidate_model.vision_embedder(mx.array(pv), mx.array(pos))
        _, ref = adapter.hf.image_features(pv, pos, hook_points(VISION))
        rows[name] = (recorder.capture["vision.patch_ln1"][0, :n], ref["vision.patch_ln1"][0, :n])
    return rows


def test_achromatic_solids_collapse_to_the_ln1_bias(ln1_rows, model_dir):
    from safetensors.numpy import load_file

    bias = load_file(model_dir / "model.safetensors")["model.vision_embedder.patch_ln1.bias"]
    for name in ACHROMATIC:
        for side in (0, 1):  # rmlx, HF
            rows = ln1_rows[name][side]
            np.testing.assert_array_equal(rows, np.broadcast_to(bias, rows.shape), err_msg=name)
    for a, b in itertools.combinations(ACHROMATIC, 2):
        np.testing.assert_array_equal(ln1_rows[a][0], ln1_rows[b][0])


def test_chromatic_solids_stay_distinct(ln1_rows):
    for a, b in itertools.combinations(CHROMATIC, 2):
        for side in (0, 1):
            gap = np.abs(ln1_rows[a][side][0] - ln1_rows[b][side][0]).max()
            assert gap > 0.1, f"{a} vs {b}: patch_ln1 rows differ by only {gap}"
