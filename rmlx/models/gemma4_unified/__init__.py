"""Gemma 4 unified (``model_type: "gemma4_unified"``): the encoder-free vision embedder (vision), its image
preprocessing (image), the audio embedder and the model around the shared decoder (model), its config
(config) and the layer-by-layer loader (stream)."""
