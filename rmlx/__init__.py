"""rmlx: an MLX port of Gemma 4 unified (encoder-free vision and audio).

Imports mlx and numpy only; knows nothing of torch, transformers or the parity harness.
"""

from rmlx import blas

blas.load()  # before anything imports mlx: MLX's Linux wheel otherwise runs on the reference BLAS

from rmlx.errors import InputError  # noqa: E402

__all__ = ["InputError"]
