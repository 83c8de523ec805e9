"""The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, Phi-3/4) in Flax Linen.

Parameter paths mirror Hugging Face exactly (``model/layers/0/self_attn/q_proj/weight``), with
weights in torch orientation ``[out, in]``, so the checkpoint key table is the identity. Every
projection goes through :func:`jaxlora.weights.dense`, which dispatches on the weight's type: the
same module runs a bf16 array, an NF4 tensor or a LoRA-wrapped weight without knowing which.

References: Touvron et al. 2023 (Llama 2), Dubey et al. 2024 (Llama 3, rope scaling), Jiang et al.
2023 (Mistral, sliding window), Qwen2/Qwen3 technical reports; numerics follow ``transformers``'
``modeling_llama.py`` (RMSNorm in float32, softmax in float32, rotate-half RoPE).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from jaxlora.config import LOGICAL_AXES
from jaxlora.models import rope as rope_rules
from jaxlora.models.attention import (
    attend,
    attention,
    attention_mask,
    geglu,
    impl_name,
    softcap,
    swiglu,
)
from jaxlora.models.config import LlamaConfig
from jaxlora.models.stacking import parse_run_key, run_key
from jaxlora.weights.dispatch import dense, staged

# Logical axes of each weight, by the Hugging Face module name that owns it (torch orientation).
# The recipe's mesh.rules map logical axes (jaxlora.config.LOGICAL_AXES) to mesh axes
# (jaxlora.training.sharding); the model never names a mesh axis.
MODULE_AXES: dict[str, tuple[str, ...]] = {
    "embed_tokens": ("vocab", "embed"),
    "lm_head": ("vocab", "embed"),
    "q_proj": ("heads", "embed"),
    "k_proj": ("kv_heads", "embed"),
    "v_proj": ("kv_heads", "embed"),
    "o_proj": ("embed", "heads"),
    "gate_proj": ("mlp", "embed"),
    "up_proj": ("mlp", "embed"),
    "down_proj": ("embed", "mlp"),
    "input_layernorm": ("embed",),
    "post_attention_layernorm": ("embed",),
    "pre_feedforward_layernorm": ("embed",),  # Gemma
    "post_feedforward_layernorm": ("embed",),  # Gemma
    "norm": ("embed",),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    # Phi-3's fused projections: q, k, v heads stacked on `out`; gate and up halves stacked on
    # `out`. training/sharding.py splits them only on whole heads / whole halves.
    "qkv_proj": ("heads", "embed"),
    "gate_up_proj": ("mlp", "embed"),
}
assert {a for axes in MODULE_AXES.values() for a in axes} <= set(LOGICAL_AXES)


def fused_layouts(config: LlamaConfig) -> dict[str, tuple[tuple[int, ...], int]]:
    """``{module: (part rows, unit rows)}`` of the projections that stack several outputs on
    ``out``: Phi-3's ``qkv_proj`` is q | k | v in heads of ``head_dim`` rows, ``gate_up_proj``
    is gate | up. Sharding splits ``out`` only into whole units inside one part."""
    if not config.fused_projections:
        return {}
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    F = config.intermediate_size
    return {"qkv_proj": ((H * D, KV * D, KV * D), D), "gate_up_proj": ((F, F), 1)}


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # the matmul outputs "dots" keeps, held in host memory instead (streamed back for backward)
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def _normal(std: float = 0.02):
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def module_key(layer_key: jax.Array, path: tuple[str, ...]) -> jax.Array:
    """The LoRA-dropout key of the module at ``path`` inside a decoder layer whose key is
    ``layer_key``: the layer's key with the path's CRC-32 folded in. ``path`` starts below the
    layer (``("self_attn", "q_proj")``), so the key is the same whether the layer runs unrolled
    (``layers/3/...``) or in a scan (``layers/0:32/...``)."""
    return jax.random.fold_in(layer_key, zlib.crc32("/".join(path).encode()))


def _below_layer(path: tuple[str, ...]) -> tuple[str, ...]:
    """The part of a module path below its decoder layer (``layers/3`` or ``layers/0:32``)."""
    at = max(i for i, p in enumerate(path) if p.isdigit() or parse_run_key(p) is not None)
    return tuple(path[at + 1 :])


class Linear(nn.Module):
    """``x ↦ x @ Wᵀ + b`` with ``W [out, in]`` of any weight type (array, NF4, LoRA).

    ``dropout_key`` (inside a decoder layer: the layer's key, see :class:`Layers`) gives LoRA
    dropout its mask through :func:`module_key`; elsewhere (``lm_head``) the key comes from the
    ``"dropout"`` rng stream when the caller passes one. Without either there is no dropout."""

    out_features: int
    in_features: int
    use_bias: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        # `variable` rather than `param`: a stored weight may be an NF4Tensor or LoRAWeight
        # pytree, whose leaves Linen's param shape check would misread.
        shape = (self.out_features, self.in_features)
        w = self.variable(
            "params", "weight", lambda: _normal()(self.make_rng("params"), shape, self.param_dtype)
        ).value
        b = None
        if self.use_bias:
            b = self.variable(
                "params", "bias", lambda: jnp.zeros((self.out_features,), self.param_dtype)
            ).value
        # Dropout (LoRA's only randomness) is on exactly when the caller passes a "dropout" rng.
        if dropout_key is not None:
            rng = module_key(dropout_key, _below_layer(self.scope.path))
        else:
            rng = self.make_rng("dropout") if self.has_rng("dropout") else None
        return dense(x, w, b, rng=rng)


class RMSNorm(nn.Module):
    """``x ↦ w · x / sqrt(mean(x²) + eps)``, normalised in float32 as ``LlamaRMSNorm`` does.

    ``offset`` (Gemma): ``x ↦ (1 + w) · x / sqrt(mean(x²) + eps)`` with the scaling in float32
    too, cast to ``x``'s dtype only at the end (``Gemma2RMSNorm``); ``w`` starts at 0."""

    dim: int
    eps: float
    param_dtype: Any = jnp.float32
    offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = jnp.zeros if self.offset else jnp.ones
        w = self.variable("params", "weight", lambda: init((self.dim,), self.param_dtype)).value
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return w.astype(x.dtype) * x32.astype(x.dtype)


def rope_tables(positions: jax.Array, inv_freq: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [B, S, D]`` for ``positions [B, S]`` (computed in float32, cast to ``dtype``).

    Built once per forward pass and shared by every layer, as transformers' ``rotary_emb`` is.
    """
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, S, D/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # (B, S, D)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def config_rope_tables(config: LlamaConfig, positions: jax.Array, dtype):
    """``cos, sin [B, S, rotary_dim]`` for a forward call over ``positions [B, S]``: fixed
    frequencies, or those yarn / dynamic / longrope pick for this call, scaled by their
    attention factor in float32 as transformers' rotary embedding does."""
    scaling = config.rope_scaling
    if scaling is None:
        return rope_tables(positions, jnp.asarray(config.inv_freq()), dtype)
    cos, sin = rope_tables(positions, rope_rules.call_inv_freq(scaling, positions), jnp.float32)
    factor = jnp.float32(scaling.attention_factor)
    return (cos * factor).astype(dtype), (sin * factor).astype(dtype)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``x [B, S, H, D]``, ``cos, sin [B, S, R]`` from :func:`rope_tables`;
    with ``R < D`` (partial rotary, Phi-3/4) only the first ``R`` dimensions rotate."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
    x1, x2 = jnp.split(rot, 2, axis=-1)
    rot = rot * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return rot if rest.shape[-1] == 0 else jnp.concatenate([rot, rest], axis=-1)


def attend_heads(
    q,
    k,
    v,
    mask,
    cache,
    segment_ids,
    *,
    dtype,
    scale,
    softcap=None,
    sliding_window=None,
    impl="eager",
):
    """Attention of ``q [B, S, H, D]`` over ``k, v [B, S, KV, D]`` after RoPE, for every family's
    attention module: heads first, so every product is a plain batched matmul over ``(B, KV)``
    (q ``(B, KV, G, S, D)`` with ``G = H / KV`` query heads per KV head, k and v
    ``(B, KV, T, D)``); with a ``cache`` this step's keys and values are written at
    ``cache["index"]`` first and read back in ``dtype`` (the activations'). ``mask`` (eager) or
    ``segment_ids`` (flash, ``impl``) as in :class:`Attention`. Returns ``out [B, S, H·D]`` and
    the cache."""
    S, KV = q.shape[1], k.shape[2]
    q = rearrange(q, "b s (kv g) d -> b kv g s d", kv=KV)
    k, v = (rearrange(t, "b s kv d -> b kv s d") for t in (k, v))
    if cache is not None:
        idx = cache["index"]
        k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, 0, idx, 0))
        v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, idx, 0))
        cache = cache | {"k": k, "v": v, "index": idx + S}
        k, v = k.astype(dtype), v.astype(dtype)
    chex.assert_equal_shape([k, v])
    if mask is not None:
        out = attend(q, k, v, mask, scale, softcap)  # (B, KV, G, S, D)
    else:
        out = attention(
            q,
            k,
            v,
            segment_ids=segment_ids,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            impl=impl,
        )
    return rearrange(out, "b kv g s d -> b s (kv g d)"), cache


class Attention(nn.Module):
    """Self-attention of one layer. ``rope_cs`` is ``(cos, sin)`` from :func:`rope_tables` and
    ``mask`` the boolean ``[B, 1, 1, S, T]`` from :func:`attention_mask`, both built once per
    forward pass by :class:`Layers`. With a ``cache`` (decoding), this step's keys and values are
    written at ``cache["index"]`` and ``mask`` covers the whole cache.

    ``attn_impl`` other than ``"eager"`` (see :func:`jaxlora.models.attention.attention`) runs
    flash attention from ``segment_ids [B, S]`` and ``sliding_window`` instead of ``mask``
    (which is then None); decoding with a cache stays eager. ``dropout_key``: the layer's
    LoRA-dropout key (:class:`Linear`)."""

    config: LlamaConfig
    param_dtype: Any = jnp.float32
    attn_impl: str = "eager"
    sliding_window: int | None = None

    @nn.compact
    def __call__(self, x, rope_cs, mask, cache=None, segment_ids=None, dropout_key=None):
        cfg = self.config
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias or cfg.qkv_bias
        lin = lambda n, o, i, b: functools.partial(
            Linear(o, i, b, self.param_dtype, name=n), dropout_key=dropout_key
        )
        heads = lambda t: rearrange(t, "b s (h d) -> b s h d", d=D)
        if cfg.fused_projections:  # Phi-3: one [(H + 2·KV)·D, d] projection, q | k | v
            qkv = heads(lin("qkv_proj", (H + 2 * KV) * D, cfg.hidden_size, False)(x))
            q, k, v = jnp.split(qkv, [H, H + KV], axis=2)
        else:
            q = heads(lin("q_proj", H * D, cfg.hidden_size, bias)(x))  # (B, S, H, D)
            k = heads(lin("k_proj", KV * D, cfg.hidden_size, bias)(x))  # (B, S, KV, D)
            v = heads(lin("v_proj", KV * D, cfg.hidden_size, bias)(x))
        if cfg.qk_norm:
            q = RMSNorm(D, cfg.rms_norm_eps, self.param_dtype, cfg.gemma, name="q_norm")(q)
            k = RMSNorm(D, cfg.rms_norm_eps, self.param_dtype, cfg.gemma, name="k_norm")(k)
        q, k = rope(q, *rope_cs), rope(k, *rope_cs)
        out, cache = attend_heads(
            q,
            k,
            v,
            mask,
            cache,
            segment_ids,
            dtype=x.dtype,
            scale=cfg.attention_scale,
            softcap=cfg.attn_logit_softcapping,
            sliding_window=self.sliding_window,
            impl=self.attn_impl,
        )
        out = lin("o_proj", cfg.hidden_size, H * D, cfg.attention_bias)(out)
        return out, cache


class MLP(nn.Module):
    config: LlamaConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, dropout_key=None):
        cfg = self.config
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        lin = lambda n, o, i: functools.partial(
            Linear(o, i, b, self.param_dtype, name=n), dropout_key=dropout_key
        )
        if cfg.fused_projections:  # Phi-3: one [2·f, d] projection, gate | up
            gate_up = lin("gate_up_proj", 2 * f, d)(x)
            gate, up = jnp.split(gate_up, 2, axis=-1)
            return lin("down_proj", d, f)(swiglu(gate, up))
        gate = lin("gate_proj", f, d)(x)
        up = lin("up_proj", f, d)(x)
        act = geglu if cfg.hidden_act == "gelu_pytorch_tanh" else swiglu
        return lin("down_proj", d, f)(act(gate, up))


def tiled_mlp(mlp: nn.Module, x: jax.Array, dropout_key: jax.Array | None, tokens: int):
    """``mlp(x, dropout_key)`` for ``x [B, S, d]``, a tile of ``tokens // B`` positions of every
    row at a time (``train.mlp_chunk``; 0, or a sequence that fits one tile: the whole).

    The MLP is position-wise, so its tiles are independent: a scan over them, each tile
    rematerialized, holds the MLP's ``[B, S, intermediate]`` activations one tile at a time in
    the backward pass instead of all at once (at Llama-3-8B's 14,336 and S = 8192 each is
    448 MiB in float32, and a layer's backward holds several). Its weights are the same in every
    tile (broadcast, not stacked); LoRA dropout folds the tile's index into the layer's key,
    so every tile draws its own mask. A sequence that is not a whole number of tiles is padded
    with zeros to one and cut back: the padding's outputs are dropped, and the weights'
    gradients get nothing from it (a zero input row adds nothing to ``xᵀ·dy``, and ``dy`` is
    zero there)."""
    B, S, _ = x.shape
    size = max(1, tokens // B)
    if not tokens or size >= S:
        return mlp(x, dropout_key)
    n = -(-S // size)
    padded = jnp.pad(x, ((0, 0), (0, n * size - S), (0, 0)))
    tiles = rearrange(padded, "b (n c) d -> n b c d", n=n)
    keys = None
    if dropout_key is not None:
        keys = jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(jnp.arange(n))

    def body(module, carry, tile):
        x_tile, key = tile
        return carry, module(x_tile, key)

    scan = nn.scan(
        nn.remat(body, prevent_cse=False),
        variable_broadcast="params",
        split_rngs={"params": False},
        length=n,
    )
    if not mlp.is_initializing():  # the weights made ready for a product once a tile, here
        scan = nn.map_variables(scan, "params", trans_in_fn=staged)
    _, out = scan(mlp, None, (tiles, keys))
    return rearrange(out, "n b c d -> b (n c) d")[:, :S]


class DecoderLayer(nn.Module):
    config: LlamaConfig
    param_dtype: Any = jnp.float32
    attn_impl: str = "eager"
    sliding_window: int | None = None
    mlp_chunk: int = 0  # tokens per MLP tile (tiled_mlp); 0 = the whole sequence

    @nn.compact
    def __call__(self, x, rope_cs, mask, cache=None, segment_ids=None, dropout_key=None):
        cfg, pd = self.config, self.param_dtype
        h = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, cfg.gemma, name="input_layernorm")(x)
        attn = Attention(cfg, pd, self.attn_impl, self.sliding_window, name="self_attn")
        h, cache = attn(h, rope_cs, mask, cache, segment_ids, dropout_key)
        if cfg.gemma:
            return self._gemma_rest(x, h, dropout_key), cache
        x = x + h
        h = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, name="post_attention_layernorm")(x)
        mlp = MLP(cfg, pd, name="mlp")
        return x + tiled_mlp(mlp, h, dropout_key, self.mlp_chunk), cache

    def _gemma_rest(self, x, h, dropout_key):
        """Gemma's sandwich: the attention output and the MLP's each normalised again before
        their residual add (Gemma 2 report, Gemma Team 2024)."""
        cfg, pd = self.config, self.param_dtype
        norm = lambda name: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, True, name=name)
        x = x + norm("post_attention_layernorm")(h)
        h = norm("pre_feedforward_layernorm")(x)
        h = tiled_mlp(MLP(cfg, pd, name="mlp"), h, dropout_key, self.mlp_chunk)
        return x + norm("post_feedforward_layernorm")(h)


class Layers(nn.Module):
    """The decoder layers: ``layers/0 ... layers/N-1`` unrolled, each under its Hugging Face
    path, or, with ``runs``, each run of layers ``start .. stop-1`` scanned over parameters
    stacked under ``layers/start:stop`` (:mod:`jaxlora.models.stacking`), which compiles one
    layer per run instead of every layer.

    The RoPE tables and one attention mask per distinct sliding window are built here, once,
    and shared by the layers. With ``caches`` (decoding; every layer's cache is at the same
    index; one cache per layer unrolled, one per run with a leading layer axis scanned: see
    :func:`jaxlora.sampling.init_caches`), the key segments are the cached ones with this step's
    written in. A flash ``attn_impl`` needs no mask: it gets the segment ids (decoding stays
    eager, with masks). ``block`` is the layer module (default :class:`DecoderLayer`); a
    family with another block (Falcon) passes its own, with the same signature.

    LoRA dropout: with a ``"dropout"`` rng, layer ``i`` gets the key ``fold_in(k, i)`` from one
    key ``k`` drawn here, passed in as an argument (scanned: one per layer, scanned over like
    the parameters), and each module folds in its path below the layer
    (:func:`module_key`). The masks are thus the same function of the step's key, the
    layer's index and the module whether the layers run unrolled or scanned, in any runs;
    Linen's own per-module streams would differ (a scan splits its rng per iteration).
    """

    config: LlamaConfig
    remat: str = "none"
    param_dtype: Any = jnp.float32
    attn_impl: str = "eager"
    runs: tuple[tuple[int, int], ...] | None = None
    block: Any = None
    mlp_chunk: int = 0  # tokens per MLP tile in every layer (tiled_mlp); 0 = whole sequences

    @nn.compact
    def __call__(self, x, positions, segment_ids, caches=None):
        cfg = self.config
        S = x.shape[1]
        shared = config_rope_tables(cfg, positions, x.dtype)  # every layer's but Gemma 3's sliding
        own = cfg.rope_local_theta is not None  # Gemma 3's sliding layers: their own base
        local = lambda w: rope_tables(positions, jnp.asarray(cfg.layer_inv_freq(w)), x.dtype)
        rope_cs = {w: local(w) if own and w else shared for w in set(cfg.sliding_windows)}
        q_slots, k_segments = jnp.arange(S), segment_ids
        if caches is not None:
            idx = caches[0]["index"]
            idx = idx if self.runs is None else idx[0]  # scanned: one index per stacked layer
            cached = caches[0]["segment_ids"]
            cached = cached if self.runs is None else cached[0]
            k_segments = jax.lax.dynamic_update_slice(cached, segment_ids, (0, idx))
            q_slots = q_slots + idx
        eager = impl_name(self.attn_impl) == "eager" or caches is not None
        k_slots = jnp.arange(k_segments.shape[1])
        masks = {
            w: attention_mask(q_slots, k_slots, segment_ids, k_segments, w) if eager else None
            for w in set(cfg.sliding_windows)
        }
        layer_cls = self.block or DecoderLayer
        if self.remat != "none":
            # prevent_cse=False under scan: the loop already keeps XLA from merging the
            # recomputation into the forward (flax's advice for remat inside scan).
            layer_cls = nn.remat(
                layer_cls, policy=REMAT_POLICIES[self.remat], prevent_cse=self.runs is None
            )
        args = (self.param_dtype, self.attn_impl)
        spans = self.runs or tuple((i, i + 1) for i in range(cfg.num_hidden_layers))
        key = self.make_rng("dropout") if self.has_rng("dropout") else None
        layer_keys = lambda start, stop: (
            None
            if key is None
            else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(start, stop))
        )
        new_caches = []
        for j, (start, stop) in enumerate(spans):
            windows = set(cfg.sliding_windows[start:stop])
            if len(windows) != 1:
                raise ValueError(f"layers {start}..{stop - 1} mix sliding windows {windows}")
            window = windows.pop()
            cache = None if caches is None else caches[j]
            keys = layer_keys(start, stop)
            if self.runs is None:
                layer = layer_cls(cfg, *args, window, self.mlp_chunk, name=str(start))
                keys = None if keys is None else keys[0]
            else:
                layer = nn.scan(
                    layer_cls,
                    variable_axes={"params": 0},
                    split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
                    length=stop - start,
                )(cfg, *args, window, self.mlp_chunk, name=run_key(start, stop))
            x, cache = layer(x, rope_cs[window], masks[window], cache, segment_ids, keys)
            if cache is not None:
                segs = k_segments if self.runs is None else jnp.stack([k_segments] * (stop - start))
                cache = cache | {"segment_ids": segs}
            new_caches.append(cache)
        return x, (None if caches is None else new_caches)


class Embed(nn.Module):
    """Holds ``embed_tokens/weight [vocab, d]``; returns it (lookup and tied head both use it)."""

    vocab_size: int
    dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        shape = (self.vocab_size, self.dim)
        init = lambda: _normal()(self.make_rng("params"), shape, self.param_dtype)
        return self.variable("params", "weight", init).value


class LlamaModel(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attn_impl: str = "eager"
    runs: tuple[tuple[int, int], ...] | None = None
    mlp_chunk: int = 0

    @nn.compact
    def __call__(self, input_ids, positions, segment_ids, caches=None):
        cfg = self.config
        embed = Embed(cfg.vocab_size, cfg.hidden_size, self.param_dtype, name="embed_tokens")()
        x = jnp.take(embed, input_ids, axis=0).astype(self.dtype)  # (B, S, d)
        if cfg.gemma:  # sqrt(hidden), rounded to the compute dtype as transformers does
            x = x * jnp.asarray(cfg.hidden_size**0.5, jnp.float32).astype(self.dtype)
        layers = Layers(
            cfg,
            self.remat,
            self.param_dtype,
            self.attn_impl,
            self.runs,
            mlp_chunk=self.mlp_chunk,
            name="layers",
        )
        x, caches = layers(x, positions, segment_ids, caches)
        x = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.param_dtype, cfg.gemma, name="norm")(x)
        return x, embed, caches


def inner_fields(lm: nn.Module) -> tuple:
    """A causal LM module's fields that its inner model (the embedding, layers and final
    norm: ``LlamaModel``, ``FalconModel``) takes, in that model's order."""
    return (lm.config, lm.dtype, lm.param_dtype, lm.remat, lm.attn_impl, lm.runs, lm.mlp_chunk)


class LlamaForCausalLM(nn.Module):
    """``input_ids [B, S] -> logits [B, S, vocab]`` (and the updated KV caches when decoding).

    ``positions [B, S]`` are RoPE positions; ``segment_ids [B, S]`` (0 = padding) restrict
    attention to tokens of the same segment, which serves padding masks and packed batches alike.
    ``attn_impl`` names the attention implementation (static; chosen by whoever builds the step
    for its target: see :func:`jaxlora.models.attention.attention`); decoding is always eager.
    ``runs`` scans the layers over stacked parameters (see :class:`Layers`); ``mlp_chunk``
    runs every layer's MLP a tile of tokens at a time (:func:`tiled_mlp`).
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attn_impl: str = "eager"
    runs: tuple[tuple[int, int], ...] | None = None
    mlp_chunk: int = 0

    @nn.compact
    def __call__(self, input_ids, positions, segment_ids, caches=None, return_hidden=False):
        cfg = self.config
        h, embed_w, caches = LlamaModel(*inner_fields(self), name="model")(
            input_ids, positions, segment_ids, caches
        )
        if return_hidden:
            return h, caches
        if cfg.tie_word_embeddings:
            logits = dense(h, embed_w)
        else:
            logits = Linear(
                cfg.vocab_size, cfg.hidden_size, False, self.param_dtype, name="lm_head"
            )(h)
        if cfg.final_logit_softcapping is not None:
            logits = softcap(logits, cfg.final_logit_softcapping)
        return logits, caches


def init_params(config: LlamaConfig, key: jax.Array, param_dtype=jnp.float32) -> dict:
    """Random parameters (normal(0, 0.02) weights, unit norms, zero biases) in the HF layout."""
    module = LlamaForCausalLM(config, param_dtype=param_dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    return module.init({"params": key}, ids, ids, ids + 1)["params"]


def param_shapes(config: LlamaConfig, param_dtype=jnp.float32) -> dict:
    """The expected parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    return jax.eval_shape(lambda k: init_params(config, k, param_dtype), jax.random.key(0))
