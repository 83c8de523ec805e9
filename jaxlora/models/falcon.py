"""The Falcon decoder (Falcon-7B, Falcon-40B/180B) in Flax Linen, on the Llama family's parts.

Parameter paths mirror Hugging Face (``transformer/h/0/self_attention/query_key_value/weight``,
``[out, in]``), so the checkpoint key table is the identity and PEFT's module names fall out.
What differs from Llama is the block: one fused ``query_key_value`` projection (groups of
``[q.., k, v]`` rows: :mod:`jaxlora.models.falcon_config`), LayerNorm with a bias, a GELU MLP
(``dense_h_to_4h`` / ``dense_4h_to_h``) and attention and MLP run in parallel from the same
input (Falcon-7B: one LayerNorm; the new decoder architecture: ``ln_attn`` and ``ln_mlp``).
Projections, RoPE, attention, the layer loop (unrolled or scanned) and the embedding are
:mod:`jaxlora.models.llama`'s.

References: Almazrouei et al. 2023 (The Falcon Series of Open Language Models); numerics follow
``transformers``' ``modeling_falcon.py`` (LayerNorm in float32, exact-erf GELU, float32 softmax).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from jaxlora.config import LOGICAL_AXES
from jaxlora.models.falcon_config import FalconConfig
from jaxlora.models.llama import (
    Embed,
    Layers,
    Linear,
    attend_heads,
    inner_fields,
    rope,
    tiled_mlp,
)
from jaxlora.weights.dispatch import dense

# Logical axes of each weight by its Hugging Face module name (see llama.MODULE_AXES). The
# fused query_key_value's rows are KV groups: its out axis is `kv_heads`, and the sharding
# rules split it only on whole groups (jaxlora.training.sharding's `units`).
MODULE_AXES: dict[str, tuple[str, ...]] = {
    "word_embeddings": ("vocab", "embed"),
    "query_key_value": ("kv_heads", "embed"),
    "dense": ("embed", "heads"),
    "dense_h_to_4h": ("mlp", "embed"),
    "dense_4h_to_h": ("embed", "mlp"),
    "input_layernorm": ("embed",),
    "post_attention_layernorm": ("embed",),
    "ln_attn": ("embed",),
    "ln_mlp": ("embed",),
    "ln_f": ("embed",),
}
assert {a for axes in MODULE_AXES.values() for a in axes} <= set(LOGICAL_AXES)


class LayerNorm(nn.Module):
    """``x ↦ w · (x − mean) / sqrt(var + eps) + b`` over the last axis, in float32 (as
    ``torch.nn.LayerNorm`` computes it for every input dtype), cast back to ``x.dtype``."""

    dim: int
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.variable("params", "weight", lambda: jnp.ones((self.dim,), self.param_dtype))
        b = self.variable("params", "bias", lambda: jnp.zeros((self.dim,), self.param_dtype))
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)  # biased, as torch
        y = centred * jax.lax.rsqrt(var + self.eps)
        return (y * w.value.astype(jnp.float32) + b.value.astype(jnp.float32)).astype(x.dtype)


def fused_layouts(config: FalconConfig) -> dict[str, tuple[tuple[int, ...], int]]:
    """``query_key_value``'s rows are one part of KV groups ``[q.., k, v]``: sharding splits it
    only into whole groups (Falcon-7B's single group never splits)."""
    KV, D = config.num_key_value_heads, config.head_dim
    group = (config.num_attention_heads // KV + 2) * D
    return {"query_key_value": ((KV * group,), group)}


def split_qkv(fused: jax.Array, config: FalconConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``fused [B, S, qkv_size]`` -> ``q [B, S, H, D]``, ``k, v [B, S, KV, D]``: the rows are
    ``KV`` groups of ``[q_0 .. q_{G-1}, k, v]``, query head ``kv * G + g`` in group ``kv``."""
    KV, D = config.num_key_value_heads, config.head_dim
    G = config.num_attention_heads // KV
    groups = rearrange(fused, "b s (kv n d) -> b s kv n d", kv=KV, d=D)  # n = G + 2
    q = rearrange(groups[..., :G, :], "b s kv g d -> b s (kv g) d")
    return q, groups[..., G, :], groups[..., G + 1, :]


class FalconAttention(nn.Module):
    """Self-attention of one Falcon layer: fused ``query_key_value``, RoPE on q and k, output
    ``dense``. Arguments and caching as :class:`jaxlora.models.llama.Attention`."""

    config: FalconConfig
    param_dtype: Any = jnp.float32
    attn_impl: str = "eager"
    sliding_window: int | None = None

    @nn.compact
    def __call__(self, x, rope_cs, mask, cache=None, segment_ids=None, dropout_key=None):
        cfg = self.config
        H, D = cfg.num_attention_heads, cfg.head_dim
        pd = self.param_dtype
        qkv = Linear(cfg.qkv_size, cfg.hidden_size, cfg.bias, pd, name="query_key_value")
        fused = qkv(x, dropout_key)
        q, k, v = split_qkv(fused, cfg)
        q, k = rope(q, *rope_cs), rope(k, *rope_cs)
        out, cache = attend_heads(
            q, k, v, mask, cache, segment_ids, dtype=x.dtype, scale=D**-0.5, impl=self.attn_impl
        )
        return Linear(cfg.hidden_size, H * D, cfg.bias, pd, name="dense")(out, dropout_key), cache


class FalconMLP(nn.Module):
    config: FalconConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, dropout_key=None):
        cfg, pd = self.config, self.param_dtype
        d, f = cfg.hidden_size, cfg.ffn_hidden_size
        h = Linear(f, d, cfg.bias, pd, name="dense_h_to_4h")(x, dropout_key)
        h = jax.nn.gelu(h, approximate=False)  # transformers' "gelu": exact erf
        return Linear(d, f, cfg.bias, pd, name="dense_4h_to_h")(h, dropout_key)


class FalconDecoderLayer(nn.Module):
    """One block, with :class:`jaxlora.models.llama.DecoderLayer`'s signature so
    :class:`~jaxlora.models.llama.Layers` runs it unrolled or scanned.

    Parallel (Falcon-7B, the new architecture): ``x + (mlp(ln_mlp(x)) + attn(ln_attn(x)))``,
    with one LayerNorm (``input_layernorm``) feeding both unless the config has two.
    Sequential (``parallel_attn=False``): Llama's order, with LayerNorms."""

    config: FalconConfig
    param_dtype: Any = jnp.float32
    attn_impl: str = "eager"
    sliding_window: int | None = None
    mlp_chunk: int = 0  # tokens per MLP tile (jaxlora.models.llama.tiled_mlp)

    @nn.compact
    def __call__(self, x, rope_cs, mask, cache=None, segment_ids=None, dropout_key=None):
        cfg, pd = self.config, self.param_dtype
        norm = lambda name: LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, pd, name=name)
        attn = FalconAttention(cfg, pd, self.attn_impl, name="self_attention")
        mlp = FalconMLP(cfg, pd, name="mlp")
        two_norms = cfg.num_ln_in_parallel_attn == 2
        h_attn = norm("ln_attn" if two_norms else "input_layernorm")(x)
        a, cache = attn(h_attn, rope_cs, mask, cache, segment_ids, dropout_key)
        if cfg.new_decoder_architecture or cfg.parallel_attn:
            h_mlp = norm("ln_mlp")(x) if two_norms else h_attn
            # transformers: mlp_output += attn; residual +
            return x + (tiled_mlp(mlp, h_mlp, dropout_key, self.mlp_chunk) + a), cache
        x = x + a
        h = norm("post_attention_layernorm")(x)
        return x + tiled_mlp(mlp, h, dropout_key, self.mlp_chunk), cache


class FalconModel(nn.Module):
    config: FalconConfig
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attn_impl: str = "eager"
    runs: tuple[tuple[int, int], ...] | None = None
    mlp_chunk: int = 0

    @nn.compact
    def __call__(self, input_ids, positions, segment_ids, caches=None):
        cfg, pd = self.config, self.param_dtype
        embed = Embed(cfg.vocab_size, cfg.hidden_size, pd, name="word_embeddings")()
        x = jnp.take(embed, input_ids, axis=0).astype(self.dtype)  # (B, S, d)
        layers = Layers(
            cfg,
            self.remat,
            pd,
            self.attn_impl,
            self.runs,
            block=FalconDecoderLayer,
            mlp_chunk=self.mlp_chunk,
            name="h",
        )
        x, caches = layers(x, positions, segment_ids, caches)
        x = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, pd, name="ln_f")(x)
        return x, embed, caches


class FalconForCausalLM(nn.Module):
    """``input_ids [B, S] -> logits [B, S, vocab]``; arguments as
    :class:`jaxlora.models.llama.LlamaForCausalLM`. The head is tied to ``word_embeddings``
    unless ``tie_word_embeddings`` is false (then ``lm_head``, no bias)."""

    config: FalconConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attn_impl: str = "eager"
    runs: tuple[tuple[int, int], ...] | None = None
    mlp_chunk: int = 0

    @nn.compact
    def __call__(self, input_ids, positions, segment_ids, caches=None, return_hidden=False):
        cfg = self.config
        h, embed_w, caches = FalconModel(*inner_fields(self), name="transformer")(
            input_ids, positions, segment_ids, caches
        )
        if return_hidden:
            return h, caches
        if cfg.tie_word_embeddings:
            return dense(h, embed_w), caches
        head = Linear(cfg.vocab_size, cfg.hidden_size, False, self.param_dtype, name="lm_head")
        return head(h), caches
