"""Gemma 2 and Gemma 3 (text) ``config.json`` fields, read as strictly as the Llama family's.

Gemma runs on the Llama-family decoder (:mod:`jaxlora.models.llama`) with what sets it apart
switched on by ``model_type``: RMSNorm scaling by ``1 + w``, norms after attention and the MLP as
well as before, embeddings scaled by ``sqrt(hidden_size)``, GeGLU (``gelu_pytorch_tanh``), the
attention scale ``query_pre_attn_scalar ** -0.5``, soft-capped attention and output logits
(``c · tanh(x / c)``; Gemma 2) and, for Gemma 3, q/k norms and a RoPE base of their own for the
sliding-window layers. This module turns a ``config.json`` into those
:class:`~jaxlora.models.config.LlamaConfig` fields and back. A field missing from the file takes
the default of ``transformers``' ``Gemma2Config`` / ``Gemma3TextConfig`` (the hub's Gemma 3
configs rely on them), and a field we do not implement is refused by name.

A ``gemma3`` checkpoint (``Gemma3ForConditionalGeneration``, text and vision) is read as its
language model: the ``text_config`` here, the ``language_model`` weights in
:mod:`jaxlora.interop.hf`; the vision tower is not loaded, and an export is a ``gemma3_text``
checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxlora.models.fields import check_fields

GEMMA_ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
MULTIMODAL = "gemma3"  # read as its text part
MODEL_TYPES = (*GEMMA_ARCHITECTURES, MULTIMODAL)
ACTIVATION = "gelu_pytorch_tanh"

# transformers' defaults (Gemma2Config, Gemma3TextConfig, 5.x), applied to absent fields.
_GEMMA2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": ACTIVATION,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": _GEMMA2_DEFAULTS,
    # Gemma3TextConfig: Gemma 2's defaults with the larger vocabulary and no soft-capping
    "gemma3_text": _GEMMA2_DEFAULTS
    | {"vocab_size": 262208, "final_logit_softcapping": None, "attn_logit_softcapping": None},
}
_THETA = {"gemma2": 10000.0, "gemma3_text": 1_000_000.0}  # full-attention layers
_LOCAL_THETA = 10000.0  # Gemma 3's sliding layers
_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # every n-th layer is global, the others slide

# Read below (architecture), or known not to change the forward pass (generation settings).
_FIELDS = {
    *_DEFAULTS["gemma2"],
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_local_base_freq",
    "layer_types",
    "sliding_window_pattern",
    "_sliding_window_pattern",
    "attention_bias",
    "attention_dropout",
    "use_bidirectional_attention",
    "cache_implementation",  # generate()'s cache class: no effect on the numbers
}
# Top-level fields of a gemma3 (image-text) config besides its text_config: the vision tower
# and image tokens, which reading the language model alone leaves out.
_MULTIMODAL_FIELDS = {
    "text_config",
    "vision_config",
    "mm_tokens_per_image",
    "boi_token_index",
    "eoi_token_index",
    "image_token_index",
    "tie_word_embeddings",
}

Fail = Callable[[str], None]


def text_config(cfg: dict[str, Any], ignored: set[str], fail: Fail) -> dict[str, Any]:
    """The language model's config of a ``gemma3`` image-text config (tied to the embeddings
    unless the top level says otherwise, as ``Gemma3ForConditionalGeneration`` ties them)."""
    check_fields(cfg, MULTIMODAL, "Gemma3ForConditionalGeneration", ignored | _MULTIMODAL_FIELDS)
    text = dict(cfg.get("text_config") or {})
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        fail(f"text_config.model_type={text['model_type']!r} is not supported ('gemma3_text')")
    text["model_type"] = "gemma3_text"
    text.pop("architectures", None)
    text["tie_word_embeddings"] = cfg.get("tie_word_embeddings", True)
    return text


def gemma_fields(
    cfg: dict[str, Any],
    ignored: set[str],
    fail: Fail,
    parse_rope: Callable[[dict[str, Any], int], dict[str, Any]],
) -> dict[str, Any]:
    """:class:`~jaxlora.models.config.LlamaConfig` keyword arguments for a ``gemma2`` or
    ``gemma3_text`` config dict. ``ignored``: the bookkeeping fields any family may carry;
    ``parse_rope(fields, head_dim)``: the Llama family's RoPE parser, which the
    full-attention layers share."""
    model_type = cfg["model_type"]
    expected = GEMMA_ARCHITECTURES[model_type]
    check_fields(cfg, model_type, expected, ignored | _FIELDS)
    c = _DEFAULTS[model_type] | {k: v for k, v in cfg.items() if k in _FIELDS or k in ignored}
    if c["hidden_activation"] != ACTIVATION:
        fail(f"hidden_activation={c['hidden_activation']!r} is not supported ({ACTIVATION!r})")
    if float(c.get("attention_dropout") or 0.0) != 0.0:
        fail(f"attention_dropout={c['attention_dropout']!r} is not supported (0.0)")
    if c.get("use_bidirectional_attention"):
        fail("use_bidirectional_attention=true is not supported (causal attention only)")
    n_layers = c["num_hidden_layers"]
    windows = _windows(c, model_type, n_layers, fail)
    heads = c["num_attention_heads"]
    return {
        "vocab_size": c["vocab_size"],
        "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": c["num_key_value_heads"] or heads,
        "head_dim": c["head_dim"] or c["hidden_size"] // heads,
        "rms_norm_eps": float(c["rms_norm_eps"]),
        "attention_bias": bool(c.get("attention_bias", False)),
        "qk_norm": model_type == "gemma3_text",
        "tie_word_embeddings": bool(c["tie_word_embeddings"]),
        "sliding_windows": windows,
        "model_type": model_type,
        "hidden_act": ACTIVATION,
        "query_pre_attn_scalar": float(c["query_pre_attn_scalar"]),
        "attn_logit_softcapping": _cap(c["attn_logit_softcapping"]),
        "final_logit_softcapping": _cap(c["final_logit_softcapping"]),
        **_rope(c, model_type, fail, parse_rope),
    }


def _cap(value: Any) -> float | None:
    return None if value is None else float(value)


def _windows(c, model_type, n_layers, fail) -> tuple[int | None, ...]:
    """Per layer: the sliding window, or None for a global layer (``layer_types``, else every
    ``sliding_window_pattern``-th layer global, as transformers derives them)."""
    layer_types = c.get("layer_types")
    if layer_types is None:
        n = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern")
        n = n or _PATTERN[model_type]
        layer_types = [
            "sliding_attention" if (i + 1) % n else "full_attention" for i in range(n_layers)
        ]
    if len(layer_types) != n_layers:
        fail(f"layer_types has {len(layer_types)} entries for num_hidden_layers={n_layers}")
    window = c.get("sliding_window")
    out = []
    for t in layer_types:
        if t == "full_attention":
            out.append(None)
        elif t == "sliding_attention" and window:
            out.append(int(window))
        else:
            fail(
                f"layer_types entry {t!r} is not supported "
                "('full_attention', or 'sliding_attention' with a sliding_window)"
            )
    return tuple(out)


def _rope(c, model_type, fail, parse_rope) -> dict[str, Any]:
    """The full-attention layers' RoPE (any type the Llama family reads) and, for Gemma 3, the
    sliding layers' base (unscaled RoPE). transformers 5 writes ``rope_parameters`` per layer
    type for Gemma 3; older files write ``rope_theta``, ``rope_scaling`` (global layers only)
    and ``rope_local_base_freq``."""
    params = c.get("rope_parameters") or {}
    if model_type == "gemma2":
        return parse_rope({"rope_theta": _THETA[model_type]} | c, int(c["head_dim"]))
    if params and set(params) <= {"full_attention", "sliding_attention"}:
        local = dict(params.get("sliding_attention") or {})
        full = {"rope_theta": _THETA[model_type], **(params.get("full_attention") or {})}
    else:
        local = {"rope_theta": c.get("rope_local_base_freq", _LOCAL_THETA)}
        full = {"rope_theta": c.get("rope_theta", _THETA[model_type])}
        full |= params or c.get("rope_scaling") or {}
    local_theta = float(local.pop("rope_theta", _LOCAL_THETA))
    if local.pop("rope_type", "default") != "default" or local:
        fail(
            f"rope_parameters.sliding_attention={params.get('sliding_attention')!r} is not "
            "supported (rope_type 'default' and rope_theta only)"
        )
    full_rope = parse_rope({"rope_parameters": full}, int(c["head_dim"]))
    return full_rope | {"rope_local_theta": local_theta}


def gemma_to_hf(config) -> dict[str, Any]:
    """The ``config.json`` fields that reproduce a Gemma ``config`` in ``transformers``."""
    full = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type != "default":
        full["factor"] = config.rope_factor
    out: dict[str, Any] = {
        "architectures": [GEMMA_ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_activation": ACTIVATION,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "query_pre_attn_scalar": _int_if_whole(config.query_pre_attn_scalar),
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
        "sliding_window": max((w for w in config.sliding_windows if w), default=None),
        "layer_types": [
            "full_attention" if w is None else "sliding_attention" for w in config.sliding_windows
        ],
        "rope_parameters": full,
    }
    if config.model_type == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": config.rope_local_theta}
        out["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    return out


def _int_if_whole(x: float) -> int | float:
    """transformers' configs type ``query_pre_attn_scalar`` as an int (256, 144)."""
    return int(x) if float(x).is_integer() else x
