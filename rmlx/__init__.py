"""rmlx: an MLX port of Gemma 4 unified (encoder-free vision and audio).

Imports mlx and numpy only; knows nothing of torch, transformers or the parity harness.
"""

from rmlx.errors import InputError

__all__ = ["InputError"]
