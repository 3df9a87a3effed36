"""HF reference for the gemma4 port: the stage table (name -> module path under
``Gemma4ForConditionalGeneration`` + how to read it) and a forward-hook capture.

Read kinds (``reference.gemma4_unified.hf.HFRunner.hooks`` has the first five; ``rope2d`` and ``output_batched`` are
new here):
  ``output``          the module's output (first element of a tuple / ModelOutput)
  ``output_batched``  the same with a leading batch axis added ((N, D) -> (1, N, D))
  ``kwarg:NAME``      a keyword argument of the module's call
  ``mask``            a decoder layer's ``attention_mask`` kwarg as boolean (B, Lq, Lk), True = may attend
  ``rope``            a text q_norm/k_norm output rotated by HF's ``apply_rotary_pos_emb`` with the
                      (cos, sin) its decoder layer received
  ``rope2d``          a vision q_norm/k_norm output rotated by HF's ``apply_multidimensional_rope`` with
                      the (cos, sin) and ``position_ids`` its encoder layer received
  ``processor``       a key of the image processor's output (not a hook)
  ``result``          the forward's return value (``logits``)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from reference import float64
from reference.float64 import float64_inv_freq  # noqa: F401  (re-exported)
from reference.torch_ops import (
    FLOAT64_ATTENTION,
    bool_mask,
    forward_kwargs,
    register_float64_attention,
    to_numpy,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

VT = "model.vision_tower"
LM = "model.language_model"

# (stage point, module path under the layer, read)
VISION_LAYER = (
    ("attn.q", "self_attn.q_norm", "rope2d"),
    ("attn.k", "self_attn.k_norm", "rope2d"),
    ("attn.v", "self_attn.v_norm", "output"),
    ("attn.out", "self_attn", "output"),
    ("mlp.out", "mlp", "output"),
    ("out", "", "output"),
)
TEXT_LAYER = (
    ("input_layernorm", "input_layernorm", "output"),
    ("attn.q", "self_attn.q_norm", "rope"),
    ("attn.k", "self_attn.k_norm", "rope"),
    ("attn.v", "self_attn.v_norm", "output"),
    ("attn.out", "self_attn", "output"),
    ("mlp.out", "mlp", "output"),
    ("out", "", "output"),
)


def stages(config, image: bool) -> dict[str, tuple[str, str]]:
    """{stage name: (HF module path or processor key, read)} in forward order, for a ``Gemma4Config``."""
    out: dict[str, tuple[str, str]] = {}
    if image:
        v = config.vision_config
        out["image.pixel_values"] = ("pixel_values", "processor")
        out["image.position_ids"] = ("image_position_ids", "processor")
        out["vision.patch_embed"] = (f"{VT}.patch_embedder.input_proj", "output")
        out["vision.pos_embed"] = (f"{VT}.patch_embedder", "output")
        for i in range(v.num_hidden_layers):
            for point, sub, read in VISION_LAYER:
                out[f"vision.layers.{i}.{point}"] = (f"{VT}.encoder.layers.{i}" + (f".{sub}" if sub else ""), read)
        out["vision.pooled"] = (f"{VT}.pooler", "output")
        if v.standardize:
            out["vision.standardized"] = (VT, "output_batched")
        out["vision.soft_tokens"] = ("model.embed_vision", "output_batched")
    t = config.get_text_config()
    out["text.embed_tokens"] = (f"{LM}.embed_tokens", "output")
    out["text.inputs_embeds"] = (LM, "kwarg:inputs_embeds")
    for kind in ("full_attention", "sliding_attention"):
        if kind in t.layer_types:
            out[f"mask.{kind}"] = (f"{LM}.layers.{t.layer_types.index(kind)}", "mask")
    shared_from = t.num_hidden_layers - t.num_kv_shared_layers
    for i in range(t.num_hidden_layers):
        for point, sub, read in TEXT_LAYER:
            if i >= shared_from and point in ("attn.k", "attn.v"):
                continue  # a "reuse" layer has no K/V of its own
            out[f"layers.{i}.{point}"] = (f"{LM}.layers.{i}" + (f".{sub}" if sub else ""), read)
    out["text.norm"] = (f"{LM}.norm", "output")
    out["logits"] = ("lm_head", "result")
    return out


def _first(output):
    if isinstance(output, tuple | list) or hasattr(output, "to_tuple"):
        return output[0]
    return output


@contextlib.contextmanager
def hooks(model: torch.nn.Module, points: Mapping[str, tuple[str, str]], out: dict[str, np.ndarray]
          ) -> Iterator[None]:
    """Record the hook-read ``points`` into ``out`` while active (``processor`` / ``result`` are skipped)."""
    from transformers.models.gemma4.modeling_gemma4 import apply_multidimensional_rope, apply_rotary_pos_emb

    handles = []
    layer_kwargs: dict[str, dict] = {}

    def stash(layer):
        def pre(mod, args, kwargs):
            layer_kwargs[layer] = kwargs
        return pre

    try:
        for name, (path, read) in points.items():
            if read in ("processor", "result"):
                continue
            module = model.get_submodule(path)
            if read in ("rope", "rope2d"):
                layer = path.split(".self_attn.")[0]
                if layer not in layer_kwargs:
                    layer_kwargs[layer] = {}
                    handles.append(model.get_submodule(layer).register_forward_pre_hook(stash(layer),
                                                                                       with_kwargs=True))

            def hook(mod, args, kwargs, output, name=name, path=path, read=read):
                if read == "output":
                    value = _first(output)
                elif read == "output_batched":
                    value = _first(output)[None]
                elif read.startswith("kwarg:"):
                    value = kwargs[read.split(":", 1)[1]]
                elif read == "mask":
                    x = args[0] if args else kwargs["hidden_states"]
                    value = bool_mask(kwargs["attention_mask"], x.shape[1])
                elif read == "rope":
                    cos, sin = layer_kwargs[path.split(".self_attn.")[0]]["position_embeddings"]
                    value = apply_rotary_pos_emb(output, cos, sin, unsqueeze_dim=2)
                elif read == "rope2d":
                    kw = layer_kwargs[path.split(".self_attn.")[0]]
                    cos, sin = kw["position_embeddings"]
                    value = apply_multidimensional_rope(output, cos, sin, kw["position_ids"])
                else:
                    raise ValueError(f"unknown read kind '{read}' for {path}")
                out[name] = to_numpy(value)

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def load(model_dir, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """``Gemma4ForConditionalGeneration`` from a checkpoint directory: CPU, eval, safetensors only."""
    from transformers import Gemma4ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return Gemma4ForConditionalGeneration.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True,
        local_files_only=True).eval()


def preprocess(model_dir, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """HF's ``Gemma4ImageProcessor`` (from the checkpoint's preprocessor_config.json) on RGB uint8 images."""
    from PIL import Image
    from transformers import Gemma4ImageProcessor

    processor = Gemma4ImageProcessor.from_pretrained(model_dir, local_files_only=True)
    out = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
    return {k: to_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in out.items()}


@torch.no_grad()
def forward(model, inputs: Mapping[str, np.ndarray], points: Mapping[str, tuple[str, str]]) -> dict[str, np.ndarray]:
    """One prefill with hooks. ``inputs``: input_ids, mm_token_type_ids, optionally pixel_values and
    image_position_ids. Returns the captures plus ``logits``."""
    kw = {"input_ids": torch.from_numpy(inputs["input_ids"]),
          "mm_token_type_ids": torch.from_numpy(inputs["mm_token_type_ids"])}
    if "pixel_values" in inputs:
        kw["pixel_values"] = torch.from_numpy(inputs["pixel_values"])
        kw["image_position_ids"] = torch.from_numpy(inputs["image_position_ids"])
    captured: dict[str, np.ndarray] = {}
    with hooks(model, points, captured):
        out = model(**kw, use_cache=False)
    captured["logits"] = to_numpy(out.logits)
    return captured


def compute_in_float64(model: torch.nn.Module) -> None:
    """Make a float64 gemma4 model float64 throughout its decoder. transformers' code computes some steps in
    float32 whatever the model's dtype, which leaves fp32 rounding, shared with an fp32 reference, in a
    float64 oracle: ``Gemma4RMSNorm`` (``hidden_states.float()``, ``weight.float()``) and the text RoPE
    (inverse frequencies, angles, cos and sin in float32). Each such module of ``model`` gets a forward that
    computes the same formula in float64 (``reference.float64.compute_in_float64``, shared with the unified
    family's ``reference.gemma4_unified.hf.HFRunner``). The vision path has more (the pooler, the standardisation, its
    RoPE); the decoder's oracle takes the float64 NumPy vision oracle's soft tokens instead
    (``Runner.forward``'s ``image_features``)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm, Gemma4TextRotaryEmbedding

    float64.compute_in_float64(model, (Gemma4RMSNorm,), (Gemma4TextRotaryEmbedding,))


MASK_POLICIES = ("official", "hf-forward")


class Runner:
    """One gemma4 checkpoint on the HF side, loaded once: preprocessing, a prefill under a mask policy with
    hooks, and greedy decode steps with HF's own cache (the parity adapter's reference).

    Mask policies (``rmlx.nn.base.attention_masks`` names them): ``official`` is what
    ``Gemma4Model.forward`` builds itself (``create_masks_for_vision_model``: full causal, sliding
    (causal | block) & window); ``hf-forward`` is what the *unified* forward builds (full causal | block,
    sliding (causal & window) | block), made here by transformers' own mask functions and handed to the
    forward as the per-layer-type ``attention_mask`` dict (which ``Gemma4Model.forward`` takes as is).
    """

    def __init__(self, model_dir, dtype: str = "float32", attn_implementation: str = "eager", threads: int = 1):
        """``dtype="float64"`` with ``attn_implementation="eager_float64"`` (``reference.torch_ops.eager_float64``:
        the softmax in float64 too) is the decoder's float64 oracle (``parity.adapters.gemma4``); a float64
        model's RMSNorms and text RoPE compute in float64 too (``compute_in_float64``)."""
        torch.set_num_threads(threads)  # 1: reproducible sgemm across processes (see reference/gemma4_unified/hf.py)
        if attn_implementation == FLOAT64_ATTENTION:
            register_float64_attention()
        self.model_dir = model_dir
        self.model = load(model_dir, DTYPES[dtype], attn_implementation)
        if dtype == "float64":
            compute_in_float64(self.model)
        self.config = self.model.config

    def preprocess(self, images: list[np.ndarray], max_soft_tokens: int) -> dict[str, np.ndarray]:
        """HF's ``Gemma4ImageProcessor`` (the checkpoint's, at ``max_soft_tokens``) on RGB uint8 images."""
        from PIL import Image
        from transformers import Gemma4ImageProcessor

        processor = Gemma4ImageProcessor.from_pretrained(self.model_dir, local_files_only=True,
                                                         max_soft_tokens=max_soft_tokens)
        out = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
        return {k: to_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in out.items()}

    def token_types(self, input_ids: np.ndarray) -> np.ndarray:
        """The processor's ``mm_token_type_ids``: 1 image, 2 video, 3 audio token, else 0."""
        cfg = self.config
        types = np.zeros_like(input_ids, dtype=np.int64)
        for value, token in ((1, cfg.image_token_id), (2, cfg.video_token_id), (3, cfg.audio_token_id)):
            types[input_ids == token] = value
        return types

    def masks(self, policy: str, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor) -> dict:
        """{layer type: attention_mask} of a prefill under ``policy``, built by transformers' mask functions."""
        from transformers.masking_utils import (
            blockwise_overlay,
            create_causal_mask,
            create_sliding_window_causal_mask,
        )
        from transformers.models.gemma4.modeling_gemma4 import (
            Gemma4ForConditionalGeneration,
            get_block_sequence_ids_for_mask,
        )

        length = input_ids.shape[1]
        embeds = torch.zeros((1, length, self.config.get_text_config().hidden_size), dtype=self.model.dtype)
        position_ids = torch.arange(length)[None]
        if policy == "official":
            return Gemma4ForConditionalGeneration.create_masks_for_generate(
                self.config, embeds, None, None, position_ids, mm_token_type_ids)
        if policy != "hf-forward":
            raise ValueError(f"unknown mask policy '{policy}'")
        kw = {"config": self.config.get_text_config(), "inputs_embeds": embeds, "attention_mask": None,
              "cache": None, "position_ids": position_ids}
        if self.config.get_text_config().use_bidirectional_attention != "vision":
            return {"full_attention": create_causal_mask(**kw),
                    "sliding_attention": create_sliding_window_causal_mask(**kw)}
        overlay = blockwise_overlay(get_block_sequence_ids_for_mask(mm_token_type_ids, device=embeds.device))
        return {"full_attention": create_causal_mask(**kw, or_mask_function=overlay),
                "sliding_attention": create_sliding_window_causal_mask(**kw, or_mask_function=overlay)}

    @torch.no_grad()
    def forward(self, inputs: Mapping[str, np.ndarray], policy: str, points: Mapping[str, tuple[str, str]],
                decode_steps: int = 0, other_masks: dict | None = None, consistency: bool = True
                ) -> tuple[dict[str, np.ndarray], list[np.ndarray], list[int], float | None]:
        """Prefill with hooks under ``policy``, then ``decode_steps`` greedy steps with HF's cache.

        Returns (capture incl. ``logits``, each decode step's logits, the greedy tokens, self-consistency =
        max |logits(policy) - logits(HF's own forward)|: 0 under ``official``, which *is* HF's own forward).
        ``other_masks``: filled with the ``mask`` points as the other policy builds them (no extra forward).
        ``consistency=False``: no second forward under ``hf-forward`` (the float64 oracle's run); None returned.
        ``inputs["image_features"]`` (N, hidden), instead of pixel_values: the soft tokens scattered into the
        prompt (HF's ``mm_encoder_outputs``), the vision tower not run.
        """
        kw = forward_kwargs(inputs)
        ids = kw["input_ids"]
        if "image_features" in inputs:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            features = torch.from_numpy(inputs["image_features"]).to(self.model.dtype)
            kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=(features,))}
        own = dict(kw)
        if policy == "hf-forward":
            kw["attention_mask"] = self.masks(policy, ids, kw["mm_token_type_ids"])
        elif policy != "official":
            raise ValueError(f"unknown mask policy '{policy}'")
        captured: dict[str, np.ndarray] = {}
        with hooks(self.model, points, captured):
            out = self.model(**kw, use_cache=decode_steps > 0)
        captured["logits"] = to_numpy(out.logits)
        if not consistency:
            consistency = None
        elif policy != "official":
            consistency = float((self.model(**own, use_cache=False).logits - out.logits).abs().max())
        else:
            consistency = 0.0
        if other_masks is not None:
            other = self.masks("hf-forward" if policy == "official" else "official", ids, kw["mm_token_type_ids"])
            types = self.config.get_text_config().layer_types
            for name, (path, read) in points.items():
                if read == "mask":
                    layer_type = types[int(path.rsplit(".", 1)[1])]
                    other_masks[name] = to_numpy(bool_mask(other[layer_type], ids.shape[1]))
        steps, tokens = [], []
        cache = _cache(out)
        last = out.logits[:, -1]
        for step in range(decode_steps):
            token = int(last.argmax(-1))
            tokens.append(token)
            position = torch.tensor([[ids.shape[1] + step]])
            out = self.model(input_ids=torch.tensor([[token]]), cache=cache, position_ids=position, use_cache=True)
            cache = _cache(out)
            last = out.logits[:, -1]
            steps.append(to_numpy(out.logits))
        return captured, steps, tokens, consistency


def _cache(out):
    """The cache a forward returned (``cache`` in transformers 5.24, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return getattr(out, "past_key_values", None) if cache is None else cache
