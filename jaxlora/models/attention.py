"""Eager (materialized-scores) attention and the SwiGLU gate, each with a hand-written backward.

Both compute exactly what ``transformers``' eager path computes: ``softmax(q·kᵀ·scale, masked to
the float32 minimum) · v`` with the softmax in float32, and ``silu(gate) · up``. The custom VJPs
exist for speed. Autodiff of the attention composition makes about ten passes over the
``[B, heads, S, S]`` scores (scale, select, max, exp, sum, divide forward; the transposes of each
backward), most of them memory-bound. The backward here is the one flash attention uses on
materialized probabilities, ``dS = P ⊙ (dP − rowsum(dO ⊙ O))``, which is one pass once ``dP`` is
there (measured in tools/bench_train.py: see docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min  # transformers' additive mask value (float32 softmax)


def _probs(q, k, mask, scale):
    # q (B, KV, G, S, D), k (B, KV, T, D), mask (B, 1, 1, S, T) -> float32 (B, KV, G, S, T)
    s = jnp.einsum("bkgsd,bktd->bkgst", q, k).astype(jnp.float32) * scale
    s = jnp.where(mask, s, _NEG)
    s = s - jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s)
    return e / jnp.sum(e, axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention, heads first: ``q (B, KV, G, S, D)``, ``k, v (B, KV, T, D)`` ->
    ``(B, KV, G, S, D)``, where ``G`` query heads share each of the ``KV`` key/value heads.

    ``mask`` is boolean, broadcastable to ``(B, KV, G, S, T)``; a fully masked row (padding)
    attends uniformly, as ``transformers``' eager attention does with its additive minimum.
    Scores and softmax are float32; the products run in ``v.dtype``.
    """
    p = _probs(q, k, mask, scale)
    return jnp.einsum("bkgst,bktd->bkgsd", p.astype(v.dtype), v)


def _attend_fwd(q, k, v, mask, scale):
    p = _probs(q, k, mask, scale)
    o = jnp.einsum("bkgst,bktd->bkgsd", p.astype(v.dtype), v)
    return o, (q, k, v, mask, p, o)


def _attend_bwd(scale, res, do):
    q, k, v, mask, p, o = res
    # dv and dk contract over the query rows; computing them transposed (…dt) lets the big
    # (S, T) operand stay in its stored layout and moves only the small (S, D) one.
    dv = jnp.einsum("bkgsd,bkgst->bkdt", do, p.astype(v.dtype)).swapaxes(-1, -2)
    dp = jnp.einsum("bkgsd,bktd->bkgst", do, v).astype(jnp.float32)
    # rowsum(P ⊙ dP) = rowsum(dO ⊙ O): a pass over (B, H, S, D) instead of the scores
    delta = jnp.einsum("bkgsd,bkgsd->bkgs", do.astype(jnp.float32), o.astype(jnp.float32))
    ds = jnp.where(mask, p * (dp - delta[..., None]), 0.0) * scale  # masked scores get no grad
    ds = ds.astype(q.dtype)
    dq = jnp.einsum("bkgst,bktd->bkgsd", ds, k)
    dk = jnp.einsum("bkgsd,bkgst->bkdt", q, ds).swapaxes(-1, -2)
    return dq, dk, dv, None


attend.defvjp(_attend_fwd, _attend_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) · up`` (Llama's MLP activation), in the inputs' dtype."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return jax.nn.silu(gate) * up, (gate, up)


def _swiglu_bwd(res, dy):
    gate, up = res
    # σ(g) = (1 + tanh(g/2)) / 2: written differently from the forward's sigmoid on purpose, so
    # XLA does not merge the two and store σ(g) between the passes (each pass is then one loop).
    sig = 0.5 + 0.5 * jnp.tanh(0.5 * gate)
    silu = gate * sig
    # d silu / dg = σ(g) · (1 + g · (1 − σ(g)))
    return dy * up * sig * (1 + gate * (1 - sig)), dy * silu


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
