"""The Gemma 4 (SigLIP-style vision) defect catalog: real porting bugs of the vision path, planted into
``rmlx.models.gemma4`` from outside (``parity.defects.patched`` / ``wrapped``), and the decoder defect at
fp32 rounding scale of the unified catalog, the same patch (the decoder, ``rmlx.nn.text``, is shared). A
patched body is the buggy code a porter would have written; the stage is the first one each must hit
teacher-forced.
"""

from __future__ import annotations

import math
from dataclasses import replace

import rmlx  # noqa: F401  (before mlx: it loads the BLAS MLX calls, rmlx/blas.py)

# isort: split
import mlx.core as mx

from parity.adapters.gemma4_unified import defects as unified
from parity.defects import Defect, patched, wrapped
from rmlx.models.gemma4 import image as gimage
from rmlx.models.gemma4 import vision
from rmlx.tap import tap


def _rescale_256():
    def preprocess(f):
        def call(*args, **kwargs):
            pixel_values, position_ids, n = f(*args, **kwargs)
            return pixel_values * (255 / 256), position_ids, n  # x / 256 instead of x / 255
        return call
    return wrapped(gimage, "preprocess", preprocess)


def _patch_embedder(scale_pixels: bool = True, swap_table: bool = False):
    """PatchEmbedder.__call__ as a porter might have written it: optionally without 2 (x - 0.5), or with
    the two position tables read the wrong way round (table[0] by y, table[1] by x)."""
    def call(self, pixel_values, position_ids, padding):
        x = pixel_values.astype(mx.float32)
        if scale_pixels:
            x = 2 * (x - 0.5)
        h = tap("vision.patch_embed", self.input_proj(x.astype(self.input_proj.weight.dtype)))
        pos = mx.maximum(position_ids, 0)
        table = self.position_embedding_table
        px, py = (pos[..., 1], pos[..., 0]) if swap_table else (pos[..., 0], pos[..., 1])
        emb = mx.take(table[0], px, axis=0) + mx.take(table[1], py, axis=0)
        emb = mx.where(padding[..., None], mx.array(0.0, emb.dtype), emb)
        return tap("vision.pos_embed", h + emb)
    return call


def _rope_axes_swapped():
    def cos_sin(f):
        return lambda self, position_ids, dtype: f(self, position_ids[..., ::-1], dtype)  # (y, x)
    return wrapped(vision.AxialRoPE, "cos_sin", cos_sin)


def _clip_ignored():
    return patched((vision.ClippableLinear, "__call__", lambda self, x: self.linear(x)))


def _v_norm_skipped():
    def rms_norm(f):
        def call(x, weight, eps):
            return x if weight is None else f(x, weight, eps)  # the weightless v_norm dropped
        return call
    return wrapped(vision, "rms_norm", rms_norm)


def _attn_scale_rsqrt():
    def attention(f):
        return lambda q, k, v, mask: f(q * mx.array(q.shape[-1] ** -0.5, q.dtype), k, v, mask)
    return wrapped(vision, "attention", attention)


def _padding_keys_attended():
    def encoder(f):
        return lambda self, x, position_ids, valid: f(self, x, position_ids, mx.ones_like(valid))
    return wrapped(vision.VisionEncoder, "__call__", encoder)


def _pooler_scale_missing():
    def pool(f):
        def call(self, h, padding, pos_np, length):
            pooled, valid = f(self, h, padding, pos_np, length)
            return pooled / mx.array(math.sqrt(self.cfg.hidden_size), mx.float32), valid
        return call
    return wrapped(vision.VisionModel, "pool", pool)


def _standardize_skipped():
    return patched((vision.VisionModel, "standardize", lambda self, h: h))


CATALOG: dict[str, Defect] = {
    d.name: d
    for d in (
        Defect("g4-rescale-256", "preprocessing", "pixels rescaled by 1/256 instead of 1/255",
               "image.pixel_values", _rescale_256),
        Defect("g4-patch-normalisation-skipped", "embedder",
               "the patch embedder's 2 (x - 0.5) left out: [0, 1] pixels fed to input_proj as if already in "
               "[-1, 1]", "vision.patch_embed", lambda: patched((vision.PatchEmbedder, "__call__",
                                                                 _patch_embedder(scale_pixels=False)))),
        Defect("g4-position-table-transposed", "embedder",
               "the (2, size, D) position table read with its two axes swapped: table[0] by y, table[1] by x",
               "vision.pos_embed", lambda: patched((vision.PatchEmbedder, "__call__",
                                                    _patch_embedder(swap_table=True)))),
        Defect("g4-rope-axes-swapped", "rope",
               "axial 2-D RoPE with the axes swapped: the first half of each head rotated by y, the second by x",
               "vision.layers.0.attn.q", _rope_axes_swapped),
        Defect("g4-clip-bounds-ignored", "attention",
               "Gemma4ClippableLinear's checkpoint input/output bounds ignored (plain Linear)",
               "vision.layers.0.attn.q", _clip_ignored),
        Defect("g4-v-norm-skipped", "norms", "vision values not passed through the weightless v_norm",
               "vision.layers.0.attn.v", _v_norm_skipped),
        Defect("g4-attn-scale-rsqrt", "attention",
               "vision attention scores scaled by 1/sqrt(head_dim), which Gemma 4 drops (scale 1.0 after QK-norm)",
               "vision.layers.0.attn.out", _attn_scale_rsqrt),
        Defect("g4-padding-keys-attended", "masks",
               "the encoder's padding rows not masked as keys: every patch attends to the zero-padding too",
               "vision.layers.0.attn.out", _padding_keys_attended),
        Defect("g4-pooler-scale-missing", "pooler", "the pooler's * sqrt(hidden_size) after the k x k average "
               "left out", "vision.pooled", _pooler_scale_missing),
        Defect("g4-standardize-skipped", "pooler", "standardize=true ignored: (x - std_bias) * std_scale "
               "never applied to the pooled features", "vision.standardized", _standardize_skipped),
        # the shared decoder's (its own name: catalogs are keyed by name across families): only the float64
        # noise floor sees it free-running (docs/verdicts.md)
        replace(unified.CATALOG["decoder-norm-eps-1e-5"], name="g4-decoder-norm-eps-1e-5"),
    )
}


def expected_stage(defect: Defect) -> str:
    """The catalog's stages carry no placeholders."""
    return defect.stage
