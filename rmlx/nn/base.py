"""Shared ops of the port."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

_STREAMS: list[mx.Stream] = []
HALVES_MIN = 1 << 20  # elements: below this, splitting costs more than it saves


def _splits(x: mx.array, axis: int) -> bool:
    """Does splitting ``x`` in two along ``axis`` pay? (CPU, at least HALVES_MIN values, two slices.)"""
    return x.size >= HALVES_MIN and x.ndim > 0 and x.shape[axis] >= 2 and mx.default_device() == mx.cpu


def halves(fn, *xs: mx.array, axis: int) -> mx.array:
    """``fn(*xs)`` computed as two halves along ``axis``, on two CPU streams (so on two cores).

    For a ``fn`` that treats the slices along ``axis`` independently: element-wise ops, a softmax or a
    norm over another axis. MLX runs a CPU stream's element-wise and reduction kernels on one thread
    (measured on 2 cores: tanh 16 ns and exp 13 ns per value; gelu-tanh over 1127 x 15360 values 0.46 s,
    0.28 s in halves). Matmuls stay whole: BLAS already uses every core. The halves are computed by the
    same kernels, so the values are the same. Small inputs, and GPU streams, run ``fn(*xs)`` as it is.
    The halves are joined by one copy (``mx.concatenate``, one thread): a chain of such steps between
    two matmuls can keep its rows apart instead (:func:`split_rows`, :func:`on_streams`).
    """
    if not _splits(xs[0], axis):
        return fn(*xs)
    mid = xs[0].shape[axis] // 2
    return mx.concatenate(on_streams(fn, *(mx.split(x, [mid], axis=axis) for x in xs)), axis=axis)


def split_rows(x: mx.array) -> list[mx.array]:
    """``x`` as two halves of its rows (axis -2) for :func:`on_streams`, or ``[x]`` when halves would not pay.

    Rows kept apart through several row-wise steps skip the join of every :func:`halves` (a full copy
    on one thread, ~2 ms per 1120 x 3840 fp32): each step runs on both halves at once, and
    :func:`join_rows` joins them once, before the next matmul (which runs whole: on each half in turn
    it was measured 5-10 % slower).
    """
    if not _splits(x, -2):
        return [x]
    return mx.split(x, [x.shape[-2] // 2], axis=-2)


def split_like(x: mx.array, parts: list[mx.array]) -> list[mx.array]:
    """``x`` (rows on axis -2, e.g. position ids) split where :func:`split_rows` split ``parts``."""
    return [x] if len(parts) == 1 else mx.split(x, [parts[0].shape[-2]], axis=-2)


def on_streams(fn, *parts: list[mx.array]) -> list[mx.array]:
    """``fn`` on each row part (with its row-aligned companions): part *i* on CPU stream *i*."""
    if len(parts[0]) == 1:
        return [fn(*(p[0] for p in parts))]
    out = []
    for stream, args in zip(cpu_streams(), zip(*parts, strict=True), strict=True):
        with mx.stream(stream):
            out.append(fn(*args))
    return out


def join_rows(parts: list[mx.array]) -> mx.array:
    """The inverse of :func:`split_rows`."""
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-2)


def over_rows(fn, x: mx.array) -> mx.array:
    """``fn(x)`` for a row-wise ``fn`` (a norm over the last axis), in :func:`halves` of the rows."""
    return fn(x) if x.ndim < 2 else halves(fn, x, axis=-2)


def cpu_streams() -> tuple[mx.Stream, mx.Stream]:
    """The default CPU stream and a second one (made once): MLX runs each on its own thread."""
    if not _STREAMS:
        _STREAMS.append(mx.new_stream(mx.cpu))
    return mx.default_stream(mx.cpu), _STREAMS[0]


def _blocked_mean(x: mx.array) -> mx.array:
    """Mean over the last axis as a sum of block sums (block <= 64), keepdims.

    MLX's CPU reduction adds an fp32 row sequentially: over a 6912-wide patch row that loses
    ~1e-5 relative (measured: sum 3469.506 vs exact 3469.553), enough to move a LayerNorm output
    by 3e-3. Summing blocks first keeps every partial sum small (pairwise-like error growth). (The block
    sums as a BLAS matrix-vector product were tried: faster by ~1 % of the vision embedder, but 2-3x
    further from HF in the decoder's RMSNorms, where the committed baselines caught it.)
    """
    n = x.shape[-1]
    block = 64
    while n % block:
        block //= 2
    return x.reshape(*x.shape[:-1], n // block, block).sum(-1).sum(-1, keepdims=True) / n


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """:func:`layer_norm_rows`, :func:`over_rows`."""
    return over_rows(lambda rows: layer_norm_rows(rows, weight, bias, eps), x)


def layer_norm_rows(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """torch.nn.LayerNorm (biased variance), accurate in fp32 on long rows; on the current stream.

    Shifted two-pass: subtracting the row's first element makes constant rows exactly zero
    (a solid-colour patch collapses to ``bias`` exactly, as in torch) and keeps sums small.
    Measured against float64 on 6912-wide rows of pixels: 1.2e-6 (torch: 1.8e-6); mx.fast.layer_norm: 2.9e-3.
    """
    dtype = x.dtype
    x = x.astype(mx.float32)
    d = x - x[..., :1]
    d = d - _blocked_mean(d)
    var = _blocked_mean(d * d)
    return (d * mx.rsqrt(var + eps) * weight.astype(mx.float32) + bias.astype(mx.float32)).astype(dtype)


class LayerNorm(nn.Module):
    """``nn.LayerNorm``'s parameters (``weight``, ``bias``), computed with :func:`layer_norm`."""

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return layer_norm(x, self.weight, self.bias, self.eps)


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """Gemma 4 RMSNorm: ``x * (mean(x^2) + eps)^-1/2 * w`` in fp32, cast back (``x_hat * w``, not ``1 + w``).

    ``weight=None`` is the weightless norm (v_norm, the multimodal pre-projection norm). Computed in
    :func:`over_rows`.
    """
    return over_rows(lambda rows: rms_norm_rows(rows, weight, eps), x)


def rms_norm_rows(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """:func:`rms_norm` on the current stream."""
    dtype = x.dtype
    x = x.astype(mx.float32)
    y = x * mx.rsqrt(_blocked_mean(x * x) + eps)
    if weight is not None:
        y = y * weight.astype(mx.float32)
    return y.astype(dtype)


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm with a learnable ``weight`` (checkpoint name), computed by :func:`rms_norm`."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)


class RoPE:
    """HF's rotary embedding for one layer type (catalog §3.6), applied to x (B, L, heads, d).

    ``default``: inverse frequencies theta^(-2i/d) for all d/2 pairs. ``proportional``: only the first
    n_rot = int(partial_rotary_factor * d // 2) pairs rotate, still with exponent 2i/d over the *full*
    head size; the others get frequency 0 (cos 1, sin 0). Pairs are half-split, (i, i + d/2).
    cos/sin are computed in fp32 from ``positions * inv_freq`` (as HF), then cast to x's dtype.
    """

    def __init__(self, head_dim: int, rope: dict):
        self.kind = rope.get("rope_type", "default")
        if self.kind not in ("default", "proportional"):
            raise ValueError(f"unsupported rope_type '{self.kind}'")
        self.theta = float(rope["rope_theta"])
        half = head_dim // 2
        fraction = float(rope.get("partial_rotary_factor", 1.0)) if self.kind == "proportional" else 1.0
        self.n_rot = int(fraction * head_dim // 2)
        i = mx.arange(half, dtype=mx.float32)
        inv = 1.0 / (self.theta ** (2 * i / head_dim))
        self.inv_freq = mx.where(i < self.n_rot, inv, 0.0) / float(rope.get("factor", 1.0))

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        return _rotate(x, self.inv_freq, offset)


def _rotate(x: mx.array, inv: mx.array, offset: int) -> mx.array:
    pos = mx.arange(offset, offset + x.shape[1], dtype=mx.float32)
    freqs = pos[:, None] * inv[None, :]  # (L, d/2)
    emb = mx.concatenate([freqs, freqs], axis=-1)[None, :, None, :]  # (L, d) -> (1, L, 1, d)
    cos, sin = mx.cos(emb).astype(x.dtype), mx.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half
    return x * cos + rotated * sin


def block_ids(mm_token_type_ids: mx.array) -> mx.array:
    """Image/video blocks (catalog §4.1): each maximal run of type 1 or 2 gets an id 0, 1, ...; else -1."""
    vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    prev = mx.concatenate([mx.zeros_like(vision[:, :1]), vision[:, :-1]], axis=1)
    starts = vision & ~prev
    return mx.where(vision, mx.cumsum(starts.astype(mx.int32), axis=1) - 1, -1)


MASK_POLICIES = ("official", "hf-forward")


def attention_masks(mm_token_type_ids: mx.array, sliding_window: int, policy: str) -> dict[str, mx.array]:
    """Boolean (B, L, L) masks, True = may attend, for both layer types (built once per forward).

    ``official`` (google-deepmind/gemma): full = causal; sliding = (causal | block) & window.
    ``hf-forward`` (transformers 5.24 forward): full = causal | block; sliding = (causal & window) | block.
    window: k > q - W (W keys including the query itself); block: same image block.
    """
    if policy not in MASK_POLICIES:
        raise ValueError(f"mask policy '{policy}' is not one of {MASK_POLICIES}")
    length = mm_token_type_ids.shape[1]
    q = mx.arange(length)[:, None]
    k = mx.arange(length)[None, :]
    causal = (k <= q)[None]  # (1, L, L)
    window = (k > q - sliding_window)[None]
    b = block_ids(mm_token_type_ids)
    block = (b[:, :, None] == b[:, None, :]) & (b[:, :, None] >= 0)  # (B, L, L)
    if policy == "official":
        return {"full_attention": mx.broadcast_to(causal, block.shape), "sliding_attention": (causal | block) & window}
    return {"full_attention": causal | block, "sliding_attention": (causal & window) | block}
