"""The parity harness: stages, capture, metrics (pure NumPy), tolerances, runner, reports, CLI.

The only package that imports both the port (``rmlx``) and the reference (``reference``).
"""

Capture = dict  # dict[str, numpy.ndarray], keyed by public stage name: the only thing metrics see
