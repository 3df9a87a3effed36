"""rmlx: MLX ports of Gemma 4 unified (encoder-free vision and audio) and Gemma 4 (SigLIP vision tower).

Layout: ``rmlx.models.<family>`` (each family's embedders, preprocessing, config, model), ``rmlx.nn`` (the
layers they share: the decoder, norms, Linear kernels, the MX codec), and at the top the plumbing (strict
checkpoint and image readers, the BLAS loader, the capture seam ``rmlx.tap``).

Imports mlx and numpy only; knows nothing of torch, transformers or the parity harness.
"""

from rmlx import blas

blas.load()  # before anything imports mlx: MLX's Linux wheel otherwise runs on the reference BLAS

from rmlx.errors import InputError  # noqa: E402

__all__ = ["InputError"]
