"""Ports of model families other than the first (Gemma 4 unified, at the top of rmlx/)."""
