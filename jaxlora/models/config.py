"""The Llama-family architecture config, read strictly from a Hugging Face ``config.json``.

One frozen dataclass covers Llama 2/3/3.x, Mistral, Qwen2/2.5 and Qwen3: they differ only in
attention biases (Qwen2), per-head q/k RMSNorm (Qwen3), sliding-window layers (Mistral, Qwen2
when enabled), tied embeddings and the RoPE frequency rule. Every field of ``config.json`` is
either used, known not to change the forward pass, or refused by name (penzai's importer habit):
a field we would silently ignore is a wrong model.

Phi-3 / 3.5 / Phi-4 (``phi3``) is the same decoder with fused ``qkv_proj`` / ``gate_up_proj``
and partial rotary; its reading of ``config.json`` (Phi3Config's) is ``_phi3_from_hf`` below.
The yarn / dynamic / longrope RoPE rules are :mod:`jaxlora.models.rope`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxlora.models import gemma_config
from jaxlora.models import rope as rope_rules
from jaxlora.models.fields import BOOKKEEPING, UnsupportedConfigError, check_fields

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

ARCHITECTURES |= gemma_config.GEMMA_ARCHITECTURES

ROPE_TYPES = ("default", "linear", "llama3", *rope_rules.SCALED_TYPES)

# Fields the Llama family reads or checks itself below (another family refuses or reads them
# on its own terms); partial_rotary_factor is checked == 1.0 outside phi3.
_LLAMA_READ = {
    "max_window_layers",
    "use_sliding_window",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "layer_types",
    "sliding_window",
    "attention_dropout",
    "pretraining_tp",
    "hidden_act",
    "mlp_bias",
    "attention_bias",
    "head_dim",
    "tie_word_embeddings",
    "partial_rotary_factor",
}
# Anything neither here nor read below is refused.
_IGNORED = BOOKKEEPING | _LLAMA_READ

_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters, named as in ``transformers``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0  # linear / llama3
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position_embeddings: int = 8192  # llama3
    attention_bias: bool = False  # bias on q/k/v/o (Llama) — Qwen2 sets qkv_bias instead
    qkv_bias: bool = False  # bias on q/k/v only (Qwen2/2.5)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    tie_word_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    model_type: str = "llama"
    rope_scaling: rope_rules.RopeScaling | None = None  # yarn / dynamic / longrope
    partial_rotary_factor: float = 1.0  # Phi-3/4: RoPE on the first fraction of head_dim
    # Gemma 2 / 3 (jaxlora.models.gemma_config): GeGLU, (1 + w) norms, post-norms, scaled
    # embeddings; the attention scale is query_pre_attn_scalar ** -0.5 when set.
    hidden_act: str = "silu"
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None  # scores -> c · tanh(scores / c)
    final_logit_softcapping: float | None = None  # logits -> c · tanh(logits / c)
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' (unscaled) RoPE base

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_hidden_layers)
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise UnsupportedConfigError("sliding_windows must have one entry per layer")

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    @property
    def fused_projections(self) -> bool:
        """Phi-3 stores q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj``."""
        return self.model_type == "phi3"

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head RoPE rotates (the rest pass through), as transformers has it."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def gemma(self) -> bool:
        """Gemma's layer: ``(1 + w)`` norms, pre- and post-norms, embeddings scaled."""
        return self.model_type in gemma_config.GEMMA_ARCHITECTURES

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_inv_freq(self, window: int | None) -> np.ndarray:
        """RoPE inverse frequencies of a layer with this sliding window: Gemma 3's sliding
        layers have their own base and no scaling, every other layer :meth:`inv_freq`."""
        if window is None or self.rope_local_theta is None:
            return self.inv_freq()
        local = dataclasses.replace(self, rope_theta=self.rope_local_theta, rope_type="default")
        return local.inv_freq()

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        """Parse a ``config.json`` dict, refusing any field or value we do not implement."""
        model_type = cfg.get("model_type")
        if model_type in gemma_config.MODEL_TYPES:
            return cls._from_hf_gemma(cfg)
        if model_type not in ARCHITECTURES:
            raise UnsupportedConfigError(
                f"config.json: model_type={model_type!r} is not supported "
                f"(supported: {sorted(ARCHITECTURES)})"
            )
        if model_type == "phi3":
            return _phi3_from_hf(cls, cfg)
        accepted = _IGNORED | set(_REQUIRED) | {"num_key_value_heads"}
        check_fields(cfg, model_type, ARCHITECTURES[model_type], accepted)
        missing = [k for k in _REQUIRED if k not in cfg]
        if missing:
            raise UnsupportedConfigError(f"config.json: missing required field(s) {missing}")

        def refuse(field: str, value: Any, allowed: Any) -> None:
            raise UnsupportedConfigError(
                f"config.json: {field}={value!r} is not supported (supported: {allowed})"
            )

        if cfg.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", cfg["hidden_act"], "'silu'")
        if cfg.get("pretraining_tp", 1) != 1:
            refuse("pretraining_tp", cfg["pretraining_tp"], 1)
        if float(cfg.get("attention_dropout", 0.0) or 0.0) != 0.0:
            refuse("attention_dropout", cfg["attention_dropout"], 0.0)
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            refuse("partial_rotary_factor", cfg["partial_rotary_factor"], 1.0)

        heads = cfg["num_attention_heads"]
        n_layers = cfg["num_hidden_layers"]
        rope = _parse_rope(cfg, refuse, cfg.get("head_dim") or cfg["hidden_size"] // heads)
        windows = _parse_sliding_windows(cfg, model_type, n_layers, refuse)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            attention_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
            qkv_bias=model_type == "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_windows=windows,
            model_type=model_type,
            **rope,
        )

    @classmethod
    def _from_hf_gemma(cls, cfg: dict[str, Any]) -> LlamaConfig:
        def fail(message: str) -> None:
            raise UnsupportedConfigError(f"config.json: {message}")

        def refuse(field: str, value: Any, allowed: Any) -> None:
            fail(f"{field}={value!r} is not supported (supported: {allowed})")

        if cfg["model_type"] == gemma_config.MULTIMODAL:
            cfg = gemma_config.text_config(cfg, _IGNORED, fail)
        parse_rope = lambda c, head_dim: _parse_rope(c, refuse, head_dim)
        return cls(**gemma_config.gemma_fields(cfg, _IGNORED, fail, parse_rope))

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` fields that reproduce this architecture in ``transformers``."""
        if self.gemma:
            return gemma_config.gemma_to_hf(self)
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope |= {
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
            }
        if self.rope_scaling is not None:
            rope |= self.rope_scaling.to_hf()
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": rope,
        }
        if self.rope_scaling is not None and self.rope_scaling.max_position_embeddings:
            out["max_position_embeddings"] = self.rope_scaling.max_position_embeddings
        if self.model_type == "phi3":
            return _phi3_to_hf(self, out)
        if self.model_type == "llama":
            out |= {"attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias}
        if self.model_type == "qwen3":
            out["attention_bias"] = self.attention_bias
        windows = {w for w in self.sliding_windows if w is not None}
        if self.model_type == "mistral":
            out["sliding_window"] = windows.pop() if windows else None
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = bool(windows)
            out["sliding_window"] = windows.pop() if windows else None
            out["layer_types"] = [
                "full_attention" if w is None else "sliding_attention" for w in self.sliding_windows
            ]
        return out

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies ``[rotary_dim // 2]`` (float32), as ``transformers`` builds
        them at init; yarn / dynamic / longrope pick theirs per call (:mod:`.rope`)."""
        if self.rope_scaling is not None:
            return rope_rules.static_inv_freq(self.rope_scaling)
        dim = self.rotary_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
        inv = inv.astype(np.float32)
        if self.rope_type == "linear":
            return (inv / np.float32(self.rope_factor)).astype(np.float32)
        if self.rope_type == "llama3":  # Llama 3.1 frequency-dependent scaling (Meta's reference)
            factor, lo, hi = self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor
            old_ctx = self.rope_original_max_position_embeddings
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv


def _parse_rope(cfg: dict[str, Any], refuse, head_dim: int, partial: float = 1.0) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters` (theta inside); older checkpoints write
    # `rope_theta` + `rope_scaling` with "type" or "rope_type".
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "rope_parameters" in cfg and cfg.get("rope_scaling"):
        params = {**cfg["rope_scaling"], **params}
    theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        refuse("rope_type", rope_type, list(ROPE_TYPES))
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params.pop("factor"))
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params.pop("low_freq_factor"))
        out["rope_high_freq_factor"] = float(params.pop("high_freq_factor"))
        out["rope_original_max_position_embeddings"] = int(
            params.pop("original_max_position_embeddings")
        )
    # the top-level factor is checked by the caller; one inside the rope dict must agree
    inner = float(params.pop("partial_rotary_factor", partial))
    if inner != partial:
        refuse("rope_parameters.partial_rotary_factor", inner, partial)
    if rope_type in rope_rules.SCALED_TYPES:
        # transformers: yarn/longrope's original length defaults to max_position_embeddings
        # (Phi-3's top-level original_max_position_embeddings wins; see _phi3_from_hf)
        if rope_type != "dynamic" and cfg.get("max_position_embeddings") is not None:
            params.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
        out["rope_scaling"] = rope_rules.parse(
            rope_type,
            params,
            theta=float(theta),
            dim=int(head_dim * partial),
            max_position_embeddings=cfg.get("max_position_embeddings"),
            refuse=refuse,
        )
        return out
    if params:
        refuse(f"rope parameters {sorted(params)} for rope_type", rope_type, "none")
    return out


def _parse_sliding_windows(cfg, model_type, n_layers, refuse) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if model_type in ("llama",):
        if window is not None:
            refuse("sliding_window", window, "null for llama")
        return (None,) * n_layers
    if model_type == "mistral":
        return (window,) * n_layers
    # Qwen2 / Qwen3: `layer_types` says which layers slide; older configs say it with
    # use_sliding_window + max_window_layers (layers >= max_window_layers slide).
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        use = bool(cfg.get("use_sliding_window", False)) and window is not None
        first = cfg.get("max_window_layers", n_layers)
        layer_types = [
            "sliding_attention" if use and i >= first else "full_attention" for i in range(n_layers)
        ]
    if len(layer_types) != n_layers:
        refuse("layer_types (length)", len(layer_types), n_layers)
    out = []
    for t in layer_types:
        if t == "full_attention":
            out.append(None)
        elif t == "sliding_attention" and window is not None:
            out.append(int(window))
        else:
            refuse("layer_types entry", t, "'full_attention' or 'sliding_attention' with a window")
    return tuple(out)


# ---- Phi-3 / 3.5 / Phi-4 (model_type "phi3") ------------------------------------------------

# Fields Phi3Config reads beyond the Llama ones, and fields the checkpoints' remote code reads
# that transformers' Phi3 ignores: accepted only at the value that computes what transformers does.
_PHI3_NEUTRAL = {
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "lm_head_bias": False,
    "full_attn_mod": 1,  # Phi-4-mini remote code: every layer full attention
    "interpolate_factor": 1,
}
_PHI3_FIELDS = (
    _IGNORED
    - {"max_window_layers", "use_sliding_window", "layer_types", "pretraining_tp"}
    - set(_REQUIRED)
) | {"original_max_position_embeddings", "auto_map", "num_key_value_heads", *_PHI3_NEUTRAL}


def _refuse(field: str, value: Any, allowed: Any) -> None:
    raise UnsupportedConfigError(
        f"config.json: {field}={value!r} is not supported (supported: {allowed})"
    )


def _phi3_from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
    """Phi3Config's reading of ``config.json``: fused projections, no biases, partial rotary,
    ``default`` or ``longrope`` RoPE (legacy ``su``/``yarn`` mean longrope there, and the
    top-level ``original_max_position_embeddings``, default 4096, overrides the rope dict's),
    one sliding window for every layer when set."""
    check_fields(cfg, "phi3", ARCHITECTURES["phi3"], _PHI3_FIELDS | set(_REQUIRED))
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise UnsupportedConfigError(f"config.json: missing required field(s) {missing}")
    for field, neutral in _PHI3_NEUTRAL.items():
        if cfg.get(field, neutral) != neutral:
            _refuse(field, cfg[field], repr(neutral))
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("su", "yarn"):
        rope_type = "longrope"
    if rope_type not in ("default", "longrope"):
        _refuse("rope_type", rope_type, "['default', 'longrope'] for phi3 (as Phi3Config)")
    params |= {"rope_type": rope_type, "type": rope_type}
    if rope_type == "longrope":
        params["original_max_position_embeddings"] = cfg.get(
            "original_max_position_embeddings", 4096
        )
    rope_cfg = {**cfg, "rope_parameters": params, "rope_scaling": None}
    rope_cfg.setdefault("max_position_embeddings", 4096)
    rope = _parse_rope(rope_cfg, _refuse, head_dim, partial)
    rotary = int(head_dim * partial)
    if rotary % 2 or not 0 < rotary <= head_dim:
        _refuse("partial_rotary_factor", partial, f"one giving even rotary dims of {head_dim}")
    window = cfg.get("sliding_window")
    n_layers = cfg["num_hidden_layers"]
    return cls(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_windows=(None if window is None else int(window),) * n_layers,
        model_type="phi3",
        partial_rotary_factor=partial,
        **rope,
    )


def _phi3_to_hf(config: LlamaConfig, out: dict[str, Any]) -> dict[str, Any]:
    """Phi3Config's fields for ``config`` from the Llama-shaped ``out`` of ``to_hf``."""
    if config.head_dim == config.hidden_size // config.num_attention_heads:
        del out["head_dim"]  # Phi3Config derives it; an explicit one would be a new attribute
    windows = {w for w in config.sliding_windows}
    out["sliding_window"] = windows.pop()
    out["partial_rotary_factor"] = config.partial_rotary_factor
    out["rope_parameters"]["partial_rotary_factor"] = config.partial_rotary_factor
    # Phi3Config's default token ids (pad/eos 32000, bos 1) fit Phi-3's 32064-token vocabulary
    # only (a smaller one fails to build the embedding); the tokenizer saved beside says them.
    out |= {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    scaling = config.rope_scaling
    if scaling is not None:
        out["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    return out
