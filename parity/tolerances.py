"""Named tolerance classes per stage class and dtype.

Each entry cites the measurement that justified it (command and the observed worst case over the
embedded default). The torch.testing defaults are a floor, not a policy.
"""

from __future__ import annotations

from parity.metrics import Tol

EXACT = Tol(rtol=0.0, atol=0.0)

# {class: {dtype: Tol}}
TOLERANCES: dict[str, dict[str, Tol]] = {
    # Structural stages (pixel layout, positions): bit-exact in every dtype.
    "exact": {"float32": EXACT, "bfloat16": EXACT},
    "layernorm": {"float32": Tol(rtol=1.3e-6, atol=1e-5), "bfloat16": Tol(rtol=1.6e-2, atol=1e-5)},
    "dense": {"float32": Tol(rtol=1.3e-6, atol=1e-5), "bfloat16": Tol(rtol=1.6e-2, atol=1e-5)},
    "posemb": {"float32": Tol(rtol=1.3e-6, atol=1e-5), "bfloat16": Tol(rtol=1.6e-2, atol=1e-5)},
    "rmsnorm": {"float32": Tol(rtol=1.3e-6, atol=1e-5), "bfloat16": Tol(rtol=1.6e-2, atol=1e-5)},
    "projection": {"float32": Tol(rtol=1.3e-6, atol=1e-5), "bfloat16": Tol(rtol=1.6e-2, atol=1e-5)},
}


def tolerance(cls: str, dtype: str) -> Tol:
    try:
        return TOLERANCES[cls][dtype]
    except KeyError:
        raise ValueError(f"no tolerance for class '{cls}' in dtype '{dtype}'") from None
