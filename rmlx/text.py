"""Gemma 4 unified text decoder: parameters, laid out with the HF checkpoint names (catalog §3, §7.1).

Each layer's shapes come from its resolved ``LayerSpec``: per-layer head size and KV heads, KV-shared
("reuse") layers without k/v projections, ``attention_k_eq_v`` full layers without ``v_proj``, and
double-wide MLPs. The forward pass (masks, RoPE, attention) is the decoder issue's work; until it
lands this module is what the strict loader checks a checkpoint against.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from rmlx.config import LayerSpec, TextConfig


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        d, n_kv = spec.head_dim, spec.num_key_value_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * d, bias=False)
        self.q_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=False)
        if not spec.kv_shared:  # "reuse" layers take K and V from an earlier layer of their type
            self.k_proj = nn.Linear(cfg.hidden_size, n_kv * d, bias=False)
            self.k_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
            if not spec.k_eq_v:  # full layers of a k_eq_v model reuse the raw K projection as V
                self.v_proj = nn.Linear(cfg.hidden_size, n_kv * d, bias=False)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        spec = cfg.layer(i)
        self.self_attn = Attention(cfg, spec)
        self.mlp = MLP(cfg.hidden_size, spec.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_feedforward_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.layer_scalar = mx.ones((1,))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
