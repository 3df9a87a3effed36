"""Attention masks: Hypothesis properties against a brute-force definition written in plain Python
from the catalog's words (§4), and against HF's own mask builders on random token-type sequences."""

import hypothesis.strategies as st
import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from rmlx.nn.base import MASK_POLICIES, attention_masks, block_ids

TYPES = st.lists(st.sampled_from([0, 0, 0, 1, 1, 2, 3]), min_size=1, max_size=40)
WINDOW = st.integers(1, 12)
POLICY = st.sampled_from(MASK_POLICIES)


def brute_blocks(types):
    """Each maximal run of image (1) or video (2) tokens is one block; everything else is -1."""
    ids, current, prev_vision = [], -1, False
    for t in types:
        vision = t in (1, 2)
        if vision and not prev_vision:
            current += 1
        ids.append(current if vision else -1)
        prev_vision = vision
    return ids


def brute_mask(types, window, policy, kind):
    """The policy's mask, cell by cell: causal k <= q; window k > q - W; block: same block id >= 0.
    official: full = causal, sliding = (causal or block) and window;
    hf-forward: full = causal or block, sliding = (causal and window) or block."""
    b = brute_blocks(types)
    n = len(types)
    out = np.zeros((n, n), bool)
    for q in range(n):
        for k in range(n):
            causal, in_window = k <= q, k > q - window
            block = b[q] >= 0 and b[q] == b[k]
            if policy == "official":
                out[q, k] = causal if kind == "full_attention" else (causal or block) and in_window
            else:
                out[q, k] = (causal or block) if kind == "full_attention" else (causal and in_window) or block
    return out


def rmlx_masks(types, window, policy):
    m = attention_masks(mx.array(np.array([types])), window, policy)
    return {k: np.array(v)[0] for k, v in m.items()}


@given(types=TYPES, window=WINDOW, policy=POLICY)
def test_masks_equal_the_brute_force_definition(types, window, policy):
    got = rmlx_masks(types, window, policy)
    for kind in ("full_attention", "sliding_attention"):
        np.testing.assert_array_equal(got[kind], brute_mask(types, window, policy, kind), err_msg=kind)


@given(types=TYPES)
def test_block_ids(types):
    assert np.array(block_ids(mx.array(np.array([types]))))[0].tolist() == brute_blocks(types)


@given(types=TYPES, window=WINDOW, policy=POLICY)
def test_mask_properties(types, window, policy):
    m = rmlx_masks(types, window, policy)
    b = brute_blocks(types)
    n = len(types)
    q, k = np.indices((n, n))
    causal, in_window = k <= q, k > q - window
    text_rows = np.array([x < 0 for x in b])
    for kind, plain in (("full_attention", causal), ("sliding_attention", causal & in_window)):
        mask = m[kind]
        assert mask.diagonal().all(), "the diagonal is always open"
        np.testing.assert_array_equal(mask[text_rows], plain[text_rows], err_msg=f"{kind}: text rows are plain")
        for i in range(n):  # the overlay never opens a future cell of another block (or of text)
            for j in range(i + 1, n):
                if b[i] < 0 or b[i] != b[j]:
                    assert not mask[i, j], (kind, i, j)
    same = np.array([[b[i] >= 0 and b[i] == b[j] for j in range(n)] for i in range(n)])
    if policy == "official":
        np.testing.assert_array_equal(m["full_attention"], causal)  # full layers exactly causal
        assert not (m["sliding_attention"] & ~in_window).any()  # sliding never leaves the window
        assert m["sliding_attention"][same & in_window].all()  # the block opens inside the window
    else:
        assert m["sliding_attention"][same].all() and m["full_attention"][same].all()  # block overrides window


@given(types=st.lists(st.sampled_from([0, 3]), min_size=1, max_size=30), window=WINDOW)
def test_without_image_tokens_both_policies_are_plain(types, window):
    a, b = rmlx_masks(types, window, "official"), rmlx_masks(types, window, "hf-forward")
    for kind in a:
        np.testing.assert_array_equal(a[kind], b[kind])


@settings(deadline=None, max_examples=25)
@given(types=st.lists(st.sampled_from([0, 0, 1, 1, 2, 3]), min_size=2, max_size=32), window=WINDOW,
       policy=POLICY)
def test_masks_equal_hf_builders(types, window, policy):
    """The reference: HF's own code for each policy (the forward's builder and the static one)."""
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration
    from transformers.masking_utils import create_masks_for_generate
    from transformers.models.gemma4_unified.modeling_gemma4_unified import get_block_sequence_ids_for_mask

    cfg = Gemma4UnifiedConfig(
        text_config=dict(vocab_size=64, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=8, sliding_window=window,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(mm_embed_dim=8, output_proj_dims=8), attn_implementation="eager")
    n = len(types)
    tt = torch.tensor([types])
    embeds, pos = torch.zeros((1, n, 8)), torch.arange(n)[None]
    if policy == "official":
        hf = Gemma4UnifiedForConditionalGeneration.create_masks_for_generate(cfg, embeds, None, None, pos, tt)
    else:
        hf = create_masks_for_generate(config=cfg.text_config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                       position_ids=pos, block_sequence_ids=get_block_sequence_ids_for_mask(tt, "cpu"))
    got = rmlx_masks(types, window, policy)
    for kind in ("full_attention", "sliding_attention"):
        np.testing.assert_array_equal(got[kind], (hf[kind][0, 0] == 0).numpy(), err_msg=kind)  # additive -> bool


@pytest.mark.parametrize("policy", MASK_POLICIES)
def test_unknown_policy_is_refused(policy):
    with pytest.raises(ValueError, match="not one of"):
        attention_masks(mx.array(np.zeros((1, 3), np.int64)), 2, policy + "-x")
