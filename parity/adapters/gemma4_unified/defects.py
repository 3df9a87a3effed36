"""The Gemma 4 unified defect catalog: real porting bugs, planted into ``rmlx`` from outside.

Each defect patches the one function, method or constructor of the port where the bug would live
(``parity.defects.patched`` / ``wrapped``); a patched body is the buggy code a porter would have
written. The stage placeholders ``{first_full}`` (the model's first full-attention layer) and
``{first_qweight}`` (the case's first dequantized weight stage) are resolved by :func:`expected_stage`.
"""

from __future__ import annotations

import dataclasses

import rmlx  # noqa: F401  (before mlx: it loads the BLAS MLX calls, rmlx/blas.py)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from parity.defects import Defect, patched, wrapped
from reference import mxfp8
from rmlx import resize
from rmlx.models.gemma4_unified import image, model, vision
from rmlx.nn import base, config, kernels, quant, text
from rmlx.tap import tap


def _bgr_patchify():
    return wrapped(image, "patchify", lambda f: lambda image01, side: f(image01[..., ::-1], side))


def _patch_ln1_eps():
    def init(f):
        def __init__(self, *args, **kwargs):
            f(self, *args, **kwargs)
            self.patch_ln1.eps = 1e-6  # the RMSNorm eps
        return __init__
    return wrapped(vision.VisionEmbedder, "__init__", init)


def _posemb_xy_swap():
    return wrapped(vision.VisionEmbedder, "position_embedding", lambda f: lambda self, p: f(self, p[..., ::-1]))


def _scatter_shifted():
    def scatter(f):
        def shifted(h, slots, soft, what):
            if what == "image":  # counted from <boi> inclusive: every slot one later
                idx = np.minimum(np.flatnonzero(slots[0]) + 1, slots.shape[1] - 1)
                slots = np.zeros_like(slots)
                slots[0, idx] = True
            return f(h, slots, soft, what)
        return shifted
    return wrapped(model.Model, "_scatter", scatter)


def _embed_scale_missing():
    return patched((text.TextModel, "embed", lambda self, input_ids: self.embed_tokens(input_ids)))


def _audio_rmsnorm_skipped():
    def call(self, frames):
        return self.embedding_projection(frames.astype(self.embedding_projection.weight.dtype))
    return patched((model.AudioEmbedder, "__call__", call))


def _vision_causal():
    return patched((base, "block_ids", lambda types: mx.full(types.shape, -1)))  # no image block at all


def _overlay_crosses_blocks():
    return patched((base, "block_ids", lambda types: mx.where((types == 1) | (types == 2), 0, -1)))


def _audio_in_overlay():
    def blocks(types):  # audio frames taken for one more multimodal block (HF's is_vision is image | video)
        media = (types == 1) | (types == 2) | (types == 3)
        prev = mx.concatenate([mx.zeros_like(media[:, :1]), media[:, :-1]], axis=1)
        return mx.where(media, mx.cumsum((media & ~prev).astype(mx.int32), axis=1) - 1, -1)
    return patched((base, "block_ids", blocks))


def _rope_partial_slice():
    def rope(f):
        def call(self, x, offset):
            if self.kind != "proportional":
                return f(self, x, offset)
            # rotate a 2*n_rot slice as if it were the whole head: pairs (i, i + n_rot), exponent over
            # 2*n_rot -- what mx.fast.rope(dims=2*n_rot) does
            d_rot = 2 * self.n_rot
            i = mx.arange(self.n_rot, dtype=mx.float32)
            head = base._rotate(x[..., :d_rot], 1.0 / (self.theta ** (2 * i / d_rot)), offset)
            return mx.concatenate([head, x[..., d_rot:]], axis=-1)
        return call
    return wrapped(base.RoPE, "__call__", rope)


def _rotate_interleaved(x: mx.array, inv: mx.array, offset: int) -> mx.array:
    """GPT-J pairs (2i, 2i+1) instead of half-split (i, i + d/2)."""
    pos = mx.arange(offset, offset + x.shape[1], dtype=mx.float32)
    freqs = (pos[:, None] * inv[None, :])[None, :, None, :]  # (1, L, 1, d/2)
    cos, sin = mx.cos(freqs).astype(x.dtype), mx.sin(freqs).astype(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)


def _attn_scale_rsqrt():
    def attend(f):
        return lambda q, k, v, bias: f(q * mx.array(q.shape[-1] ** -0.5, q.dtype), k, v, bias)
    return wrapped(text, "_attend", attend)


def _v_norm_skipped():
    return patched((text.Attention, "v_norm", lambda self, v: v))


def _rmsnorm_one_plus_w():
    return wrapped(base, "rms_norm_rows",
                   lambda f: lambda x, weight, eps: f(x, None if weight is None else 1 + weight, eps))


def _mlp_gelu_exact():
    def call(self, x):
        gate = self.gate_proj(x)
        return self.down_proj(nn.gelu(gate.astype(mx.float32)).astype(x.dtype) * self.up_proj(x))
    return patched((text.MLP, "__call__", call))


def _layer_scalar_ignored():
    def call(self, x, mask, cache, offset, shared_kv):
        n = self.names
        h = tap(n["input_layernorm"], self.input_layernorm(x))
        h, kv = self.self_attn(h, mask, cache, offset, shared_kv, n)
        x = x + self.post_attention_layernorm(h)
        h = tap(n["mlp.out"], self.mlp(self.pre_feedforward_layernorm(x)))
        return tap(n["out"], x + self.post_feedforward_layernorm(h)), kv  # no * layer_scalar
    return patched((text.DecoderLayer, "__call__", call))


def _softcap_skipped():
    def head(self, h):
        return tap("logits", self.embed_tokens.as_linear(tap("text.norm", self.norm(h))))
    return patched((text.TextModel, "head", head))


def _sliding_cache_off_by_one():
    def init(f):
        def __init__(self, window=None):
            f(self, window)
            if self.keep is not None:
                self.keep += 1  # W keys kept: a decode step then sees W + 1
        return __init__
    return wrapped(text.KVCache, "__init__", init)


def _kv_cache_short_prompt():
    def update(self, keys, values):
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        start = 0 if self.keep is None else keys.shape[2] - self.keep  # no max(.., 0): negative before the wrap
        self.keys, self.values = keys[:, :, start:], values[:, :, start:]
        return keys, values
    return patched((text.KVCache, "update", update))


def _sliding_mask_off_by_one():
    return wrapped(model, "attention_masks", lambda f: lambda types, window, policy: f(types, window + 1, policy))


def _short_prompt_sliding_mask():
    def masks(f):
        def call(types, window, policy):
            out = f(types, window, policy)
            if types.shape[1] <= window:  # "no key is outside the window": the mask dropped, causality with it
                out["sliding_attention"] = mx.ones_like(out["sliding_attention"])
            return out
        return call
    return wrapped(model, "attention_masks", masks)


def _decode_rope_offset_zero():
    return wrapped(base.RoPE, "__call__", lambda f: lambda self, x, offset: f(self, x, 0))


def _downscale_no_antialias():
    def table(f):
        def call(in_size, out_size):
            if in_size <= out_size:
                return f(in_size, out_size)
            # the upscaling kernel at the downscaled centres: support 2 source pixels, not 2 * scale
            scale = in_size / out_size
            center = scale * (np.arange(out_size) + 0.5)
            xmin = np.maximum((center - 2.0 + 0.5).astype(np.int64), 0)
            xmax = np.minimum((center + 2.0 + 0.5).astype(np.int64), in_size)
            taps = np.arange(5)
            w = resize._cubic(taps[None, :] + xmin[:, None] - center[:, None] + 0.5)
            w = np.where(taps[None, :] < np.clip(xmax - xmin, 0, 5)[:, None], w, 0.0)
            w = w / w.sum(1, keepdims=True)
            precision = 14
            scaled = w * (1 << precision)
            weights = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
            return np.minimum(xmin[:, None] + taps[None, :], in_size - 1), weights, precision
        return call
    return wrapped(resize, "_weight_table", table)


def _resize_truncates():
    def axis(image_, ax, out_size):
        indices, weights, precision = resize._weight_table(image_.shape[ax], out_size)
        shape = list(image_.shape)
        shape[ax] = out_size
        bcast = [1, 1, 1]
        bcast[ax] = out_size
        acc = np.zeros(shape, np.int32)  # no 2**(p - 1) rounding offset: every pixel truncated
        for k in range(indices.shape[1]):
            acc += np.take(image_, indices[:, k], axis=ax) * weights[:, k].reshape(bcast)
        return np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return patched((resize, "_resample_axis", axis))


def _aspect_clamp_missing():
    def target(height, width, max_soft_tokens, patch_size=16, k=3):
        target_px = max_soft_tokens * k * k * patch_size**2
        factor = (target_px / (height * width)) ** 0.5
        side = k * patch_size
        th = int(factor * height / side) * side
        tw = int(factor * width / side) * side
        if th == 0:
            th, tw = side, (width // height) * side  # not clamped to the longest side the budget allows
        elif tw == 0:
            tw, th = side, (height // width) * side
        return th, tw
    return patched((image, "target_size", target))


def _decoder_norm_eps():
    def init(f):
        def __init__(self, cfg, i):
            f(self, cfg, i)
            self.input_layernorm.eps = 1e-5  # the PyTorch / Llama default, not the config's 1e-6
        return __init__
    return wrapped(text.DecoderLayer, "__init__", init)


def _untied_head_tied():
    def head(f):
        def call(self, h):
            if "lm_head" not in self:
                return f(self, h)
            lm_head = self.lm_head
            del self.lm_head  # the tied path: embed_tokens.as_linear, whatever the checkpoint says
            try:
                return f(self, h)
            finally:
                self.lm_head = lm_head
        return call
    return wrapped(text.TextModel, "head", head)


def _patch_geometry_default():
    def batch(f):
        return lambda images, max_soft_tokens=280, *geometry: f(images, max_soft_tokens)  # geometry dropped
    return wrapped(image, "preprocess_batch", batch)


def _rope_default_factor():
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1_000_000.0}}
    return patched((config, "_DEFAULT_ROPE", rope))  # the shared decoder config reader (rmlx.nn.config)


def _gate_up_swapped():
    def swap(name: str) -> str:
        if ".mlp.gate_proj." in name:
            return name.replace(".mlp.gate_proj.", ".mlp.up_proj.")
        return name.replace(".mlp.up_proj.", ".mlp.gate_proj.")

    def sanitize(f):
        def call(self, weights):
            out, source = f(self, weights)
            return {swap(k): v for k, v in out.items()}, {swap(k): v for k, v in source.items()}
        return call
    return wrapped(model.Model, "sanitize", sanitize)


def _k_eq_v_ignored():
    def init(f):
        return lambda self, cfg, spec: f(self, cfg, dataclasses.replace(spec, k_eq_v=False))
    return wrapped(text.Attention, "__init__", init)


def _e5m2_words(module: nn.QuantizedLinear) -> mx.array:
    """Elements re-encoded as FP8 E5M2 bytes (which the E4M3 decoder then misreads). E5M2 is the top
    byte of an IEEE half, so rounding the half to its top byte encodes it."""
    deq = mx.dequantize(module.weight, module.scales, group_size=32, bits=8, mode="mxfp8", dtype=mx.float32)
    out, k = deq.shape
    scale = mx.power(2.0, module.scales.astype(mx.float32) - 127)  # E8M0, bias 127: (out, K/32)
    elements = deq.reshape(out, k // 32, 32) / scale[..., None]  # (out, K) -> (out, K/32, 32)
    bits = mx.view(elements.astype(mx.float16), mx.uint16).astype(mx.uint32)
    byte = ((bits + 0x7F + ((bits >> 8) & 1)) >> 8) & 0xFF  # round half to even onto the top byte
    byte = byte.reshape(out, k // 4, 4)  # (out, K/32, 32) -> (out, K/4, 4), little-endian in each word
    return byte[..., 0] | (byte[..., 1] << 8) | (byte[..., 2] << 16) | (byte[..., 3] << 24)


def _codec(edit):
    """A defect of the quantize-on-load codec: ``edit(module)`` runs on every quantized linear."""
    def quantize(f):
        def call(m, mode, overrides=None):
            status = f(m, mode, overrides)
            for _, module in m.named_modules():
                if isinstance(module, nn.QuantizedLinear):
                    edit(module)
            return status
        return call
    return lambda: wrapped(quant, "quantize", quantize)


def _set_weight_e5m2(module):
    module.weight = _e5m2_words(module)


def _scale_exponent_plus_one(module):
    module.scales = module.scales + 1  # E8M0 holds the exponent: +1 doubles


def _scales_shifted(module):
    flat = module.scales.reshape(-1)  # blocks in row-major order: an off-by-one in the flat scale index
    module.scales = mx.concatenate([flat[:1], flat[:-1]]).reshape(module.scales.shape)


def _scale_ocp_floor():
    """The scale rule of the OCP MX v1.0 text, X = 2**(floor(log2 amax) - 8), where MLX takes the smallest
    power of two >= amax / 448 (reference/mxfp8.py, D1): blocks whose amax / X falls in (224, 256) get
    half MLX's scale, and their largest elements saturate at 448 * X / 2."""
    def quantize_mx(w, group_size, bits, mode):
        words, scales = mxfp8.encode(np.array(w.astype(mx.float32)), spec=True)
        return mx.array(words), mx.array(scales)
    return patched((kernels, "quantize_mx", quantize_mx))


_MX = (("quantize", "mxfp8"),)
_MX_STAGE = "{first_qweight}"  # the first dequantized weight of the case, in forward order
CATALOG: dict[str, Defect] = {
    d.name: d
    for d in (
        Defect("bgr-patchify", "preprocessing",
               "image decoded as BGR (OpenCV habit): patches carry B,G,R instead of R,G,B", "image.pixel_values",
               _bgr_patchify),
        Defect("patch-ln1-eps", "embedder",
               "patch_ln1 built with the RMSNorm eps 1e-6 instead of LayerNorm's 1e-5", "vision.patch_ln1",
               _patch_ln1_eps),
        Defect("posemb-xy-swap", "embedder",
               "factorised position embedding indexed (y, x) instead of (x, y)", "vision.pos_embed",
               _posemb_xy_swap),
        Defect("soft-token-scatter-shifted", "embedder",
               "image soft tokens scattered from <boi> inclusive: every token one slot late", "text.inputs_embeds",
               _scatter_shifted),
        Defect("embed-scale-missing", "embedder",
               "token embeddings not multiplied by sqrt(hidden_size) (a Llama-style embedding)", "text.embed_tokens",
               _embed_scale_missing),
        Defect("audio-rmsnorm-skipped", "audio",
               "audio frames projected without the weightless RMSNorm before embedding_projection",
               "audio.soft_tokens", _audio_rmsnorm_skipped),
        Defect("vision-causal", "masks", "image soft tokens attended causally, not bidirectionally within their "
               "image (the motivating bug)", "mask.*", _vision_causal),
        Defect("overlay-crosses-blocks", "masks",
               "the bidirectional image overlay spans every image of the prompt as one block", "mask.*",
               _overlay_crosses_blocks),
        Defect("audio-in-overlay", "masks", "audio soft tokens attended bidirectionally within their block, as "
               "images are (HF's overlay takes image and video tokens only)", "mask.*", _audio_in_overlay),
        Defect("rope-partial-slice", "rope", "proportional RoPE applied as mx.fast.rope(dims=128) on a slice: "
               "pairs (i, i+64), exponent over 128", "layers.{first_full}.attn.q", _rope_partial_slice),
        Defect("rope-interleaved", "rope",
               "RoPE pairs interleaved (2i, 2i+1), GPT-J style (mx.fast.rope traditional=True), instead of "
               "half-split (i, i + d/2)", "layers.0.attn.q", lambda: patched((base, "_rotate", _rotate_interleaved))),
        Defect("attn-scale-rsqrt", "attention",
               "attention scores scaled by 1/sqrt(head_dim), which Gemma 4 drops (scale 1.0 after QK-norm)",
               "layers.0.attn.out", _attn_scale_rsqrt),
        Defect("v-norm-skipped", "norms", "values not passed through the weightless v_norm", "layers.0.attn.v",
               _v_norm_skipped),
        Defect("rmsnorm-one-plus-w", "norms",
               "Gemma 1-3 RMSNorm convention x_hat * (1 + w) instead of Gemma 4's x_hat * w",
               "layers.0.input_layernorm", _rmsnorm_one_plus_w),
        Defect("mlp-gelu-exact", "mlp", "MLP gate activation exact erf GELU instead of gelu_pytorch_tanh",
               "layers.0.mlp.out", _mlp_gelu_exact),
        Defect("layer-scalar-ignored", "residual",
               "the per-layer layer_scalar buffer never applied to the layer output", "layers.0.out",
               _layer_scalar_ignored),
        Defect("softcap-skipped", "logits", "final logit soft-cap tanh(x / cap) * cap left out", "logits",
               _softcap_skipped),
        Defect("sliding-cache-off-by-one", "cache", "the rotating KV cache keeps W keys instead of W - 1, so a "
               "decode step sees W + 1 keys: only decoding with a cache shows it", "logits@decode.*",
               _sliding_cache_off_by_one),
        Defect("kv-cache-short-prompt", "cache", "the rotating KV cache trimmed to its last W - 1 keys without "
               "max(.., 0): a prompt shorter than the window loses its first keys (only short prompts show it)",
               "logits@decode.1", _kv_cache_short_prompt),
        Defect("sliding-mask-off-by-one", "masks", "sliding window admits W + 1 keys (k >= q - W, not k > q - W): "
               "only prompts longer than the window show it", "mask.sliding_attention", _sliding_mask_off_by_one),
        Defect("short-prompt-sliding-mask", "masks", "a prompt no longer than the window gets no sliding mask at "
               "all (causality dropped with the window)", "mask.sliding_attention", _short_prompt_sliding_mask),
        Defect("decode-rope-offset-zero", "rope", "decode steps rotate the new token at position 0, not at its "
               "position after the prompt", "logits@decode.1", _decode_rope_offset_zero),
        Defect("downscale-no-antialias", "preprocessing", "downscaling with the upscaling kernel (support 2 source "
               "pixels, not 2 x scale): only images over the pixel budget show it", "image.pixel_values",
               _downscale_no_antialias),
        Defect("resize-truncates", "preprocessing", "the fixed-point resize drops its 2^(p-1) rounding offset: "
               "every resized pixel truncated", "image.pixel_values", _resize_truncates),
        Defect("aspect-clamp-missing", "preprocessing", "an extreme aspect ratio's long side not clamped to the "
               "budget: the port refuses a 4x1200 image the reference takes", "image.pixel_values",
               _aspect_clamp_missing),
        Defect("decoder-norm-eps-1e-5", "norms", "the decoder's input RMSNorm built with eps 1e-5 (a common "
               "default) instead of the config's 1e-6: a change at fp32 rounding scale, which only the float64 "
               "noise floor sees free-running", "layers.0.input_layernorm", _decoder_norm_eps),
        Defect("untied-head-tied", "logits", "an untied checkpoint's own lm_head ignored: logits from the tied "
               "token embedding (only a tie_word_embeddings false config shows it)", "logits", _untied_head_tied),
        Defect("patch-geometry-default", "preprocessing", "the processor's class defaults (16 px patches, 3x3 "
               "pooling) instead of the checkpoint's vision_config (only other geometries show it)",
               "image.pixel_values", _patch_geometry_default),
        Defect("rope-default-factor", "rope", "a config without rope_parameters gets partial_rotary_factor 0.5 "
               "for full attention instead of HF's default 0.25", "layers.{first_full}.attn.q", _rope_default_factor),
        Defect("gate-up-swapped", "loader", "checkpoint gate_proj and up_proj loaded into each other's slots "
               "(a fused gate_up split in the wrong order): same shapes, so no shape check sees it",
               "layers.0.mlp.out", _gate_up_swapped),
        Defect("k-eq-v-ignored", "loader", "attention_k_eq_v ignored: full layers built with their own v_proj, "
               "which the checkpoint does not have", "load", _k_eq_v_ignored, load_error="self_attn.v_proj.weight"),
        Defect("mx-scale-exponent-off-by-one", "quantization", "MXFP8 E8M0 scale exponent off by one (bias 127 "
               "vs 126): every block decoded at twice its value", _MX_STAGE, _codec(_scale_exponent_plus_one), _MX),
        Defect("mx-scales-shifted-block", "quantization",
               "MXFP8 scales applied to the wrong block (flat block j uses block j-1's scale)",
               _MX_STAGE, _codec(_scales_shifted), _MX),
        Defect("mx-e5m2", "quantization", "MXFP8 elements encoded as FP8 E5M2 instead of E4M3",
               _MX_STAGE, _codec(_set_weight_e5m2), _MX),
        Defect("mx-scale-ocp-floor", "quantization", "MXFP8 scale by the OCP MX v1.0 text, 2^(floor(log2 amax) "
               "- 8), not MLX's smallest power of two >= amax / 448: a block's largest elements saturate at 448",
               _MX_STAGE, _scale_ocp_floor, _MX),
    )
}


def expected_stage(defect: Defect, layer_types: list[str], stage_names: list[str]) -> str:
    """``defect.stage`` for one case: its placeholders resolved from the model's layer types and the
    case's stage names (forward order)."""
    stage = defect.stage
    if "{first_full}" in stage:
        stage = stage.replace("{first_full}", str(layer_types.index("full_attention")))
    if "{first_qweight}" in stage:
        stage = stage.replace("{first_qweight}", next((n for n in stage_names if n.endswith(".weight")), "?"))
    return stage
