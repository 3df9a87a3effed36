"""Gemma 4 unified: the encoder-free family (``model_type: gemma4_unified``)."""

from parity.adapters.gemma4_unified.adapter import *  # noqa: F403
from parity.adapters.gemma4_unified.adapter import (  # noqa: F401
    AUDIO_FRAME,
    Gemma4UnifiedAdapter,
    Scenario,
    audio_frames,
    hf_module,
    image_scenario,
    special_scenarios,
    supports,
)
