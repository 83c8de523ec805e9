"""Next-token cross-entropy over chunks of tokens, so ``[tokens, vocab]`` float32 logits never
exist at once (Llama 3: 128,256 × 8,192 tokens × 4 bytes = 4 GiB, twice with its gradient).

Each chunk's logits are formed from the final hidden states through the head
(:func:`jaxlora.weights.dense`, so a plain, NF4 or LoRA-wrapped head works alike), reduced to
the chunk's loss and differentiated on the spot: the forward pass does the backward's work, as
Liger-Kernel's fused linear cross-entropy does (Hsu et al. 2024, arXiv:2410.10989). The step
then runs the same matmuls as the unchunked loss (two against the head when it is frozen, three
when it trains) instead of recomputing the logits in the backward pass as a checkpointed scan
would, and keeps ``[tokens, hidden]`` and the head's gradient, never ``[tokens, vocab]``.
Which of the head's leaves get a gradient is read from ``jax.custom_vjp``'s symbolic zeros
(``perturbed``): a frozen head's ``[vocab, hidden]`` gradient is never formed.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxlora.models.registry import embedding
from jaxlora.weights import dense


def head_weight(config, params: dict) -> Any:
    """The ``[vocab, hidden]`` output head of a causal LM's parameter tree: the embedding when
    tied (``tie_word_embeddings``), else ``lm_head`` (either may be NF4 or LoRA-wrapped)."""
    if config.tie_word_embeddings:
        return embedding(config, params)
    return params["lm_head"]["weight"]


def chunked_ce_sum(
    h: jax.Array,
    head: Any,
    targets: jax.Array,
    mask: jax.Array,
    chunk: int,
    rng: jax.Array | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """``Σ_t mask_t · CE(h_t · headᵀ, targets_t)`` in float32, ``chunk`` tokens at a time.

    ``h [T, hidden]`` (any float dtype; the logits are cast to float32 as the unchunked loss
    does), ``targets [T]`` int, ``mask [T]`` float32. ``T`` need not be a multiple of
    ``chunk``: the last, shorter chunk is computed on its own (no padding). ``rng`` is the head's
    LoRA-dropout key (``None``: deterministic); each chunk folds in its index, so chunks draw
    independent masks. ``softcap`` (Gemma 2's ``final_logit_softcapping``): the logits are
    ``c · tanh(logits / c)``, as the model's own output is.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    leaves, treedef = jax.tree.flatten(head)
    return _fused_ce(chunk, treedef, softcap, h, leaves, targets, mask, rng)


def _ce(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ mask · (logsumexp(logits) − logits[target])`` for float32 ``logits [n, vocab]``."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.sum((lse - picked) * mask)


def _chunk_loss(treedef, softcap, h, leaves, targets, mask, key):
    logits = dense(h, jax.tree.unflatten(treedef, leaves), rng=key)
    if softcap is not None:  # in the logits' dtype, as the model's forward caps them
        logits = softcap * jnp.tanh(logits / softcap)
    return _ce(logits.astype(jnp.float32), targets, mask)


def _split(chunk: int, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [T, ...]`` -> ``(full chunks [T // chunk, chunk, ...], tail [T % chunk, ...])``."""
    n = x.shape[0] // chunk
    return x[: n * chunk].reshape(n, chunk, *x.shape[1:]), x[n * chunk :]


def _keys(rng, n: int):
    """One dropout key per chunk (``n`` full chunks and the tail), or ``None`` for each."""
    if rng is None:
        return None, None
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n + 1))
    return keys[:n], keys[n]


def _over_chunks(chunk, h, targets, mask, rng, fn, init):
    """``fn(carry, h_c, t_c, m_c, key) -> (carry, y_c)`` over the full chunks (``lax.scan``)
    then the tail; returns ``(carry, ys of the full chunks, y of the tail or None)``."""
    (hs, h_tail), (ts, t_tail), (ms, m_tail) = (_split(chunk, x) for x in (h, targets, mask))
    keys, key_tail = _keys(rng, hs.shape[0])

    def body(carry, xs):
        h_c, t_c, m_c, k_c = xs
        return fn(carry, h_c, t_c, m_c, k_c)

    carry, ys = jax.lax.scan(body, init, (hs, ts, ms, keys))
    y_tail = None
    if h_tail.shape[0]:
        carry, y_tail = fn(carry, h_tail, t_tail, m_tail, key_tail)
    return carry, ys, y_tail


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_ce(chunk, treedef, softcap, h, leaves, targets, mask, rng):
    def fn(total, h_c, t_c, m_c, k_c):
        return total + _chunk_loss(treedef, softcap, h_c, leaves, t_c, m_c, k_c), None

    total, _, _ = _over_chunks(chunk, h, targets, mask, rng, fn, jnp.float32(0))
    return total


def _fused_ce_fwd(chunk, treedef, softcap, h, leaves, targets, mask, rng):
    """Loss, ``dloss/dh`` and ``dloss/dleaf`` for each perturbed floating leaf, chunk by chunk;
    the leaves' gradients accumulate in float32."""
    values = [p.value for p in leaves]
    trained = [
        i
        for i, p in enumerate(leaves)
        if p.perturbed and jnp.issubdtype(p.value.dtype, jnp.floating)
    ]
    h, targets, mask = h.value, targets.value, mask.value
    rng = None if rng is None else rng.value

    def loss_of(h_c, w_trained, t_c, m_c, k_c):
        full = list(values)
        for i, w in zip(trained, w_trained, strict=True):
            full[i] = w
        return _chunk_loss(treedef, softcap, h_c, full, t_c, m_c, k_c)

    def fn(carry, h_c, t_c, m_c, k_c):
        total, dw = carry
        w_trained = [values[i] for i in trained]
        loss, vjp = jax.vjp(lambda a, b: loss_of(a, b, t_c, m_c, k_c), h_c, w_trained)
        dh_c, dw_c = vjp(jnp.float32(1))
        dw = [a + b.astype(jnp.float32) for a, b in zip(dw, dw_c, strict=True)]
        return (total + loss, dw), dh_c

    init = (jnp.float32(0), [jnp.zeros(values[i].shape, jnp.float32) for i in trained])
    (total, dw), dhs, dh_tail = _over_chunks(chunk, h, targets, mask, rng, fn, init)
    dh = dhs.reshape(-1, h.shape[-1])
    if dh_tail is not None:
        dh = jnp.concatenate([dh, dh_tail], axis=0)
    d_leaves = [None] * len(values)  # None: no gradient (frozen, or integer codes)
    for i, d in zip(trained, dw, strict=True):
        d_leaves[i] = d.astype(values[i].dtype)
    return total, (dh, d_leaves)


def _fused_ce_bwd(chunk, treedef, softcap, res, g):
    dh, d_leaves = res
    if isinstance(g, SymbolicZero):
        g = jnp.float32(0)
    scaled = [None if d is None else (g * d).astype(d.dtype) for d in d_leaves]
    return (g * dh).astype(dh.dtype), scaled, None, None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd, symbolic_zeros=True)
