"""Reference side of the gemma4 (SigLIP-style vision) port: tiny HF checkpoints and HF forward hooks.

Imports torch, transformers, numpy. Never imports mlx or rmlx.
"""
