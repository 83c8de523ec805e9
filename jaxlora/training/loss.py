"""Next-token cross-entropy over chunks of tokens, so ``[tokens, vocab]`` float32 logits never
exist at once (Llama 3: 128,256 × 8,192 tokens × 4 bytes = 4 GiB, twice with its gradient),
and only for the tokens that carry loss.

Each chunk's logits are formed from the final hidden states through the head
(:func:`jaxlora.weights.dense`, so a plain, NF4 or LoRA-wrapped head works alike), reduced to
the chunk's loss and differentiated on the spot: the forward pass does the backward's work, as
Liger-Kernel's fused linear cross-entropy does (Hsu et al. 2024, arXiv:2410.10989). The step
then runs the same matmuls as the unchunked loss (two against the head when it is frozen, three
when it trains) instead of recomputing the logits in the backward pass as a checkpointed scan
would, and keeps ``[tokens, hidden]`` and the head's gradient, never ``[tokens, vocab]``.
Which of the head's leaves get a gradient is read from ``jax.custom_vjp``'s symbolic zeros
(``perturbed``): a frozen head's ``[vocab, hidden]`` gradient is never formed.

Tokens whose loss mask is 0 (a prompt under ``data.train_on_inputs: false``, padding) add
nothing, so they skip the head: each row's loss-carrying tokens are first gathered to the
front of the row, in order (a per-row gather: rows sharded over devices stay where they are),
the chunks walk the rows' positions, and every chunk past the longest row's count of loss
tokens is skipped (``lax.cond``: not computed, on every backend). The chunk that count ends
inside is walked in quarters, each skipped alike, so the work stops within a quarter chunk of
the last loss token while full chunks keep their size (each chunk reads the whole head twice:
small chunks everywhere would cost that many more reads). ``dL/dh`` goes back to the tokens'
own positions, 0 where the mask is. In supervised fine-tuning most tokens are prompt, so most
of the head's work is gone; with every token trained nothing is skipped.
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
    """``Σ_t mask_t · CE(h_t · headᵀ, targets_t)`` in float32, ``chunk`` tokens at a time, over
    the tokens with ``mask_t ≠ 0`` only.

    ``h [B, S, hidden]`` (``B`` rows; ``[S, hidden]`` is one row; any float dtype: the logits
    are cast to float32 as the unchunked loss does), ``targets [B, S]`` int, ``mask [B, S]``
    float32. A chunk is ``chunk // B`` positions (at least 1) of every row, so at most
    ``max(chunk, B)`` tokens; ``S`` need not be a multiple: the last, shorter chunk is
    computed on its own (no padding). Chunks run over each row's loss tokens gathered to its
    front; those past the longest row's count are skipped, the one it ends inside is computed
    in quarters up to it. ``rng`` is the head's LoRA-dropout key (``None``: deterministic);
    each chunk folds in its index (and each quarter its own), so chunks draw independent
    masks. ``softcap`` (Gemma 2's ``final_logit_softcapping``): the logits are
    ``c · tanh(logits / c)``, as the model's own output is.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    if h.ndim not in (2, 3) or targets.shape != h.shape[:-1] or mask.shape != targets.shape:
        raise ValueError(
            "chunked_ce_sum takes h [B, S, hidden] (or [S, hidden]) with targets and mask of "
            f"its leading shape; got h {h.shape}, targets {targets.shape}, mask {mask.shape}"
        )
    leaves, treedef = jax.tree.flatten(head)
    return _fused_ce(chunk, treedef, softcap, h, leaves, targets, mask, rng)


def _ce(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ mask · (logsumexp(logits) − logits[target])`` for float32 ``logits [n, vocab]``."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.sum((lse - picked) * mask)


def _chunk_loss(treedef, softcap, h, leaves, targets, mask, key):
    """The loss of one chunk: ``h [B, w, hidden]``, ``targets`` and ``mask [B, w]``."""
    h, targets, mask = h.reshape(-1, h.shape[-1]), targets.reshape(-1), mask.reshape(-1)
    logits = dense(h, jax.tree.unflatten(treedef, leaves), rng=key)
    if softcap is not None:  # in the logits' dtype, as the model's forward caps them
        logits = softcap * jnp.tanh(logits / softcap)
    return _ce(logits.astype(jnp.float32), targets, mask)


def _compact(mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For ``mask [B, S]``: ``(order, dest, longest)``. ``order [B, S]``: the stable
    permutation of each row that puts its loss tokens (``mask ≠ 0``) first, in order, then the
    rest, in order (``x[b, order[b, j]]`` is the row's ``j``-th after compaction); ``dest``: its
    inverse (where each token went); ``longest``: the most loss tokens in any row."""
    keep = mask != 0
    count = jnp.sum(keep, axis=1, dtype=jnp.int32)  # [B]
    first = jnp.cumsum(keep, axis=1, dtype=jnp.int32) - 1
    rest = count[:, None] + jnp.cumsum(~keep, axis=1, dtype=jnp.int32) - 1
    dest = jnp.where(keep, first, rest)
    order = jnp.argsort(~keep, axis=1, stable=True).astype(jnp.int32)
    return order, dest, jnp.max(count)


def _rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x [B, S, ...]`` with each row permuted by ``index [B, S]``."""
    index = index.reshape(*index.shape, *(1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _split(width: int, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [B, S, ...]`` -> ``(full pieces [S // width, B, width, ...], tail [B, S % width,
    ...])``: piece ``i`` is positions ``[i·width, (i+1)·width)`` of every row."""
    n = x.shape[1] // width
    full = x[:, : n * width].reshape(x.shape[0], n, width, *x.shape[2:])
    return jnp.moveaxis(full, 1, 0), x[:, n * width :]


def _keys(rng, n: int):
    """One dropout key per piece (``n`` full pieces and the tail), or ``None`` for each."""
    if rng is None:
        return None, None
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n + 1))
    return keys[:n], keys[n]


_SUBCHUNKS = 4  # a chunk that the longest row's loss tokens end inside is walked in quarters


def _over_chunks(chunk, h, targets, mask, rng, fn, init):
    """``fn(carry, h_c, t_c, m_c, key) -> (carry, y_c)`` over chunks of each row's loss tokens
    gathered to its front (``chunk // B`` positions of every row a chunk). Returns ``(carry,
    y)``: ``y [B, S, ...]`` the chunks' ``y_c [B, w, ...]`` back at their tokens' own
    positions (zeros for skipped ones), or ``None`` when ``fn`` gives no ``y_c``. ``h [S,
    hidden]`` is one row (``y [S, ...]``)."""
    one_row = h.ndim == 2
    if one_row:
        h, targets, mask = h[None], targets[None], mask[None]
    width = max(1, chunk // h.shape[0])  # positions of every row per chunk
    order, dest, longest = _compact(mask)
    xs = tuple(_rows(x, order) for x in (h, targets, mask))
    widths = (width, max(1, width // _SUBCHUNKS))
    carry, y = _walk(fn, carry=init, xs=xs, key=rng, start=0, longest=longest, widths=widths)
    if y is None:
        return carry, None
    y = _rows(y, dest)  # back to the tokens' own positions
    return carry, y[0] if one_row else y


def _walk(fn, carry, xs, key, start, longest, widths):
    """``fn`` over ``xs`` (``[B, S, ...]`` arrays, positions from ``start``) in pieces of
    ``widths[0]`` positions (``lax.scan``, then the shorter tail): a piece that starts at or
    past ``longest`` is skipped (``lax.cond``; its ``y`` zeros), one that ends at or before it
    is computed whole, one that ``longest`` falls inside is walked again in pieces of
    ``widths[1]`` (whole where no finer width is left). Returns ``(carry, y [B, S, ...])``."""
    width, finer = widths[0], widths[1:]
    full, tail = zip(*(_split(width, x) for x in xs), strict=True)
    n = full[0].shape[0]
    keys, key_tail = _keys(key, n)

    def piece(carry, at, xs, key):
        w = xs[0].shape[1]

        def whole(carry):
            return fn(carry, *xs, key)

        def skip(carry):
            shapes = jax.eval_shape(fn, carry, *xs, key)[1]
            return carry, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        if not finer or w <= finer[0]:
            return jax.lax.cond(at < longest, whole, skip, carry)

        def across(carry):
            return _walk(fn, carry, xs, key, at, longest, finer)

        index = (at < longest).astype(jnp.int32) + (at + w <= longest).astype(jnp.int32)
        return jax.lax.switch(index, (skip, across, whole), carry)

    def body(carry, x):
        i, xs_i, key_i = x
        return piece(carry, start + i * width, xs_i, key_i)

    carry, ys = jax.lax.scan(body, carry, (jnp.arange(n), full, keys))
    if tail[0].shape[1]:
        carry, y_tail = piece(carry, start + n * width, tail, key_tail)
    if ys is None:
        return carry, None
    y = jnp.moveaxis(ys, 0, 1).reshape(ys.shape[1], n * width, *ys.shape[3:])
    if tail[0].shape[1]:
        y = jnp.concatenate([y, y_tail], axis=1)
    return carry, y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_ce(chunk, treedef, softcap, h, leaves, targets, mask, rng):
    def fn(total, h_c, t_c, m_c, k_c):
        return total + _chunk_loss(treedef, softcap, h_c, leaves, t_c, m_c, k_c), None

    total, _ = _over_chunks(chunk, h, targets, mask, rng, fn, jnp.float32(0))
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
    (total, dw), dh = _over_chunks(chunk, h, targets, mask, rng, fn, init)
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
