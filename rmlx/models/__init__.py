"""One package per model family: gemma4_unified (encoder-free vision, audio) and gemma4 (SigLIP vision tower);
the layers they share are in rmlx.nn."""
