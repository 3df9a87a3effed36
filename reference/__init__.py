"""Expected values: HF transformers on CPU PyTorch, and an independent float64 NumPy oracle.

Imports torch, transformers, numpy, safetensors, Pillow. Never imports mlx or rmlx.
"""
