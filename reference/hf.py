"""HF transformers reference runner: CPU PyTorch, eval(), no_grad, forward hooks.

``HFRunner`` loads a gemma4_unified checkpoint directory with transformers' own loader (safetensors
only: a pickle checkpoint is never unpickled), preprocesses with transformers' own image processor,
and captures named points of the forward pass through forward hooks. It knows module paths, not
parity stages: the caller hands it ``{name: (module_path, read)}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
Capture = dict[str, np.ndarray]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detach to NumPy; bf16 is widened to float32 exactly (NumPy has no bf16)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy().copy()


class HFRunner:
    def __init__(self, model_dir: str | Path, dtype: str = "float32", attn_implementation: str = "eager"):
        from transformers import Gemma4UnifiedForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={attn_implementation!r} is not one of {ATTN_IMPLEMENTATIONS}")
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.model = Gemma4UnifiedForConditionalGeneration.from_pretrained(
            self.model_dir, dtype=DTYPES[dtype], attn_implementation=attn_implementation,
            use_safetensors=True, local_files_only=True,
        ).eval()
        self.config = self.model.config

    @staticmethod
    def preprocess(image: np.ndarray, max_soft_tokens: int) -> dict[str, np.ndarray]:
        """transformers' ``Gemma4UnifiedImageProcessor`` on a decoded RGB uint8 (H, W, 3) image."""
        from transformers import Gemma4UnifiedImageProcessor

        processor = Gemma4UnifiedImageProcessor(max_soft_tokens=max_soft_tokens)
        out = processor(images=[Image.fromarray(image)], return_tensors="pt")
        return {k: to_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in out.items()}

    @contextlib.contextmanager
    def hooks(self, points: Mapping[str, tuple[str, str]], out: Capture) -> Iterator[None]:
        """Record ``points`` = {name: (module path, "output" | "input")} into ``out`` while active."""
        handles = []
        try:
            for name, (path, read) in points.items():
                module = self.model.get_submodule(path)

                def hook(mod, args, kwargs, output, name=name, read=read):
                    value = output if read == "output" else (args[0] if args else next(iter(kwargs.values())))
                    if isinstance(value, tuple):
                        value = value[0]
                    out[name] = to_numpy(value)

                handles.append(module.register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

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
