"""Attention, and the SwiGLU gate.

:func:`attention` is the model's one self-attention entry point. Its caller names the
implementation: eager (:func:`attend`, below) or a flash kernel from ``jaxlora.kernels``, whose
memory is linear in the length (docs/attention.md).

Eager attention is the parity reference: it computes exactly what ``transformers``' eager path
computes, ``softmax(q·kᵀ·scale, masked to the float32 minimum) · v`` with the softmax in float32;
:func:`swiglu` computes ``silu(gate) · up``. Both have hand-written backwards, for speed.
Autodiff of the attention composition makes about ten passes over the ``[B, heads, S, S]``
scores (scale, select, max, exp, sum, divide forward; the transposes of each backward), most of
them memory-bound. The backward here is the one flash attention uses on materialized
probabilities, ``dS = P ⊙ (dP − rowsum(dO ⊙ O))``, which is one pass once ``dP`` is there
(measured in tools/bench_train.py: see docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxlora.kernels import attention_sharded
from jaxlora.kernels.attention_chunked import chunked_attention
from jaxlora.kernels.attention_gpu import cudnn_attention, pallas_gpu_attention
from jaxlora.kernels.attention_splash import splash_attention

_NEG = jnp.finfo(jnp.float32).min  # transformers' additive mask value (float32 softmax)


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """``cap · tanh(x / cap)``: Gemma 2's soft-capping of attention scores and output logits,
    which bounds them to ``(−cap, cap)`` smoothly."""
    return cap * jnp.tanh(x / cap)


def _scores(q, k, scale, cap):
    # q (B, KV, G, S, D), k (B, KV, T, D) -> float32 (B, KV, G, S, T), soft-capped if cap
    s = jnp.einsum("bkgsd,bktd->bkgst", q, k).astype(jnp.float32) * scale
    return s if cap is None else softcap(s, cap)


def _probs(q, k, mask, scale, cap=None):
    # q (B, KV, G, S, D), k (B, KV, T, D), mask (B, 1, 1, S, T) -> float32 (B, KV, G, S, T)
    s = jnp.where(mask, _scores(q, k, scale, cap), _NEG)  # capped first, as transformers does
    s = s - jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s)
    return e / jnp.sum(e, axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    cap: float | None = None,
) -> jax.Array:
    """Grouped-query attention, heads first: ``q (B, KV, G, S, D)``, ``k, v (B, KV, T, D)`` ->
    ``(B, KV, G, S, D)``, where ``G`` query heads share each of the ``KV`` key/value heads.
    ``cap``: scores soft-capped to ``cap · tanh(s / cap)`` before the mask (Gemma 2).

    ``mask`` is boolean, broadcastable to ``(B, KV, G, S, T)``; a fully masked row (padding)
    attends uniformly, as ``transformers``' eager attention does with its additive minimum.
    Scores and softmax are float32; the products run in ``v.dtype``.
    """
    p = _probs(q, k, mask, scale, cap)
    return jnp.einsum("bkgst,bktd->bkgsd", p.astype(v.dtype), v)


def _attend_fwd(q, k, v, mask, scale, cap):
    p = _probs(q, k, mask, scale, cap)
    o = jnp.einsum("bkgst,bktd->bkgsd", p.astype(v.dtype), v)
    return o, (q, k, v, mask, p, o)


def _attend_bwd(scale, cap, res, do):
    q, k, v, mask, p, o = res
    # dv and dk contract over the query rows; computing them transposed (…dt) lets the big
    # (S, T) operand stay in its stored layout and moves only the small (S, D) one.
    dv = jnp.einsum("bkgsd,bkgst->bkdt", do, p.astype(v.dtype)).swapaxes(-1, -2)
    dp = jnp.einsum("bkgsd,bktd->bkgst", do, v).astype(jnp.float32)
    # rowsum(P ⊙ dP) = rowsum(dO ⊙ O): a pass over (B, H, S, D) instead of the scores
    delta = jnp.einsum("bkgsd,bkgsd->bkgs", do.astype(jnp.float32), o.astype(jnp.float32))
    ds = jnp.where(mask, p * (dp - delta[..., None]), 0.0)  # masked scores get no grad
    if cap is not None:  # d(c·tanh(s/c))/ds = 1 − tanh²(s/c), recomputed rather than stored
        ds = ds * (1.0 - jnp.square(_scores(q, k, scale, cap) / cap))
    ds = ds * scale
    ds = ds.astype(q.dtype)
    dq = jnp.einsum("bkgst,bktd->bkgsd", ds, k)
    dk = jnp.einsum("bkgsd,bkgst->bkdt", q, ds).swapaxes(-1, -2)
    return dq, dk, dv, None


attend.defvjp(_attend_fwd, _attend_bwd)


def attention_mask(
    q_slots: jax.Array,
    k_slots: jax.Array,
    q_segments: jax.Array,
    k_segments: jax.Array,
    window: int | None,
    causal: bool = True,
) -> jax.Array:
    """Boolean ``[B, 1, 1, Sq, Sk]``: causal, same non-zero segment, inside the sliding window.

    Slots are absolute token indices (``[Sq]`` and ``[Sk]``), segments ``[B, Sq]``/``[B, Sk]``
    (0 = padding). Packed examples get distinct segment ids, so they never see each other.
    """
    allowed = jnp.ones((q_slots.shape[0], k_slots.shape[0]), bool)  # (Sq, Sk)
    if causal:
        allowed &= k_slots[None, :] <= q_slots[:, None]
    if window is not None:  # transformers: kv_idx > q_idx - sliding_window
        allowed &= k_slots[None, :] > q_slots[:, None] - window
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    return (allowed[None] & same)[:, None, None]  # (B, 1, 1, Sq, Sk)


IMPLS = ("eager", "chunked", *attention_sharded.KERNELS)


@dataclass(frozen=True)
class AttentionImpl:
    """An implementation (``name``, one of :data:`IMPLS`) and where it runs: Pallas
    ``interpret`` mode, and for a sharded program the mesh, on which a kernel
    (``attention_sharded.KERNELS``) runs inside ``shard_map`` on each device's rows and heads
    (``jaxlora.kernels.attention_sharded``). Static data of the model, like a bare name."""

    name: str = "eager"
    interpret: bool = False
    mesh: attention_sharded.AttentionMesh | None = None


def impl_name(impl: str | AttentionImpl) -> str:
    """The implementation's name, checked against :data:`IMPLS`."""
    name = impl.name if isinstance(impl, AttentionImpl) else impl
    if name not in IMPLS:
        raise ValueError(f"attention impl (attn_impl) must be one of {IMPLS}, got {name!r}")
    return name


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    impl: str | AttentionImpl = "eager",
    interpret: bool = False,
) -> jax.Array:
    """Self-attention over one sequence per row, heads first: ``q (B, KV, G, S, D)``,
    ``k, v (B, KV, S, D)`` -> ``(B, KV, G, S, D)``, query heads ``kv * G + g`` sharing kv head
    ``kv``. Token ``i`` attends to token ``j`` when ``j <= i`` (``causal``),
    ``j > i - sliding_window`` and ``segment_ids [B, S]`` give both the same non-zero id
    (0 = padding; packed documents have distinct ids).

    ``impl`` is chosen by the caller from the compile target, never from the process's backend
    (a name, or an :class:`AttentionImpl` that also says where it runs):

    * ``"eager"``: materialized float32 scores (:func:`attend`), any backend; the reference.
    * ``"chunked"``: flash attention in plain JAX (online softmax over key blocks, backward
      recomputing them), any backend, memory linear in ``S``; the CPU alternative to eager.
    * ``"splash"``: Pallas splash attention, TPU.
    * ``"cudnn"``: cuDNN flash attention, GPU; rows must be unpacked (one sequence, right-padded).
    * ``"pallas_gpu"``: jaxlora's Pallas (Triton) flash attention, GPU; every mask.

    ``softcap`` (Gemma 2) soft-caps the scores, ``c · tanh(s / c)``, after the scale and before
    the mask: eager, chunked, splash and Pallas GPU do; cuDNN cannot and refuses it
    (``jaxlora.weights.dispatch.attention_for`` picks Pallas GPU for such models).

    ``interpret`` runs the Pallas kernels (splash, pallas_gpu) in interpret mode (tests on CPU).
    With an :class:`AttentionImpl` on a mesh of several devices, the kernels run inside
    ``shard_map`` (batch rows over the batch axes, heads over the head axis); eager and chunked
    are plain JAX, which XLA partitions.

    Padding rows (segment 0) have no key to attend to. Eager gives them the uniform average
    over all keys, as ``transformers``' eager attention does; the flash implementations output
    0 there (and pass no gradient through them). Either way no real token attends to a padding
    token, so outputs at real tokens, and every gradient of a loss that masks padding, are the
    same for all implementations.
    """
    run = impl if isinstance(impl, AttentionImpl) else AttentionImpl(impl)
    name = impl_name(run)
    if sliding_window is not None and not causal:
        raise ValueError("a sliding window needs causal attention")
    if k.shape[2] != q.shape[3]:
        raise ValueError(f"self-attention: {q.shape[3]} queries but {k.shape[2]} keys")
    kw = dict(scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap)
    if name == "eager":
        slots = jnp.arange(q.shape[3])
        mask = attention_mask(slots, slots, segment_ids, segment_ids, sliding_window, causal)
        return attend(q, k, v, mask, scale, softcap)
    if name == "chunked":
        return chunked_attention(q, k, v, segment_ids, **kw)
    interpret = interpret or run.interpret
    if name == "splash":
        kernel = functools.partial(splash_attention, **kw, interpret=interpret)
    elif name == "cudnn":
        kernel = functools.partial(cudnn_attention, **kw)
    else:
        kernel = functools.partial(pallas_gpu_attention, **kw, interpret=interpret)
    if run.mesh is None or run.mesh.mesh.size == 1:
        return kernel(q, k, v, segment_ids)
    return attention_sharded.sharded(kernel, q, k, v, segment_ids, run.mesh)


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


def geglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``gelu_tanh(gate) · up`` (Gemma's MLP activation, ``gelu_pytorch_tanh``), in the inputs'
    dtype, differentiated by autodiff."""
    return jax.nn.gelu(gate, approximate=True) * up
