"""Gemma 4 (``model_type: "gemma4"``): SigLIP-style vision tower + the unified text decoder (rmlx.nn.text)."""

from rmlx.models.gemma4.config import ModelArgs, VisionConfig, text_config
from rmlx.models.gemma4.image import image_prompt, preprocess, preprocess_batch
from rmlx.models.gemma4.model import Model, load_model

__all__ = ["Model", "ModelArgs", "VisionConfig", "image_prompt", "load_model", "preprocess", "preprocess_batch",
           "text_config"]
