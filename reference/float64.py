"""Float64 forwards for the modules transformers computes in float32 whatever the model's dtype.

A float64 HF model is the float64 oracle of the decoder stages (``reference.gemma4_unified.hf.HFRunner`` for the
unified family, ``reference.gemma4.hf.Runner`` for the SigLIP one). transformers' Gemma 4 code (both
``modeling_gemma4`` and ``modeling_gemma4_unified``) computes two kinds of module in float32 even in a
float64 model, which leaves fp32 rounding in the oracle, shared with the fp32 reference:

* the RMSNorm (``Gemma4RMSNorm`` / ``Gemma4UnifiedRMSNorm``): ``self._norm(hidden_states.float())``,
  ``* self.weight.float()``, then cast back;
* the text RoPE (``Gemma4TextRotaryEmbedding`` / ``Gemma4UnifiedTextRotaryEmbedding``): the inverse
  frequencies are built in float32 (``torch.arange(..., dtype=torch.float)``, a float32 buffer), and the
  angles, cos and sin are computed in float32 (``position_ids.float() * inv_freq.float()``).

:func:`compute_in_float64` gives each such module of a model a forward that computes the same formula in
float64 (an instance attribute: other models, and the classes, are untouched). The two families' classes
have the same attributes (``_norm``, ``with_scale``, ``weight``; ``rope_init_fns``, ``<type>_inv_freq``,
``<type>_attention_scaling``, ``config.rope_parameters``), so one helper serves both.
"""

from __future__ import annotations

import torch


def float64_inv_freq(rotary: torch.nn.Module, layer_type: str) -> torch.Tensor:
    """The text RoPE inverse frequencies of ``layer_type`` in float64, by the formula transformers computes
    in float32 whatever the model's dtype (the two rope types the ports take): ``default`` theta^(-2i/d) for
    the d/2 pairs; ``proportional`` the same over the first int(partial_rotary_factor * d // 2) pairs and 0
    for the rest, divided by ``factor``. d is the layer type's head size (twice the float32 table's length).
    Checked against that table: the float64 one must round to it."""
    table = getattr(rotary, f"{layer_type}_inv_freq")
    params = rotary.config.rope_parameters[layer_type]
    kind, half = params.get("rope_type", "default"), table.shape[0]
    i = torch.arange(half, dtype=torch.float64)
    inv = 1.0 / (float(params["rope_theta"]) ** (2 * i / (2 * half)))
    if kind == "proportional":
        rotated = int(float(params.get("partial_rotary_factor", 1.0)) * 2 * half // 2)
        inv = torch.where(i < rotated, inv, 0.0) / float(params.get("factor", 1.0))
    elif kind != "default":
        raise ValueError(f"rope_type '{kind}' has no float64 table here")
    if not torch.allclose(inv.float(), table.float(), rtol=2 ** -22, atol=0.0):
        raise ValueError(f"the float64 RoPE table of {layer_type} does not round to transformers' own")
    return inv


def _rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The RMSNorm's own formula (``_norm``, times the weight if it has one), in float64."""
    normed = self._norm(hidden_states.to(torch.float64))
    if self.with_scale:
        normed = normed * self.weight.to(torch.float64)
    return normed.type_as(hidden_states)


def _rotary(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str):
    """The text RoPE's (cos, sin) of ``layer_type`` with angles, cos and sin in float64."""
    freqs = position_ids[..., None].to(torch.float64) * self.float64_inv_freq[layer_type].to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    scaling = getattr(self, f"{layer_type}_attention_scaling")
    return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


def compute_in_float64(model: torch.nn.Module, norms: tuple[type, ...], rotaries: tuple[type, ...]) -> int:
    """Give every module of ``model`` that is an instance of ``norms`` (RMSNorm classes) or ``rotaries``
    (text rotary-embedding classes) a float64 forward of its own formula (see the module docstring).
    Returns how many modules were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, norms):
            module.forward = _rms_norm.__get__(module)
        elif isinstance(module, rotaries):
            module.float64_inv_freq = {t: float64_inv_freq(module, t) for t in module.rope_init_fns}
            module.forward = _rotary.__get__(module)
        else:
            continue
        changed += 1
    return changed
