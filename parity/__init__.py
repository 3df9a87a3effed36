"""The parity harness: stages, capture, metrics (pure NumPy), tolerances, runner, reports, CLI.

The only package that imports both the port (``rmlx``) and the reference (``reference``). Each
side of a comparison produces a ``Capture`` (``parity.capture.Capture``): a dict of NumPy arrays
keyed by public stage name. Nothing else crosses into ``parity.metrics``.
"""
