"""The Falcon architecture config, read strictly from a Hugging Face ``config.json``.

Falcon comes in three attention layouts behind one fused ``query_key_value`` projection
(transformers' ``FalconAttention._split_heads``), and all three are one layout: the rows are
``num_key_value_heads`` groups of ``[q_0 .. q_{G-1}, k, v]`` (``G`` query heads per group):

* Falcon-7B (``multi_query``): one group, every query head shares one key/value head.
* Falcon-40B/180B (``new_decoder_architecture``): ``num_kv_heads`` groups (grouped-query).
* Multi-head (neither flag): one group per head, ``[q, k, v]``.

Every field of ``config.json`` is used, known not to change the forward pass, or refused by
name (see :mod:`jaxlora.models.config` for the Llama family's reader).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxlora.models.fields import BOOKKEEPING, UnsupportedConfigError, check_fields

# ``auto_map`` points at the original remote code (RWForCausalLM); transformers runs its own
# FalconForCausalLM for model_type "falcon" whatever it says.
_IGNORED = BOOKKEEPING | {"auto_map"}
_READ = {
    "vocab_size",
    "hidden_size",
    "n_embed",
    "num_hidden_layers",
    "num_attention_heads",
    "num_kv_heads",
    # transformers >= 5.25 writes the key/value heads it derives from num_kv_heads, multi_query
    # and new_decoder_architecture, and derives them again on load, ignoring what is stored:
    # so does jaxlora (FalconConfig.num_key_value_heads)
    "num_key_value_heads",
    "ffn_hidden_size",
    "layer_norm_epsilon",
    "new_decoder_architecture",
    "multi_query",
    "parallel_attn",
    "num_ln_in_parallel_attn",
    "bias",
    "alibi",
    "activation",
    "hidden_dropout",
    "attention_dropout",
    "apply_residual_connection_post_layernorm",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
}
_REQUIRED = ("vocab_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class FalconConfig:
    """Falcon hyper-parameters, named as in ``transformers.FalconConfig``; the properties give
    the names the rest of jaxlora reads from any family's config (``num_key_value_heads``,
    ``head_dim``, ``sliding_windows``, ``architecture``)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    layer_norm_epsilon: float = 1e-5
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    num_ln_in_parallel_attn: int = 1  # 2: separate ln_attn / ln_mlp (new decoder architecture)
    bias: bool = False
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    model_type: str = "falcon"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedConfigError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_kv_heads={self.num_key_value_heads}"
            )

    @property
    def architecture(self) -> str:
        return "FalconForCausalLM"

    @property
    def num_key_value_heads(self) -> int:
        """Key/value heads: one (Falcon-7B's multi-query), ``num_kv_heads`` groups (the new
        decoder architecture) or one per query head (multi-head)."""
        if self.new_decoder_architecture:
            return self.num_kv_heads
        return 1 if self.multi_query else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def qkv_size(self) -> int:
        """Rows of the fused ``query_key_value`` weight."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def rope_scaling(self) -> None:
        """Plain RoPE: Falcon's ``rope_scaling`` is refused when parsed."""
        return None

    @property
    def attn_logit_softcapping(self) -> None:
        """No soft-capping (Gemma 2's), in attention or on the logits."""
        return None

    final_logit_softcapping = attn_logit_softcapping

    @property
    def rope_local_theta(self) -> None:
        """One RoPE base for every layer (Gemma 3's sliding layers have their own)."""
        return None

    @property
    def sliding_windows(self) -> tuple[None, ...]:
        return (None,) * self.num_hidden_layers  # Falcon attends to the whole context

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> FalconConfig:
        """Parse a ``config.json`` dict, refusing any field or value we do not implement."""

        def refuse(field: str, value: Any, allowed: Any, why: str = "") -> None:
            raise UnsupportedConfigError(
                f"config.json: {field}={value!r} is not supported for falcon "
                f"(supported: {allowed}){why}"
            )

        check_fields(cfg, "falcon", "FalconForCausalLM", _IGNORED | _READ)
        missing = [k for k in _REQUIRED if k not in cfg]
        if "hidden_size" not in cfg and "n_embed" not in cfg:
            missing.append("hidden_size")
        if missing:
            raise UnsupportedConfigError(f"config.json: missing required field(s) {missing}")
        if cfg.get("alibi", False):
            refuse(
                "alibi",
                True,
                "false (rotary)",
                ": ALiBi Falcons (falcon-rw) add per-head linear position biases to the "
                "attention scores, which jaxlora's attention (eager, chunked, splash, cuDNN) "
                "does not take",
            )
        if cfg.get("activation", "gelu") != "gelu":
            refuse("activation", cfg["activation"], "'gelu'")
        for field in ("hidden_dropout", "attention_dropout"):
            if float(cfg.get(field) or 0.0) != 0.0:
                refuse(field, cfg[field], 0.0, ": jaxlora applies no dropout to the base model")
        if cfg.get("apply_residual_connection_post_layernorm", False):
            refuse(
                "apply_residual_connection_post_layernorm",
                True,
                "false",
                ": transformers ignores it, so what the checkpoint computes is ambiguous",
            )
        new_arch = bool(cfg.get("new_decoder_architecture", False))
        parallel = bool(cfg.get("parallel_attn", True))
        n_ln = cfg.get("num_ln_in_parallel_attn")
        if new_arch:
            n_ln = 2 if n_ln is None else n_ln
            if not parallel:  # transformers' layer builds norms its forward never reads
                refuse("parallel_attn", False, "true with new_decoder_architecture")
            if n_ln not in (1, 2):
                refuse("num_ln_in_parallel_attn", n_ln, [1, 2])
        elif n_ln not in (None, 1):  # transformers' older layer would build norms it never reads
            refuse("num_ln_in_parallel_attn", n_ln, "1 or null without new_decoder_architecture")
        multi_query = bool(cfg.get("multi_query", True))
        heads = cfg["num_attention_heads"]
        if not new_arch and not multi_query and cfg.get("num_kv_heads") not in (None, heads):
            # transformers reshapes the per-head keys to num_kv_heads heads: only equal works
            refuse("num_kv_heads", cfg["num_kv_heads"], f"{heads} (num_attention_heads) here")
        hidden = cfg.get("n_embed") or cfg["hidden_size"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_kv_heads=cfg.get("num_kv_heads") or heads,
            ffn_hidden_size=cfg.get("ffn_hidden_size") or 4 * hidden,
            layer_norm_epsilon=float(cfg.get("layer_norm_epsilon") or 1e-5),
            new_decoder_architecture=new_arch,
            multi_query=multi_query,
            parallel_attn=parallel,
            num_ln_in_parallel_attn=n_ln or 1,
            bias=bool(cfg.get("bias", False)),
            rope_theta=_rope_theta(cfg, refuse),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` fields that reproduce this architecture in ``transformers``."""
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_kv_heads": self.num_kv_heads,
            "ffn_hidden_size": self.ffn_hidden_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "new_decoder_architecture": self.new_decoder_architecture,
            "multi_query": self.multi_query,
            "parallel_attn": self.parallel_attn,
            "num_ln_in_parallel_attn": self.num_ln_in_parallel_attn,
            "bias": self.bias,
            "alibi": False,
            "activation": "gelu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        }

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies ``[head_dim // 2]`` (float32), as ``transformers`` has them."""
        dim = self.head_dim
        exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        return (1.0 / (self.rope_theta**exponent)).astype(np.float32)


def _rope_theta(cfg: dict[str, Any], refuse) -> float:
    """The RoPE base; Falcon checkpoints use unscaled RoPE, and any scaling is refused."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type != "default":
        refuse("rope_type", rope_type, "'default'", ": no Falcon checkpoint scales its RoPE")
    if params:
        refuse(f"rope parameters {sorted(params)}", params, "none for rope_type 'default'")
    return float(theta)
