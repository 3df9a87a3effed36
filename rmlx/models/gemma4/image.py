"""Image preprocessing of HF's ``Gemma4ImageProcessor`` (transformers 5.24), in NumPy.

decoded RGB uint8 (H, W, 3) -> aspect-ratio-preserving resize to multiples of ``k * patch_size`` px
within ``max_soft_tokens * k^2`` patches (torchvision bicubic, antialias; skipped when the size is
already right) -> float32(x) * float32(1/255) (no normalisation: the patch embedder maps [0, 1] to
[-1, 1] itself) -> ``patch_size`` x ``patch_size`` x 3 HWC patches in raster order with (x, y)
positions -> each image padded on its own to ``max_soft_tokens * k^2`` rows (pixels 0, positions -1).

Only the patch size differs from the unified processor (``rmlx.models.gemma4_unified.image``), whose pieces are reused:
the same size policy, the byte-exact torchvision resize, the same patch layout and positions.
"""

from __future__ import annotations

import numpy as np

from rmlx.errors import InputError
from rmlx.models.gemma4_unified.image import check_max_soft_tokens, patchify, resize, target_size
from rmlx.tap import tap


def preprocess(image: np.ndarray, max_soft_tokens: int = 280, patch_size: int = 16, pooling_kernel_size: int = 3
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """RGB uint8 (H, W, 3) -> pixel_values (1, P, patch_size^2 * 3) float32, position_ids (1, P, 2) int64,
    the image's soft-token count; P = max_soft_tokens * pooling_kernel_size^2."""
    check_max_soft_tokens(max_soft_tokens)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"expected an RGB uint8 image (H, W, 3), got {getattr(image, 'dtype', type(image))} "
                         f"{getattr(image, 'shape', '')}")
    k = pooling_kernel_size
    th, tw = target_size(image.shape[0], image.shape[1], max_soft_tokens, patch_size, k)
    resized = resize(image, th, tw)
    image01 = resized.astype(np.float32) * np.float32(1 / 255)  # torch: uint8 -> float32, times 1/255 in fp32
    patches, positions = patchify(image01, patch_size)
    max_patches = max_soft_tokens * k * k
    n = patches.shape[0]
    pixel_values = np.zeros((1, max_patches, patches.shape[1]), np.float32)
    position_ids = np.full((1, max_patches, 2), -1, np.int64)
    pixel_values[0, :n] = patches
    position_ids[0, :n] = positions
    return pixel_values, position_ids, n // (k * k)


def preprocess_batch(images: list[np.ndarray], max_soft_tokens: int = 280, patch_size: int = 16,
                     pooling_kernel_size: int = 3) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Several images -> pixel_values (num_images, P, patch_size^2 * 3), image_position_ids
    (num_images, P, 2), soft tokens per image: HF's ``pixel_values``, ``image_position_ids`` and
    ``num_soft_tokens_per_image``. The two preprocessing stages are tapped here."""
    if not images:
        raise InputError("preprocess_batch: no images")
    parts = [preprocess(im, max_soft_tokens, patch_size, pooling_kernel_size) for im in images]
    pixel_values = tap("image.pixel_values", np.concatenate([p[0] for p in parts]))
    position_ids = tap("image.position_ids", np.concatenate([p[1] for p in parts]))
    return pixel_values, position_ids, [p[2] for p in parts]


def image_prompt(num_soft_tokens: list[int], boi_token_id: int, image_token_id: int, eoi_token_id: int
                 ) -> list[int]:
    """The token ids HF's ``Gemma4Processor`` puts in place of each image: <boi> <image> * n <eoi>."""
    out: list[int] = []
    for n in num_soft_tokens:
        out += [boi_token_id] + [image_token_id] * n + [eoi_token_id]
    return out
