"""The family's scenarios: prompts of text ids, images and audio frames.

The battery gives one single-image scenario per image; :func:`special_scenarios` adds the decoder's
special cases. Nothing here imports torch, transformers or the port's model code: the CLI builds the
scenarios, and refuses a bad checkpoint or image, before the adapter is imported.
"""

from __future__ import annotations

from pathlib import Path

from parity.adapter import Scenario
from rmlx.models.gemma4_unified.config import ModelArgs


def image_scenario(path: Path) -> Scenario:
    return Scenario(f"image/{path.stem}", (("text", (2, 10, 11)), ("image", path), ("text", (12, 13))))


# Prompt lengths around the fixtures' sliding windows (8 and 12 tokens): shorter than, one under, equal
# to and one over each, so that prefill and the decode steps (4 by default) read the rotating KV cache
# before, at and after it wraps. The 38-token text-only prompt is longer than every window.
WINDOW_LENGTHS = (4, 7, 8, 9, 11, 12, 13)


def special_scenarios(images: Path) -> tuple[Scenario, ...]:
    """The decoder's cases: text only (one prompt longer than every window, and the ``WINDOW_LENGTHS``),
    two images, image at the very start / very end, an image block longer than every sliding window
    (where the two policies differ), image + audio, and audio alone: one frame, and a block of frames
    longer than every sliding window (audio tokens are attended causally, as text)."""
    grad, card, exact = images / "gradient.png", images / "white-card.png", images / "exact-672x960.png"
    return (
        Scenario("text-only", (("text", tuple(range(2, 40))),)),
        *(Scenario(f"text-{n}", (("text", tuple(range(2, 2 + n))),)) for n in WINDOW_LENGTHS),
        Scenario("two-images", (("text", (2, 10)), ("image", grad), ("text", (11, 12, 13)), ("image", card),
                                ("text", (14,)))),
        Scenario("image-at-start", (("image", grad), ("text", (10, 11, 12)))),
        Scenario("image-at-end", (("text", (2, 10, 11)), ("image", card))),
        Scenario("long-image-block", (("text", (2, 10)), ("image", exact), ("text", (11, 12)))),
        Scenario("image-and-audio", (("text", (2, 10)), ("image", grad), ("text", (11,)), ("audio", 6),
                                     ("text", (12, 13)))),
        Scenario("audio-1", (("text", (2, 10)), ("audio", 1), ("text", (11,)))),
        Scenario("audio-14", (("text", (2,)), ("audio", 14), ("text", (11, 12)))),
    )


def supports(args: ModelArgs, scenario: Scenario) -> bool:
    """Can a checkpoint of this config run the scenario (a vision tower for images, audio for audio)?"""
    return (not scenario.images or args.vision is not None) and (not scenario.has_audio or args.audio is not None)
