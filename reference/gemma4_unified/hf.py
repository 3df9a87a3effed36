"""HF transformers reference runner: CPU PyTorch, eval(), no_grad, forward hooks.

``HFRunner`` loads a gemma4_unified checkpoint directory with transformers' own loader (safetensors
only: a pickle checkpoint is never unpickled), preprocesses with transformers' own image processor,
and captures named points of the forward pass through forward hooks. It knows module paths, not
parity stages: the caller hands it ``{name: (module_path, read)}``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reference import float64
from reference.torch_ops import (
    ATTN_IMPLEMENTATIONS,
    DTYPES,
    FLOAT64_ATTENTION,
    Capture,
    bool_mask,
    forward_kwargs,
    register_float64_attention,
    to_numpy,
)


def compute_in_float64(model: torch.nn.Module) -> None:
    """Make a float64 gemma4_unified model float64 throughout. transformers' code computes some steps in
    float32 whatever the model's dtype, which leaves fp32 rounding, shared with an fp32 reference, in a
    float64 oracle: ``Gemma4UnifiedRMSNorm`` (``hidden_states.float()``, ``weight.float()``: every norm of
    the decoder layers, q/k/v norms, the final norm, and the vision and audio embedders' pre-projection
    norm, whose output is the soft tokens the float64 run scatters into its prompt) and the text RoPE
    (``Gemma4UnifiedTextRotaryEmbedding``: inverse frequencies, angles, cos and sin in float32, the
    proportional type's included). Each such module gets a forward that computes the same formula in
    float64 (``reference.float64.compute_in_float64``, shared with the SigLIP family). The rest of the
    path is in the model's dtype already (LayerNorms, linears, GELU, the logit softcap) and the attention
    softmax is :func:`eager_float64`'s."""
    from transformers.models.gemma4_unified.modeling_gemma4_unified import (
        Gemma4UnifiedRMSNorm,
        Gemma4UnifiedTextRotaryEmbedding,
    )

    float64.compute_in_float64(model, (Gemma4UnifiedRMSNorm,), (Gemma4UnifiedTextRotaryEmbedding,))



class HFRunner:
    def __init__(self, model_dir: str | Path, dtype: str = "float32", attn_implementation: str = "eager",
                 threads: int = 1):
        """``threads``: torch's intra-op threads for this process. 1 by default: with 2 threads the
        MKL sgemm behind ``nn.Linear`` is not reproducible across processes (measured: 2 of 8 runs of
        the same case differed by 5e-4 at ``layers.1.attn.q``; 10 of 10 agreed bit for bit with 1).

        ``dtype="float64"`` with ``attn_implementation="eager_float64"`` is the decoder's float64 oracle
        (``parity.adapters.gemma4_unified``): a float64 model's RMSNorms and text RoPE compute in float64
        too (:func:`compute_in_float64`)."""
        from transformers import Gemma4UnifiedForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(threads)

        if attn_implementation == FLOAT64_ATTENTION:
            register_float64_attention()
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={attn_implementation!r} is not one of {ATTN_IMPLEMENTATIONS}")
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.model = Gemma4UnifiedForConditionalGeneration.from_pretrained(
            self.model_dir, dtype=DTYPES[dtype], attn_implementation=attn_implementation,
            use_safetensors=True, local_files_only=True,
        ).eval()
        if dtype == "float64":
            compute_in_float64(self.model)
        self.config = self.model.config
        self.capture_seconds = 0.0  # spent copying captures out in hooks (a harness cost)

    @staticmethod
    def preprocess(image: np.ndarray | list[np.ndarray], max_soft_tokens: int, model_dir: str | Path | None = None
                   ) -> dict[str, np.ndarray]:
        """transformers' ``Gemma4UnifiedImageProcessor`` on decoded RGB uint8 (H, W, 3) images, built as
        ``from_pretrained`` builds it for ``model_dir``: its ``preprocessor_config.json`` when there is
        one, else the checkpoint's ``vision_config`` patch size and pooling kernel (the class defaults
        only without a ``model_dir``)."""
        from transformers import Gemma4UnifiedImageProcessor

        images = image if isinstance(image, list) else [image]
        model_dir = None if model_dir is None else Path(model_dir)
        if model_dir is not None and (model_dir / "preprocessor_config.json").is_file():
            processor = Gemma4UnifiedImageProcessor.from_pretrained(model_dir, max_soft_tokens=max_soft_tokens,
                                                                    local_files_only=True)
        else:
            import json

            vision = ({} if model_dir is None else
                      json.loads((model_dir / "config.json").read_text()).get("vision_config") or {})
            processor = Gemma4UnifiedImageProcessor(
                max_soft_tokens=max_soft_tokens,
                **{k: vision[k] for k in ("patch_size", "pooling_kernel_size") if k in vision})
        out = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
        return {k: to_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in out.items()}

    @contextlib.contextmanager
    def hooks(self, points: Mapping[str, tuple[str, str]], out: Capture) -> Iterator[None]:
        """Record ``points`` = {name: (module path, read)} into ``out`` while active.

        read: ``output`` (the module's output, first element of a tuple), ``input`` (its first
        argument), ``kwarg:NAME`` (a keyword argument), ``mask`` (a decoder layer's
        ``attention_mask`` as boolean (B, Lq, Lk), True = may attend; additive float masks read as
        ``== 0``), ``rope`` (a q_norm/k_norm output rotated with HF's own ``apply_rotary_pos_emb``
        and the (cos, sin) its decoder layer received).
        """
        from transformers.models.gemma4_unified.modeling_gemma4_unified import apply_rotary_pos_emb

        handles = []
        rotary: dict[str, tuple] = {}

        def stash_rotary(path):
            def pre(mod, args, kwargs):
                rotary[path] = kwargs["position_embeddings"]
            return pre

        try:
            for name, (path, read) in points.items():
                module = self.model.get_submodule(path)
                if read == "rope":
                    layer = path.split(".self_attn.")[0]
                    if layer not in rotary:
                        rotary[layer] = None
                        handles.append(self.model.get_submodule(layer).register_forward_pre_hook(
                            stash_rotary(layer), with_kwargs=True))

                def hook(mod, args, kwargs, output, name=name, path=path, read=read):
                    if read == "output":
                        value = output[0] if isinstance(output, tuple) else output
                    elif read == "input":
                        value = args[0] if args else next(iter(kwargs.values()))
                    elif read.startswith("kwarg:"):
                        value = kwargs[read.split(":", 1)[1]]
                    elif read == "mask":
                        value = bool_mask(kwargs["attention_mask"],
                                          (args[0] if args else kwargs["hidden_states"]).shape[1])
                    elif read == "rope":
                        cos, sin = rotary[path.split(".self_attn.")[0]]
                        value = apply_rotary_pos_emb(output, cos, sin, unsqueeze_dim=2)
                    else:
                        raise ValueError(f"unknown read kind '{read}' for {path}")
                    t0 = time.perf_counter()
                    out[name] = to_numpy(value)
                    self.capture_seconds += time.perf_counter() - t0

                handles.append(module.register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def is_linear(self, path: str) -> bool:
        """Is ``path`` a ``torch.nn.Linear`` of this model (a module the reference's codec can take)?"""
        try:
            return isinstance(self.model.get_submodule(path), torch.nn.Linear)
        except AttributeError:
            return False

    @torch.no_grad()
    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Give each linear in ``weights`` = {module path: weight} that weight, cast to the model's dtype."""
        for path, w in weights.items():
            linear = self.model.get_submodule(path)
            linear.weight.copy_(torch.from_numpy(np.asarray(w)).to(linear.weight.dtype))

    @torch.no_grad()
    def quantize_dequantize(self, modules: Mapping[str, str], roundtrip) -> Capture:
        """Replace the weight of each linear in ``modules`` = {module path: stage name} by
        ``roundtrip(w)`` (the reference's own MX codec, quantized and dequantized to float32): the
        reference then computes what the quantized kernel should. Returns {stage name: dequantized weight}."""
        out: Capture = {}
        for path, stage in modules.items():
            linear = self.model.get_submodule(path)
            linear.weight.copy_(roundtrip(linear.weight.detach()))
            out[stage] = to_numpy(linear.weight)
        return out

    def token_types(self, input_ids: np.ndarray) -> np.ndarray:
        """HF's ``mm_token_type_ids`` for ``input_ids``: 1 image, 2 video, 3 audio token, else 0 (the
        processor's rule; boi/eoi/boa/eoa are text), from the checkpoint's config."""
        cfg = self.model.config
        types = np.zeros_like(input_ids, dtype=np.int64)
        for value, token in ((1, cfg.image_token_id), (2, cfg.video_token_id), (3, cfg.audio_token_id)):
            types[input_ids == token] = value
        return types

    def official_masks(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor) -> dict:
        """The mask dict HF's static ``create_masks_for_generate`` builds (catalog §4.3): full causal,
        sliding (causal | block) & window. Handed to the forward as ``attention_mask``."""
        from transformers import Gemma4UnifiedForConditionalGeneration

        cfg = self.model.config
        length = input_ids.shape[1]
        embeds = torch.zeros((1, length, cfg.text_config.hidden_size), dtype=self.model.dtype)
        return Gemma4UnifiedForConditionalGeneration.create_masks_for_generate(
            cfg, embeds, None, None, torch.arange(length)[None], mm_token_type_ids)

    @torch.no_grad()
    def forward(self, inputs: Mapping[str, np.ndarray], policy: str, points: Mapping[str, tuple[str, str]],
                decode_steps: int = 0, other_masks: Capture | None = None, consistency: bool = True,
                captured: Capture | None = None) -> tuple[Capture, list[np.ndarray], list[int], float | None]:
        """Prefill with hooks, then ``decode_steps`` greedy steps with HF's cache.

        ``inputs``: input_ids, mm_token_type_ids, and optionally pixel_values, image_position_ids,
        audio_frames. ``policy``: ``hf-forward`` (what ``model(...)`` builds) or ``official``
        (the static mask dict). Returns (capture, decode-step logits, decode tokens,
        self-consistency = max |logits(policy) - logits(HF's own forward)|; None when ``consistency``
        is False: no second forward, as in a streamed run, where it would cost a second pass over the disk).
        ``captured``: the dict the hooks fill (a caller's, to read captures while the forward runs).

        ``other_masks``, when given, is filled with the ``mask`` points as the *other* policy builds
        them, at no extra forward: under ``official``, hooked on the self-consistency forward (HF's
        own); under ``hf-forward``, read from the static ``official_masks`` dict.
        """
        kw = forward_kwargs(inputs)
        ids = kw["input_ids"]
        if "audio_frames" in inputs:
            frames = torch.from_numpy(inputs["audio_frames"])
            kw["input_features"] = frames
            kw["input_features_mask"] = torch.ones(frames.shape[:2], dtype=torch.bool)
        if policy == "official":
            kw["attention_mask"] = self.official_masks(ids, kw["mm_token_type_ids"])
        elif policy != "hf-forward":
            raise ValueError(f"unknown mask policy '{policy}'")
        captured = {} if captured is None else captured
        with self.hooks(points, captured):
            out = self.model(**kw, use_cache=decode_steps > 0)
        captured["logits"] = to_numpy(out.logits, copy=False)  # the returned tensor: nothing writes to it
        other = {} if other_masks is None else other_masks
        mask_points = {k: v for k, v in points.items() if v[1] == "mask"} if other_masks is not None else {}
        if not consistency:
            consistency = None
        elif policy != "hf-forward":
            own = {k: v for k, v in kw.items() if k != "attention_mask"}
            with self.hooks(mask_points, other):
                own_logits = self.model(**own, use_cache=False).logits
            consistency = float((own_logits - out.logits).abs().max())
        else:
            consistency = 0.0
        if policy == "hf-forward" and mask_points:
            official = self.official_masks(ids, kw["mm_token_type_ids"])
            types = self.config.get_text_config().layer_types
            for name, (path, _) in mask_points.items():
                layer_type = types[self.model.get_submodule(path).layer_idx]
                other[name] = to_numpy(bool_mask(official[layer_type], ids.shape[1]))
        step_logits, tokens = [], []
        cache, last = out.cache, out.logits[:, -1]
        for step in range(decode_steps):
            token = int(last.argmax(-1))
            tokens.append(token)
            position = torch.tensor([[ids.shape[1] + step]])
            out = self.model(input_ids=torch.tensor([[token]]), cache=cache, position_ids=position, use_cache=True)
            cache, last = out.cache, out.logits[:, -1]
            step_logits.append(to_numpy(out.logits))
        return captured, step_logits, tokens, consistency

    @torch.no_grad()
    def image_features(self, pixel_values: np.ndarray, position_ids: np.ndarray,
                       points: Mapping[str, tuple[str, str]]) -> tuple[np.ndarray, Capture]:
        """Run ``model.get_image_features``: the soft tokens HF scatters into the text stream
        (padding rows dropped, images concatenated) as (1, N, H), plus the hooked points."""
        captured: Capture = {}
        with self.hooks(points, captured):
            out = self.model.model.get_image_features(
                pixel_values=torch.from_numpy(pixel_values), image_position_ids=torch.from_numpy(position_ids))
        soft = torch.cat(list(out.pooler_output), dim=0)[None]  # per-image (n_i, H) -> (1, N, H)
        return to_numpy(soft), captured

    @staticmethod
    def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
        """The resize HF's processor applies: torchvision bicubic, antialias, on uint8 CHW."""
        import torchvision.transforms.v2.functional as tvF

        chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        out = tvF.resize(chw, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        return out.permute(1, 2, 0).numpy().copy()
