"""Gemma 4 unified text decoder (catalog §3), ordered like mlx-lm's gemma4_text.py.

Sandwich RMSNorms (``x_hat * w``), q/k norms before RoPE, a weightless v norm, attention scale 1.0,
per-layer head size and KV heads, default RoPE on sliding layers and proportional RoPE on full
layers, ``attention_k_eq_v`` (full layers reuse the raw K projection as V), KV sharing ("reuse"
layers take K/V from the last earlier layer of their type), double-wide MLPs, gelu-tanh,
``layer_scalar`` on the residual stream, tied lm_head, optional final soft-cap.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from rmlx.nn import fastmath
from rmlx.nn.base import RMSNorm, RoPE, cpu_streams, halves, rms_norm
from rmlx.nn.config import LayerSpec, TextConfig
from rmlx.nn.kernels import Linear, bmm_t, matmul_t
from rmlx.tap import layer_stages, tap


class KVCache:
    """Keys/values of one layer, (B, kv_heads, T, d). Sliding layers keep only the last W - 1 positions:
    with the query itself that is the W keys the window admits (a rotating cache)."""

    def __init__(self, window: int | None = None):
        self.window = window
        self.keep = None if window is None else window - 1  # keys kept after a step; the next query is the W-th
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append, return everything this step attends to, then trim to the window."""
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)  # (B, kv, T + L, d)
            values = mx.concatenate([self.values, values], axis=2)
        start = 0 if self.keep is None else max(keys.shape[2] - self.keep, 0)
        self.keys, self.values = keys[:, :, start:], values[:, :, start:]
        return keys, values


SCORES_BLOCK = 1 << 18  # attention scores per block on the CPU (1 MiB in fp32): a block's softmax stays in L2


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
    """q (B, H, L, d), k/v (B, kv, T, d), mask (B, L, T) bool -> (B, L, H*d). Scale 1.0 (QK-norm).

    Rounds where HF's eager attention rounds: the scores are a matmul in the activation dtype, the
    softmax runs in fp32 and is cast back, then probabilities @ V. In bf16 this matters: a fused kernel
    that keeps fp32 scores differs from HF by ~0.1 at the layer outputs of the tiny fixtures.

    On the CPU, long sequences go in blocks of one head and ``SCORES_BLOCK // T`` query rows, on two
    streams in turn: each block's scores, softmax and probabilities @ V run while its scores are in
    cache (the whole (H, L, T) array at 1127 tokens is 81 MB; each pass over it costs a trip to memory).
    Every row sees all its keys, so the blocks compute exactly what the whole array would.
    """
    b, heads, length, _ = q.shape
    groups = heads // k.shape[1]
    bias = None if mask is None else mx.where(mask, mx.array(0.0), mx.array(-mx.inf))[:, None]  # (B, 1, L, T)
    if mx.default_device() != mx.cpu or heads * length * k.shape[2] < 2 * SCORES_BLOCK:
        if groups > 1:  # GQA: query head h uses kv head h // groups
            k = mx.repeat(k, groups, axis=1)
            v = mx.repeat(v, groups, axis=1)
        out = _attend(q, k, v, bias)  # (B, H, L, d)
        return out.transpose(0, 2, 1, 3).reshape(b, length, -1)
    rows = max(1, SCORES_BLOCK // k.shape[2])
    starts = range(0, length, rows)
    streams = cpu_streams()
    per_head = []  # (B, L, d) each, in head order: joined on the last axis they are (B, L, H*d)
    for h in range(heads):
        kh, vh = k[:, h // groups], v[:, h // groups]  # (B, T, d)
        blocks = []
        for j, start in enumerate(starts):
            with mx.stream(streams[(h * len(starts) + j) % 2]):
                blocks.append(_attend(q[:, h, start:start + rows], kh, vh,
                                      None if bias is None else bias[:, 0, start:start + rows]))
        per_head.append(mx.concatenate(blocks, axis=1))
    return mx.concatenate(per_head, axis=-1)


def _attend(q: mx.array, k: mx.array, v: mx.array, bias: mx.array | None) -> mx.array:
    """softmax(q k^T + bias) v over the last two axes; ``bias`` 0 / -inf (fp32)."""
    scores = bmm_t(q, k)
    return bmm_t(fastmath.softmax(scores.astype(mx.float32), bias).astype(q.dtype), v.swapaxes(-1, -2))


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        d, n_kv = spec.head_dim, spec.num_key_value_heads
        self.spec = spec
        self.n_heads = cfg.num_attention_heads
        self.q_proj = Linear(cfg.hidden_size, cfg.num_attention_heads * d, bias=False)
        self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps)
        self.o_proj = Linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=False)
        if not spec.kv_shared:  # "reuse" layers take K and V from an earlier layer of their type
            self.k_proj = Linear(cfg.hidden_size, n_kv * d, bias=False)
            self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps)
            if not spec.k_eq_v:
                self.v_proj = Linear(cfg.hidden_size, n_kv * d, bias=False)
        self.eps = cfg.rms_norm_eps
        self.rope = RoPE(d, cfg.rope_parameters[spec.layer_type])

    def __call__(self, x: mx.array, mask: mx.array | None, cache: KVCache | None, offset: int,
                 shared_kv: tuple[mx.array, mx.array] | None, names: dict[str, str]
                 ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """x (B, L, H) -> (out (B, L, H), (K, V) as attended, (B, kv_heads, T, d))."""
        b, length, _ = x.shape
        d = self.spec.head_dim
        q = self.q_proj(x).reshape(b, length, self.n_heads, d)  # (B, L, H*d) -> (B, L, H, d)
        q = tap(names["attn.q"], self.rope(self.q_norm(q), offset))
        if shared_kv is not None:
            keys, values = shared_kv
        else:
            k = self.k_proj(x).reshape(b, length, -1, d)  # (B, L, kv*d) -> (B, L, kv, d)
            v = self.v_proj(x).reshape(b, length, -1, d) if "v_proj" in self else k  # k_eq_v: raw K
            k = tap(names["attn.k"], self.rope(self.k_norm(k), offset))
            v = tap(names["attn.v"], self.v_norm(v))
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, L, kv, d) -> (B, kv, L, d)
            if cache is not None:
                keys, values = cache.update(keys, values)
        out = attention(q.transpose(0, 2, 1, 3), keys, values, mask)  # (B, L, H, d) -> (B, H, L, d) -> (B, L, H*d)
        return tap(names["attn.out"], self.o_proj(out)), (keys, values)

    def v_norm(self, v: mx.array) -> mx.array:
        """HF's ``v_norm``: RMSNorm without a weight."""
        return rms_norm(v, None, self.eps)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        def gated(gate: mx.array, up: mx.array) -> mx.array:
            if gate.dtype == mx.float32:
                return fastmath.gelu_tanh(gate, up)
            return fastmath.gelu_tanh(gate.astype(mx.float32)).astype(x.dtype) * up  # torch: gelu in fp32

        return self.down_proj(halves(gated, self.gate_proj(x), self.up_proj(x), axis=-2))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        self.spec = spec = cfg.layer(i)
        self.names = layer_stages(i)
        self.self_attn = Attention(cfg, spec)
        self.mlp = MLP(cfg.hidden_size, spec.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x: mx.array, mask: mx.array | None, cache: KVCache | None, offset: int,
                 shared_kv: tuple[mx.array, mx.array] | None) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        n = self.names
        h = tap(n["input_layernorm"], self.input_layernorm(x))
        h, kv = self.self_attn(h, mask, cache, offset, shared_kv, n)
        x = x + self.post_attention_layernorm(h)
        h = tap(n["mlp.out"], self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.post_feedforward_layernorm(h)
        return tap(n["out"], x * self.layer_scalar.astype(x.dtype)), kv


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig, tied: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if not tied:  # tie_word_embeddings false: the checkpoint's own lm_head.weight
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        # Reuse layers read K/V from the last non-shared layer of the same type (HF "store" layers).
        first_shared = cfg.num_hidden_layers - cfg.num_kv_shared_layers
        self.kv_source = {
            i: max(j for j in range(first_shared) if cfg.layer_types[j] == cfg.layer_types[i])
            for i in range(first_shared, cfg.num_hidden_layers)
        }
        self.kv_sources = frozenset(self.kv_source.values())

    def embed(self, input_ids: mx.array) -> mx.array:
        """E[ids] * sqrt(H), the scale rounded to the weight dtype first (catalog §3.1)."""
        e = self.embed_tokens(input_ids)
        return e * mx.array(math.sqrt(self.cfg.hidden_size), dtype=e.dtype)

    def make_cache(self) -> list[KVCache | None]:
        return [None if i in self.kv_source else
                KVCache(self.cfg.sliding_window if t == "sliding_attention" else None)
                for i, t in enumerate(self.cfg.layer_types)]

    def step(self, i: int, layer: DecoderLayer, h: mx.array, masks: dict[str, mx.array] | None,
             cache: list[KVCache | None] | None, offset: int, attended: dict[int, tuple[mx.array, mx.array]]
             ) -> mx.array:
        """Decoder layer ``i`` (``layer``: this model's own, or one a streaming loader materialised).
        ``attended`` carries the K/V of the layers that later "reuse" layers read."""
        mask = None if masks is None else masks[layer.spec.layer_type]
        shared = attended[self.kv_source[i]] if i in self.kv_source else None
        h, kv = layer(h, mask, None if cache is None else cache[i], offset, shared)
        if i in self.kv_sources:
            attended[i] = kv
        return h

    def head(self, h: mx.array) -> mx.array:
        """Final norm, tied lm_head (``embed_tokens.as_linear``), optional soft-cap: (B, L, H) -> (B, L, V).
        A streamed model's embedding (``rmlx.models.gemma4_unified.stream.RowsEmbedding``, not an ``nn`` one)
        applies the soft-cap to each vocabulary chunk of its product; otherwise it runs on row halves of the whole."""
        h = tap("text.norm", self.norm(h))
        cap = self.cfg.final_logit_softcapping
        if "lm_head" in self:
            logits = self.lm_head(h)
            return tap("logits", logits if cap is None else mx.tanh(logits / cap) * cap)

        def softcap(x: mx.array) -> mx.array:
            return mx.tanh(x / cap) * cap

        if isinstance(self.embed_tokens, nn.Embedding):  # embed_tokens.as_linear, on rmlx.nn.kernels' GEMM
            logits = matmul_t(h, self.embed_tokens.weight)
        elif isinstance(self.embed_tokens, nn.QuantizedEmbedding):
            logits = self.embed_tokens.as_linear(h)
        else:  # rmlx.models.gemma4_unified.stream.RowsEmbedding: the soft-cap on each vocabulary chunk
            return tap("logits", self.embed_tokens.as_linear(h, None if cap is None else softcap))
        return tap("logits", logits if cap is None else halves(softcap, logits, axis=-2))

    def __call__(self, inputs_embeds: mx.array, masks: dict[str, mx.array] | None,
                 cache: list[KVCache | None] | None = None, offset: int = 0) -> mx.array:
        """inputs_embeds (B, L, H) -> logits (B, L, V). ``masks`` None = every cached key is visible
        (a decode step: the rotating cache already applies the window)."""
        h = inputs_embeds
        attended: dict[int, tuple[mx.array, mx.array]] = {}
        for i, layer in enumerate(self.layers):
            h = self.step(i, layer, h, masks, cache, offset, attended)
        return self.head(h)
