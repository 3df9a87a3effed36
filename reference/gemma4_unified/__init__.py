"""The Gemma 4 unified reference: HF's model run with hooks (hf), streamed from disk (stream), and the
float64 NumPy oracle of its preprocessing and vision embedder (numpy_oracle)."""
