"""Model adapters: a model family enters the harness as its stage table plus how the reference
and the candidate each produce a ``Capture``. Gemma 4 unified is the first."""
