"""The parity harness: stages, capture, metrics (pure NumPy), tolerances, runner, reports, CLI.

The only package that imports both the port (``rmlx``) and the reference (``reference``). Each
side of a comparison produces a ``Capture`` (``parity.capture.Capture``): a dict of NumPy arrays
keyed by public stage name. Nothing else crosses into ``parity.metrics``.
"""

try:  # first: rmlx loads the fast BLAS (rmlx/blas.py) before any parity module imports mlx
    import rmlx  # noqa: F401
except Exception:  # a port that cannot be imported: parity.cli says so (exit 125), the library on next use
    pass


def __getattr__(name: str):
    # lazy: `import parity` stays cheap (the pytest plugin imports this package in every pytest run)
    if name == "assert_parity":
        from parity.pytest_plugin import assert_parity

        return assert_parity
    raise AttributeError(f"module 'parity' has no attribute {name!r}")
