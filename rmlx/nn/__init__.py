"""Layers the model families share: norms and activations (base), the decoder (text), the Linear kernels
(kernels) and their fast math (fastmath), and the MX block codec (quant)."""
