"""The decoder's configuration (TextConfig, LayerSpec) and the strict readers of an HF `config.json` that
every family's config uses: typed values by key, the bounds, one type check over the whole file.

Field names are the HF names. Shape-defining keys are required (a missing one is an error naming
it); keys HF gives a default to take HF's default (catalog §5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rmlx.errors import InputError
from rmlx.files import finite_number, loads, one_line, short, track

T = TypeVar("T")

_DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def _require(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise InputError(f"{where}: missing required key '{key}'")
    return d[key]


_REQUIRED = object()
# Upper bounds far above any Gemma 4 (12B: hidden 3840, vocabulary 262144, 48 layers) that stop a
# config from asking for an absurd allocation before a tensor is read.
MAX_DIM, MAX_VOCAB, MAX_LAYERS, MAX_ID = 1 << 17, 1 << 22, 1024, (1 << 31) - 1


def _int(d: dict, key: str, where: str, default: Any = _REQUIRED, lo: int = 1, hi: int = MAX_DIM) -> int:
    """An integer config value, strictly: JSON integers only (not "4", 128.9 or true), within [lo, hi]."""
    if key not in d or d[key] is None:
        if default is _REQUIRED:
            raise InputError(f"{where}: missing required key '{key}'")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputError(f"{where}: '{key}' must be an integer, got {_short(v)} ({type(v).__name__})")
    if not lo <= v <= hi:
        raise InputError(f"{where}: '{key}' = {v} is out of range [{lo}, {hi}]")
    return v


def _float(d: dict, key: str, where: str, default: float | None, hi: float = float("inf")) -> float | None:
    """A positive finite real config value, at most ``hi`` (or ``default`` when absent or null)."""
    v = d.get(key)
    if v is None:
        return default
    if not _positive_finite(v):
        raise InputError(f"{where}: '{key}' must be a positive finite number, got {_short(v)}")
    if v > hi:
        raise InputError(f"{where}: '{key}' = {v} is out of range (0, {hi}]")
    return float(v)


def _positive_finite(v: Any) -> bool:
    """A JSON number > 0 that is a finite float (:func:`rmlx.files.finite_number`)."""
    return finite_number(v) and float(v) > 0


def _section(d: dict, key: str, where: str, required: bool = False) -> dict | None:
    """A nested object of the config (``None`` when absent, null or empty and not ``required``)."""
    v = _require(d, key, where) if required else d.get(key)
    if v is not None and not isinstance(v, dict):
        raise InputError(f"{where}: '{key}' must be an object, got {_short(v)}")
    return v or None


def _str(d: dict, key: str, where: str, default: Any) -> Any:
    """A string config value (or ``default`` when absent; null stays null)."""
    v = d.get(key, default)
    if v is not None and not isinstance(v, str):
        raise InputError(f"{where}: '{key}' must be a string, got {_short(v)}")
    return v


def _short(v: Any) -> str:
    """A value quoted in a message (:func:`rmlx.files.short`, 80 characters)."""
    return short(v, 80)


def _bool(d: dict, key: str, where: str, default: bool) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InputError(f"{where}: '{key}' must be true or false, got {_short(v)}")
    return v


_ROPE_TYPES = ("default", "proportional")


def _rope_parameters(d: dict, kinds: set[str], where: str) -> dict:
    """HF's ``rope_parameters``: {layer type: {"rope_type", "rope_theta", "partial_rotary_factor"}} for
    every layer type the model has (HF's defaults when absent, null or empty)."""
    rope = _section(d, "rope_parameters", where)
    if rope is None:
        return dict(_DEFAULT_ROPE)
    for kind in sorted(kinds):
        at = f"{where}: rope_parameters[{kind!r}]"
        r = rope.get(kind)
        if not isinstance(r, dict) or r.get("rope_type", "default") not in _ROPE_TYPES:
            raise InputError(f"{at} = {_short(r)} is not supported (rope_type 'default' or 'proportional')")
        if r.get("rope_theta") is None:
            raise InputError(f"{at}: missing required key 'rope_theta'")
        for key in ("partial_rotary_factor", "factor"):  # the model reads these with a default: null is no number
            if key in r and r[key] is None:
                raise InputError(f"{at}: '{key}' must be a positive finite number, got None")
        _float(r, "rope_theta", at, None)
        _float(r, "partial_rotary_factor", at, None, hi=1.0)
        _float(r, "factor", at, None)
    return rope


def _per_layer_config(v: Any, n: int, where: str) -> dict[int, dict]:
    """HF's ``per_layer_config``: {layer index: overrides of that layer}; the overrides rmlx reads
    (``head_dim``, ``num_key_value_heads``) are checked as the base values are."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise InputError(f"{where}: 'per_layer_config' must be an object {{layer index: overrides}}, got {_short(v)}")
    out = {}
    for k, entry in v.items():
        at = f"{where}: per_layer_config[{_short(k)}]"
        index = k if isinstance(k, int) and not isinstance(k, bool) else (
            int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else None)
        if index is None or not 0 <= index < n:
            raise InputError(f"{where}: per_layer_config key {_short(k)} is not a layer index (0..{n - 1})")
        if not isinstance(entry, dict):
            raise InputError(f"{at} must be an object of overrides, got {_short(entry)}")
        for key in ("head_dim", "num_key_value_heads"):
            if key in entry and entry[key] is None:
                raise InputError(f"{at}: '{key}' must be an integer, got None")
            _int(entry, key, at, None)
        out[index] = dict(entry)
    return out


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer needs from the config (HF's resolved `per_layer_config[i]`)."""

    layer_type: str  # "sliding_attention" | "full_attention"
    head_dim: int
    num_key_value_heads: int
    kv_shared: bool  # True: a "reuse" layer (q_proj, q_norm, o_proj only)
    intermediate_size: int
    k_eq_v: bool  # full layer of an attention_k_eq_v model: no v_proj, V = raw K


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    per_layer_config: dict[int, dict[str, int]]
    rms_norm_eps: float = 1e-6
    sliding_window: int = 1024
    final_logit_softcapping: float | None = None
    rope_parameters: dict = field(default_factory=lambda: dict(_DEFAULT_ROPE))
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    use_bidirectional_attention: str | None = "vision"
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict, where: str = "text_config") -> TextConfig:
        n = _int(d, "num_hidden_layers", where, hi=MAX_LAYERS)
        layer_types = d.get("layer_types")
        if layer_types is None:  # HF's default pattern: every 6th layer full
            layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise InputError(f"{where}: 'layer_types' must be a list of layer type names, got {_short(layer_types)}")
        layer_types = list(layer_types)
        if len(layer_types) != n:
            raise InputError(f"{where}: 'layer_types' has {len(layer_types)} entries, num_hidden_layers is {n}")
        if layer_types[-1] != "full_attention":  # HF forces the last layer to full attention
            layer_types[-1] = "full_attention"
        bad = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if bad:
            raise InputError(f"{where}: unsupported layer type(s) {_short(bad)} in 'layer_types'")
        k_eq_v = _bool(d, "attention_k_eq_v", where, False)
        if "per_layer_config" in d:
            # Present (even as {} or null): used as is; HF drops entries equal to the base values.
            per_layer = _per_layer_config(d["per_layer_config"], n, where)
        else:
            overrides = {"head_dim": _int(d, "global_head_dim", where, 512)}
            if k_eq_v and d.get("num_global_key_value_heads") is not None:
                overrides["num_key_value_heads"] = _int(d, "num_global_key_value_heads", where)
            per_layer = {i: dict(overrides) for i, t in enumerate(layer_types) if t == "full_attention"}
        _float(d, "rope_theta", where, None)  # HF reads rope_parameters; a legacy top-level value is still a number
        return cls(
            vocab_size=_int(d, "vocab_size", where, hi=MAX_VOCAB),
            hidden_size=_int(d, "hidden_size", where),
            intermediate_size=_int(d, "intermediate_size", where),
            num_hidden_layers=n,
            num_attention_heads=_int(d, "num_attention_heads", where),
            num_key_value_heads=_int(d, "num_key_value_heads", where),
            head_dim=_int(d, "head_dim", where),
            layer_types=tuple(layer_types),
            per_layer_config=per_layer,
            rms_norm_eps=_float(d, "rms_norm_eps", where, 1e-6),
            sliding_window=_int(d, "sliding_window", where, 1024, hi=MAX_ID),
            final_logit_softcapping=_float(d, "final_logit_softcapping", where, None),
            rope_parameters=_rope_parameters(d, set(layer_types), where),
            attention_k_eq_v=k_eq_v,
            num_kv_shared_layers=_int(d, "num_kv_shared_layers", where, 0, lo=0, hi=MAX_LAYERS),
            use_double_wide_mlp=_bool(d, "use_double_wide_mlp", where, False),
            use_bidirectional_attention=_str(d, "use_bidirectional_attention", where, "vision"),
            hidden_activation=_str(d, "hidden_activation", where, "gelu_pytorch_tanh"),
            pad_token_id=_int(d, "pad_token_id", where, 0, lo=0, hi=MAX_ID),
        )

    def __post_init__(self):
        if not 0 <= self.num_kv_shared_layers <= self.num_hidden_layers:
            raise InputError(f"text_config: num_kv_shared_layers={self.num_kv_shared_layers} is out of range")
        if self.use_bidirectional_attention not in (None, "vision"):
            raise InputError(f"text_config: use_bidirectional_attention={self.use_bidirectional_attention!r} is not "
                             "supported (only 'vision' and null)")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise InputError(f"text_config: unsupported hidden_activation '{self.hidden_activation}'")
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        for i in range(first_shared, self.num_hidden_layers):  # a "reuse" layer needs a producer of its type
            if self.layer_types[i] not in self.layer_types[:first_shared]:
                raise InputError(f"text_config: layer {i} shares K/V (num_kv_shared_layers="
                                 f"{self.num_kv_shared_layers}) but no earlier layer is {self.layer_types[i]}")
        for kind in set(self.layer_types):
            rope = self.rope_parameters.get(kind) if isinstance(self.rope_parameters, dict) else None
            if not isinstance(rope, dict) or rope.get("rope_type", "default") not in _ROPE_TYPES:
                raise InputError(f"text_config: rope_parameters[{kind!r}] = {_short(rope)} is not supported "
                                 "(rope_type 'default' or 'proportional')")
        for i in self.per_layer_config:
            if not 0 <= i < self.num_hidden_layers:
                raise InputError(f"text_config: per_layer_config names layer {i}, the model has "
                                 f"{self.num_hidden_layers} layers")
        for i in range(self.num_hidden_layers):  # grouped-query attention: whole groups of query heads
            spec = self.layer(i)
            if self.num_attention_heads % spec.num_key_value_heads:
                raise InputError(f"text_config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                                 f"layer {i}'s num_key_value_heads={spec.num_key_value_heads}")
            if self.num_attention_heads * spec.head_dim > MAX_DIM:  # q_proj's output: one dimension of a weight
                raise InputError(f"text_config: num_attention_heads={self.num_attention_heads} x layer {i}'s "
                                 f"head_dim={spec.head_dim} is more than {MAX_DIM}")

    def layer(self, i: int) -> LayerSpec:
        over = self.per_layer_config.get(i, {})
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        shared = i >= first_shared
        wide = shared and self.use_double_wide_mlp
        return LayerSpec(
            layer_type=self.layer_types[i],
            head_dim=int(over.get("head_dim", self.head_dim)),
            num_key_value_heads=int(over.get("num_key_value_heads", self.num_key_value_heads)),
            kv_shared=shared,
            intermediate_size=self.intermediate_size * (2 if wide else 1),
            k_eq_v=self.attention_k_eq_v and self.layer_types[i] == "full_attention",
        )


# The JSON type of every config key either family reads, wherever it appears (null means absent: the
# reader's default): one check over the whole file before any reader runs, so a value of the wrong type
# is named by its key (``text_config.rope_parameters.full_attention: 'rope_theta'``), never met as a
# TypeError deep inside a reader or while the model is built.
_INT_KEYS = ("num_hidden_layers", "global_head_dim", "num_global_key_value_heads", "vocab_size", "hidden_size",
             "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
             "num_kv_shared_layers", "pad_token_id", "patch_size", "pooling_kernel_size", "mm_embed_dim",
             "mm_posemb_size", "output_proj_dims", "audio_embed_dim", "image_token_id", "video_token_id",
             "audio_token_id", "boi_token_id", "eoi_token_id", "boa_token_id", "eoa_token_index",
             "position_embedding_size", "hidden_size_per_layer_input", "group_size", "bits")
_NUMBER_KEYS = ("rms_norm_eps", "final_logit_softcapping", "rope_theta", "partial_rotary_factor", "factor")
_BOOL_KEYS = ("attention_k_eq_v", "use_double_wide_mlp", "tie_word_embeddings", "use_clipped_linears",
              "standardize", "enable_moe_block", "attention_bias")
_STR_KEYS = ("model_type", "hidden_activation", "rope_type", "dtype", "torch_dtype", "mode",
             "use_bidirectional_attention")
_OBJECT_KEYS = ("text_config", "vision_config", "audio_config", "rope_parameters", "per_layer_config",
                "quantization")
_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{k: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)) for k in _INT_KEYS},
    **{k: ("a positive finite number", _positive_finite) for k in _NUMBER_KEYS},
    **{k: ("true or false", lambda v: isinstance(v, bool)) for k in _BOOL_KEYS},
    **{k: ("a string", lambda v: isinstance(v, str)) for k in _STR_KEYS},
    **{k: ("an object", lambda v: isinstance(v, dict)) for k in _OBJECT_KEYS},
    "layer_types": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)),
}
_MAX_DEPTH = 8  # config.json nests 4 deep (text_config.rope_parameters.full_attention.rope_theta)


def _path(at: str) -> str:
    """A dotted key path as a message shows it: on one line, at most 200 characters."""
    return one_line(at, 200)


def check_types(d: dict, where: str, at: str = "", depth: int = 0) -> None:
    """Every key of ``_TYPES`` in ``d`` (and in the objects nested in it) holds its JSON type or null; an
    integer is in [0, MAX_ID]. Raises ``InputError`` naming the file, the section and the key."""
    if depth > _MAX_DEPTH:
        raise InputError(f"{where}: {_path(at) or 'the top level'} is nested more than {_MAX_DEPTH} objects deep")
    for key, v in d.items():
        section = f"{where}: {_path(at)}" if at else where
        if v is not None and key in _TYPES:
            kind, ok = _TYPES[key]
            if not ok(v):
                raise InputError(f"{section}: '{key}' must be {kind}, got {_short(v)}")
            if kind == "an integer" and not 0 <= v <= MAX_ID:
                raise InputError(f"{section}: '{key}' = {_short(v)} is out of range [0, {MAX_ID}]")
        for i, child in enumerate(v if isinstance(v, list) else [v]):
            if isinstance(child, dict):
                name = f"{at}.{key}" if at else str(key)
                check_types(child, where, name if not isinstance(v, list) else f"{name}[{i}]", depth + 1)


def read_config(path: str | Path, build: Callable[[dict, str], T]) -> T:
    """``build(config dict, where)`` of a ``config.json``; an unreadable file or a malformed value is an
    ``InputError`` that names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        d = loads(path.read_bytes())
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # not UTF-8, not JSON, nested too deeply
        raise InputError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    check_types(d, str(path))
    try:
        return build(d, str(path))
    except InputError as e:  # a check of the config's dataclasses (__post_init__) knows no file: name it
        if str(e).startswith(str(path)):
            raise
        raise InputError(f"{path}: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError, ArithmeticError, RecursionError) as e:
        # a value check_types and the reader both let through: read again, recording the keys it reads,
        # and name the last one read before the error
        last = ["the top level"]
        try:
            build(track(d, last, max_depth=_MAX_DEPTH), str(path))
        except Exception:  # the same error, raised again: only the key is wanted
            pass
        text = " ".join(str(e).split())
        raise InputError(f"{path}: malformed value at '{one_line(last[0], 200)}' ({type(e).__name__}: "
                         f"{one_line(text, 160)})") from None
