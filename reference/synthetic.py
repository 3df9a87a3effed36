"""Synthetic checkpoints of the real Gemma 4 unified shapes: real HF layout, random weights, streamed.

``write(out, "12b", layers=48)`` writes ``config.json`` (made by transformers' own config class),
``model-XXXXX-of-YYYYY.safetensors`` shards and ``model.safetensors.index.json``, the layout
``save_pretrained`` produces for a sharded checkpoint. The tensor names and shapes come from HF's
model instantiated on the ``meta`` device (no memory), renamed to the on-disk spelling
``save_pretrained`` writes (tests/test_synthetic.py checks the rule against the committed tiny
fixtures). Values are drawn per tensor from a seed derived from its name, in row chunks, so one shard
at a time is held in memory (at most ``shard_bytes``, or one tensor when a tensor is larger): a
48-layer 12B-shaped checkpoint (~24 GB in bf16) is written with ~2 GB resident.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import save_file

from reference.fixtures import TOKEN_IDS

# Text: hidden 3840, intermediate 15360, 16 heads of 256 (512 on full layers), 8 KV heads (1 on full
# layers, with attention_k_eq_v), sliding window 1024, every 6th layer full, vocab 262144.
# Vision: 6912 -> 3840, position table 1120. "mini" has the same structure at toy sizes (for tests).
SHAPES: dict[str, dict] = {
    "12b": dict(layers=48, text=dict(vocab_size=262144, hidden_size=3840, intermediate_size=15360,
                                     num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                     global_head_dim=512, num_global_key_value_heads=1, attention_k_eq_v=True,
                                     sliding_window=1024, final_logit_softcapping=30.0),
                vision=dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=3840, output_proj_dims=3840,
                            mm_posemb_size=1120)),
    "mini": dict(layers=12, text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, global_head_dim=32,
                                      num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=16,
                                      final_logit_softcapping=30.0),
                 vision=dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=32, output_proj_dims=32,
                             mm_posemb_size=1120)),
}
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
_ROWS = 4096  # rows drawn at a time (bounds the float64 scratch of a large tensor)
_NORMS = ("layernorm.weight", "q_norm.weight", "k_norm.weight", "norm.weight", "patch_ln1.weight",
          "patch_ln2.weight")


def config(shape: str, layers: int | None = None):
    """The HF config of a synthetic shape: every 6th layer full attention, and the last one (HF requires it)."""
    from transformers import Gemma4UnifiedConfig

    spec = SHAPES[shape]
    n = spec["layers"] if layers is None else layers
    text = dict(spec["text"], num_hidden_layers=n, pad_token_id=0, bos_token_id=2, eos_token_id=1,
                layer_types=["full_attention" if i % 6 == 5 or i == n - 1 else "sliding_attention" for i in range(n)])
    return Gemma4UnifiedConfig(text_config=text, vision_config=spec["vision"], audio_config=None, **TOKEN_IDS)


def on_disk(name: str) -> str:
    """A state_dict key -> the key ``save_pretrained`` writes."""
    for old, new in (("model.embed_vision.multimodal_embedder.embedding_projection.",
                      "model.embed_vision.embedding_projection."), ("model.embed_vision.", "model.vision_embedder.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def tensors(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(on-disk name, shape) of every stored tensor, in HF's state_dict order (tied lm_head left out)."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    with torch.device("meta"):
        model = Gemma4UnifiedForConditionalGeneration(cfg)
    return [(on_disk(k), tuple(v.shape)) for k, v in model.state_dict().items() if k != "lm_head.weight"]


def values(name: str, shape: tuple[int, ...], dtype, seed: int = 0) -> np.ndarray:
    """Deterministic values for one tensor (the fixture conventions: norms 1 + 0.1 N, biases 0.1 N,
    layer_scalar 0.8..1.2, linears and embeddings N(0, 1/fan_in)), drawn ``_ROWS`` rows at a time.

    q_norm / k_norm weights are also scaled by d^-1/4 (d the head size), so attention scores have unit
    variance, as a trained model keeps them. With unit weights the scores of this scale-1.0 (QK-norm)
    attention have standard deviation sqrt(d) = 16 at d = 256: attention is near-argmax, fp32 rounding
    flips which key wins, and a 48-layer free-running comparison is chaos (measured: top-1 agreement
    2% at the logits, first stage over tolerance at layer 3), which says nothing about a port."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    out = np.empty(shape, dtype)
    flat = out.reshape(-1, shape[-1]) if len(shape) > 1 else out.reshape(1, -1)
    if name.endswith("layer_scalar"):
        layer = int(name.split(".layers.")[1].split(".")[0])
        out[...] = (0.8, 0.9, 1.1, 1.2)[layer % 4]
        return out
    for start in range(0, flat.shape[0], _ROWS):
        block = rng.standard_normal((min(_ROWS, flat.shape[0] - start), flat.shape[1]), dtype=np.float32)
        if name.endswith(_NORMS):
            block = 1.0 + 0.1 * block
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                block *= shape[-1] ** -0.25
        elif name.endswith(".bias") or name.endswith("pos_embedding"):
            block *= 0.1 if name.endswith(".bias") else 0.5
        else:
            block *= 1.0 / np.sqrt(shape[-1])
        flat[start:start + block.shape[0]] = block.astype(dtype)
    return out


def write(out: Path, shape: str = "12b", layers: int | None = None, dtype: str = "bfloat16",
          shard_bytes: int = 2 << 30, seed: int = 0, progress=None) -> dict:
    """Write the checkpoint into the folder ``out`` (created if missing; it must be empty).
    ``rmlx-parity fixtures --shape`` writes into a temporary folder renamed into place (``parity.atomic``).
    Returns the index (``weight_map`` and ``metadata.total_size``)."""
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: known shapes are {sorted(SHAPES)}")
    if layers is not None and layers < 1:
        raise ValueError(f"--layers must be >= 1, got {layers}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not empty; choose a new folder")
    cfg = config(shape, layers)
    cfg.dtype = dtype
    np_dtype = DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in tensors(cfg):  # group into shards of at most shard_bytes, in state_dict order
        nbytes = int(np.prod(shp)) * itemsize
        if plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, shp))
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        arrays = {name: values(name, shp, np_dtype, seed) for name, shp in shard}
        save_file(arrays, str(out / file), metadata={"format": "pt"})
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update({name: file for name in arrays})
        del arrays
        if progress:
            progress(i + 1, len(plan), file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / "config.json").write_text(cfg.to_json_string())
    return index
