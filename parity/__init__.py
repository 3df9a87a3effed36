"""The parity harness: stages, capture, metrics (pure NumPy), tolerances, runner, reports, CLI.

The only package that imports both the port (``rmlx``) and the reference (``reference``). Each
side of a comparison produces a ``Capture`` (``parity.capture.Capture``): a dict of NumPy arrays
keyed by public stage name. Nothing else crosses into ``parity.metrics``.
"""

# Importing ``parity`` has no side effect (the pytest plugin imports it in every pytest run of the
# environment): the modules that import MLX import ``rmlx`` first, which loads the fast BLAS
# (rmlx/blas.py) before MLX; the CLI does the same before anything else.


def __getattr__(name: str):
    # lazy: `import parity` stays cheap (the pytest plugin imports this package in every pytest run)
    if name == "assert_parity":
        from parity.pytest_plugin import assert_parity

        return assert_parity
    raise AttributeError(f"module 'parity' has no attribute {name!r}")
