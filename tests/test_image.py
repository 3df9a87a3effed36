"""Image preprocessing against transformers' own code (the reference), plus patchify properties."""

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings
from PIL import Image
from transformers.image_transforms import convert_to_rgb
from transformers.models.gemma4_unified.image_processing_gemma4_unified import (
    get_aspect_ratio_preserving_size,
)

from parity.adapters.gemma4_unified.defects import CATALOG
from parity.defects import check, planted
from reference.gemma4_unified.hf import HFRunner
from rmlx.errors import InputError
from rmlx.models.gemma4_unified import image as rimage
from rmlx.models.gemma4_unified.image import load_image, patchify, preprocess, target_size, to_rgb
from tests.conftest import IMAGES

SOFT = st.sampled_from([70, 140, 280, 560, 1120])


@given(h=st.integers(1, 4000), w=st.integers(1, 4000), mst=SOFT)
def test_size_rule_matches_hf(h, w, mst):
    try:
        expected = get_aspect_ratio_preserving_size(height=h, width=w, patch_size=16, max_patches=mst * 9,
                                                    pooling_kernel_size=3)
    except ValueError:
        with pytest.raises(InputError):
            target_size(h, w, mst)
        return
    assert target_size(h, w, mst) == expected


@settings(deadline=None, max_examples=25)
@given(data=st.data())
def test_pixel_values_and_positions_are_exact_against_hf(data):
    """Random images of random sizes (resized or not): bit-exact pixel_values and position_ids."""
    h = data.draw(st.integers(8, 160), label="h")
    w = data.draw(st.integers(8, 160), label="w")
    mst = data.draw(st.sampled_from([70, 140]), label="max_soft_tokens")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = HFRunner.preprocess(img, mst)
    pv, pos, n = preprocess(img, mst)
    np.testing.assert_array_equal(pv, ref["pixel_values"])
    np.testing.assert_array_equal(pos, ref["image_position_ids"])
    assert n == int(ref["num_soft_tokens_per_image"][0])


@pytest.mark.parametrize("path", IMAGES, ids=[p.name for p in IMAGES])
def test_decode_matches_hf_convert_to_rgb(path):
    """RGBA over white, palette, grayscale: the same RGB array HF's processor derives from the PIL image."""
    with Image.open(path) as im:
        expected = convert_to_rgb(im, return_numpy=True)
    np.testing.assert_array_equal(load_image(path), expected)


def test_rgba_is_composited_on_white():
    im = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (10, 20, 30, 255))
    np.testing.assert_array_equal(to_rgb(im), [[[255, 255, 255], [10, 20, 30]]])


@pytest.mark.parametrize("mst", [0, 100, 281])
def test_unsupported_max_soft_tokens(mst):
    with pytest.raises(InputError, match=f"max_soft_tokens={mst} is not supported"):
        preprocess(np.zeros((48, 48, 3), np.uint8), mst)


@given(gh=st.integers(1, 4), gw=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_patchify_channel_order_and_coverage(gh, gw, seed):
    """Every pixel lands in exactly one patch cell, at (row*48 + col)*3 + c, channels in RGB order."""
    img = np.random.default_rng(seed).random((gh * 48, gw * 48, 3)).astype(np.float32)
    patches, pos = patchify(img, 48)
    assert patches.shape == (gh * gw, 6912)
    ids = np.arange(img.size).reshape(img.shape)  # a unique id per (y, x, c)
    id_patches, _ = patchify(ids, 48)
    assert np.array_equal(np.sort(id_patches.ravel()), np.arange(img.size))
    for i, (x, y) in enumerate(pos):
        cell = img[y * 48:(y + 1) * 48, x * 48:(x + 1) * 48]
        np.testing.assert_array_equal(patches[i].reshape(48, 48, 3), cell)
    assert [tuple(p) for p in pos] == [(x, y) for y in range(gh) for x in range(gw)]


def test_bgr_fault_swaps_channels():
    img = np.zeros((48, 48, 3), np.float32)
    img[..., 0] = 1.0
    with planted(check(CATALOG, ["bgr-patchify"])):
        patches, _ = rimage.patchify(img, 48)
    assert patches.reshape(-1, 3)[:, 2].min() == 1.0 and patches.reshape(-1, 3)[:, 0].max() == 0.0


def test_fault_names_are_checked():
    with pytest.raises(InputError, match="unknown defect"):
        check(CATALOG, ["no-such-fault"])
