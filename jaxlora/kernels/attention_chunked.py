"""Flash attention in plain JAX: online softmax over key blocks, memory linear in the length.

The same algorithm as FlashAttention-2 (Dao 2023, arXiv:2307.08691, Algorithms 1 and 2), written
with a ``lax.fori_loop`` over block pairs so it runs on any backend (it is the CPU path; TPU and
GPU have real kernels).
The forward keeps, per query row, a running maximum ``m``, normaliser ``l`` and unnormalised
output; the backward recomputes each block's probabilities from the stored logsumexp
``lse = m + log l`` and uses ``dS = P ⊙ (dP − rowsum(dO ⊙ O))``. Nothing ``[S, T]``-sized is ever
stored: the residuals are q, k, v, the output and ``lse``.

Blocks: the sequence is cut into ``block_q`` query rows × ``block_kv`` key columns. Which
(query block, key block) pairs can hold an allowed entry follows first from causality and the
sliding window, so that list is built in numpy at trace time: a causal mask visits about half
the blocks, a window only a band. Segments (packing, padding) are data: each token's segment
spans from its first to its last position (:func:`segment_spans`), so a query block can only see
keys from its first document's start to its last document's end, and pairs outside that range
(for every row of the batch) are dropped from the list at run time; one loop walks what is left.
A row of short packed documents then costs a band along the diagonal. Inside each block the
segment mask is applied token by token.

Masked scores get float32's minimum, as in eager attention, so a row masked in one block and
not in a later one comes out exactly as eager's. A query row whose segment id is 0 (padding)
has no allowed key; its output is defined as 0 (see :func:`jaxlora.models.attention.attention`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NEG = float(jnp.finfo(jnp.float32).min)


def block_pairs(
    n_q: int, n_kv: int, bq: int, bkv: int, causal: bool, window: int | None
) -> np.ndarray:
    """``int32 [pairs, 2]``: (query block, key block) pairs with at least one entry allowed by
    causality and the window (``k <= q`` and ``k > q - window``), ordered by query block."""
    qi, kj = np.meshgrid(np.arange(n_q), np.arange(n_kv), indexing="ij")
    keep = np.ones_like(qi, bool)
    if causal:
        keep &= kj * bkv <= (qi + 1) * bq - 1  # first key <= last query
    if window is not None:
        keep &= (kj + 1) * bkv - 1 > qi * bq - window  # last key > first query - window
    return np.stack([qi[keep], kj[keep]], axis=-1).astype(np.int32)


def segment_spans(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For each token of ``segment_ids (B, S)``, the first and the last position of its segment
    (``(B, S)`` int32 each). Exact for any layout (a segment need not be one run of tokens):
    positions are sorted by id, stably, each id's run read off, and the result put back."""
    B, S = segment_ids.shape
    order = jnp.argsort(segment_ids, axis=1, stable=True)  # each id's positions, ascending
    ids = jnp.take_along_axis(segment_ids, order, axis=1)
    change = ids[:, 1:] != ids[:, :-1]
    edge = jnp.ones((B, 1), bool)
    at = jnp.arange(S, dtype=jnp.int32)
    start = lax.cummax(jnp.where(jnp.concatenate([edge, change], 1), at, 0), axis=1)
    end = lax.cummin(jnp.where(jnp.concatenate([change, edge], 1), at, S - 1), 1, reverse=True)
    rows = jnp.arange(B)[:, None]
    back = lambda sorted_: jnp.zeros_like(order).at[rows, order].set(sorted_)
    first = back(jnp.take_along_axis(order, start, axis=1))
    last = back(jnp.take_along_axis(order, end, axis=1))
    return first.astype(jnp.int32), last.astype(jnp.int32)


def document_range(seg, first, last):
    """The first and last position (over the last axis) of the documents the real tokens of
    ``seg`` belong to (``first``/``last``: :func:`segment_spans` of the same tokens). Tokens of
    padding alone give an empty range (int32's maximum, -1). Plain jnp: the Pallas GPU kernels
    call it on one tile's ids, :func:`live_pairs` on every block's at once."""
    real = seg != 0
    lo = jnp.min(jnp.where(real, first, jnp.iinfo(jnp.int32).max), axis=-1)
    return lo, jnp.max(jnp.where(real, last, -1), axis=-1)


def live_pairs(pairs: np.ndarray, seg: jax.Array, bq: int, bkv: int):
    """The ``pairs`` (from :func:`block_pairs`) whose key block meets, in some row of ``seg``,
    the documents of the query block's real tokens: ``(order, count)``, ``pairs[order[:count]]``
    being those, in their order (the rest follow, never visited)."""
    B, S = seg.shape
    blocks = lambda x: x.reshape(B, S // bq, bq)
    lo, hi = document_range(*map(blocks, (seg, *segment_spans(seg))))  # (B, query blocks)
    i, j = pairs[:, 0], pairs[:, 1]
    live = jnp.any((lo[:, i] <= (j + 1) * bkv - 1) & (hi[:, i] >= j * bkv), axis=0)
    order = jnp.argsort(~live, stable=True).astype(jnp.int32)
    return order, jnp.sum(live, dtype=jnp.int32)


def _walk(step, init, pairs: np.ndarray, live):
    """``step(carry, (i, j))`` over the live pairs (``live``: :func:`live_pairs`), in order."""
    order, count = live
    table = jnp.asarray(pairs)
    return lax.fori_loop(0, count, lambda t, carry: step(carry, table[order[t]]), init)


def _block_mask(i, j, seg, bq, bkv, causal, window):
    """Boolean ``(B, 1, 1, bq, bkv)`` for query block ``i`` and key block ``j``."""
    qs = lax.dynamic_slice_in_dim(seg, i * bq, bq, axis=1)  # (B, bq)
    ks = lax.dynamic_slice_in_dim(seg, j * bkv, bkv, axis=1)  # (B, bkv)
    ok = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)  # (B, bq, bkv)
    q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)
    k_idx = j * bkv + lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)
    if causal:
        ok &= k_idx <= q_idx
    if window is not None:
        ok &= k_idx > q_idx - window
    return ok[:, None, None]


def _scores(q_blk, k_blk, mask, scale, cap):
    # q (B, KV, G, bq, D), k (B, KV, bkv, D) -> float32 (B, KV, G, bq, bkv), masked;
    # soft-capped (c · tanh(s / c), Gemma 2) before the mask when cap is set
    s = jnp.einsum("bkgqd,bktd->bkgqt", q_blk, k_blk, preferred_element_type=jnp.float32)
    s = s * scale
    if cap is not None:
        s = cap * jnp.tanh(s / cap)
    return jnp.where(mask, s, _NEG)


def _add_at(acc, x, start, axis):
    """``acc[..., start : start + n, ...] += x`` along ``axis`` (in place inside the loop)."""
    old = lax.dynamic_slice_in_dim(acc, start, x.shape[axis], axis)
    return lax.dynamic_update_slice_in_dim(acc, old + x, start, axis)


def _forward(q, k, v, seg, causal, window, scale, bq, bkv, cap):
    """Returns ``o (B, KV, G, S, D)`` in ``q.dtype``, ``lse (B, KV, G, S)`` float32 and the
    live block pairs walked (:func:`live_pairs`; the backward walks the same)."""
    B, KV, G, S, D = q.shape
    pairs = block_pairs(S // bq, k.shape[2] // bkv, bq, bkv, causal, window)
    live = live_pairs(pairs, seg, bq, bkv)

    def step(carry, ij):
        acc, m, den = carry
        i, j = ij[0], ij[1]
        q_blk = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)
        k_blk = lax.dynamic_slice_in_dim(k, j * bkv, bkv, axis=2)
        v_blk = lax.dynamic_slice_in_dim(v, j * bkv, bkv, axis=2)
        mask = _block_mask(i, j, seg, bq, bkv, causal, window)
        s = _scores(q_blk, k_blk, mask, scale, cap)
        m_prev = lax.dynamic_slice_in_dim(m, i * bq, bq, axis=3)
        d_prev = lax.dynamic_slice_in_dim(den, i * bq, bq, axis=3)
        a_prev = lax.dynamic_slice_in_dim(acc, i * bq, bq, axis=3)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m_prev - m_new)
        pv = jnp.einsum(
            "bkgqt,bktd->bkgqd", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32
        )
        acc = lax.dynamic_update_slice_in_dim(acc, alpha[..., None] * a_prev + pv, i * bq, axis=3)
        m = lax.dynamic_update_slice_in_dim(m, m_new, i * bq, axis=3)
        den = lax.dynamic_update_slice_in_dim(den, alpha * d_prev + jnp.sum(p, -1), i * bq, axis=3)
        return acc, m, den

    init = (
        jnp.zeros((B, KV, G, S, v.shape[-1]), jnp.float32),
        jnp.full((B, KV, G, S), _NEG, jnp.float32),
        jnp.zeros((B, KV, G, S), jnp.float32),
    )
    acc, m, den = _walk(step, init, pairs, live)
    # A query block with a real token meets its diagonal block, so den >= 1 on its rows; a block
    # of padding alone visits nothing (den 0): its rows output 0, and no backward block reads
    # their lse.
    seen = den > 0
    valid = (seg != 0)[:, None, None, :, None]
    o = jnp.where(valid, acc / jnp.where(seen, den, 1)[..., None], 0.0).astype(q.dtype)
    return o, jnp.where(seen, m + jnp.log(jnp.where(seen, den, 1)), 0.0), live


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _flash(q, k, v, seg, causal, window, scale, bq, bkv, cap):
    return _forward(q, k, v, seg, causal, window, scale, bq, bkv, cap)[0]


def _flash_fwd(q, k, v, seg, causal, window, scale, bq, bkv, cap):
    o, lse, live = _forward(q, k, v, seg, causal, window, scale, bq, bkv, cap)
    return o, (q, k, v, seg, o, lse, live)


def _flash_bwd(causal, window, scale, bq, bkv, cap, res, do):
    q, k, v, seg, o, lse, live = res
    pairs = block_pairs(q.shape[3] // bq, k.shape[2] // bkv, bq, bkv, causal, window)
    do = jnp.where((seg != 0)[:, None, None, :, None], do, 0)  # padding rows are constant 0
    # rowsum(P ⊙ dP) = rowsum(dO ⊙ O), once for all blocks
    delta = jnp.einsum("bkgsd,bkgsd->bkgs", do.astype(jnp.float32), o.astype(jnp.float32))

    def step(carry, ij):
        dq, dk, dv = carry
        i, j = ij[0], ij[1]
        q_blk = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)
        do_blk = lax.dynamic_slice_in_dim(do, i * bq, bq, axis=3)
        k_blk = lax.dynamic_slice_in_dim(k, j * bkv, bkv, axis=2)
        v_blk = lax.dynamic_slice_in_dim(v, j * bkv, bkv, axis=2)
        mask = _block_mask(i, j, seg, bq, bkv, causal, window)
        s = _scores(q_blk, k_blk, mask, scale, cap)
        lse_blk = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
        p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)  # (B, KV, G, bq, bkv)
        dp = jnp.einsum("bkgqd,bktd->bkgqt", do_blk, v_blk, preferred_element_type=jnp.float32)
        d_blk = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
        ds = p * (dp - d_blk[..., None]) * scale
        if cap is not None:  # d(c·tanh(s/c))/ds = 1 − (capped / c)²; masked entries have p = 0
            ds = ds * (1.0 - jnp.square(jnp.where(mask, s / cap, 0.0)))
        ds = ds.astype(q.dtype)
        f32 = jnp.float32
        dv_j = jnp.einsum(
            "bkgqt,bkgqd->bktd", p.astype(v.dtype), do_blk, preferred_element_type=f32
        )
        dk_j = jnp.einsum("bkgqt,bkgqd->bktd", ds, q_blk, preferred_element_type=f32)
        dq_i = jnp.einsum("bkgqt,bktd->bkgqd", ds, k_blk, preferred_element_type=f32)
        dq = _add_at(dq, dq_i, i * bq, axis=3)
        return dq, _add_at(dk, dk_j, j * bkv, axis=2), _add_at(dv, dv_j, j * bkv, axis=2)

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.zeros(k.shape, jnp.float32),
        jnp.zeros(v.shape, jnp.float32),
    )
    dq, dk, dv = _walk(step, init, pairs, live)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_sequence(q, k, v, segment_ids, multiple: int):
    """Pads ``q (B, KV, G, S, D)``, ``k, v (B, KV, S, D)`` and ``segment_ids (B, S)`` along S to
    a multiple of ``multiple``; the new tokens are padding (segment 0), which no real token sees."""
    extra = _round_up(q.shape[3], multiple) - q.shape[3]
    if extra == 0:
        return q, k, v, segment_ids
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
    return pad(q, 3), pad(k, 2), pad(v, 2), pad(segment_ids, 1)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    block_q: int = 256,
    block_kv: int = 256,
) -> jax.Array:
    """Self-attention ``q (B, KV, G, S, D)``, ``k, v (B, KV, S, D)`` -> ``(B, KV, G, S, D)``.

    Query ``i`` sees key ``j`` when ``j <= i`` (causal), ``j > i - sliding_window`` and both carry
    the same non-zero segment id (``[B, S]``, 0 = padding). Rows of segment 0 output 0.
    ``softcap``: scores soft-capped to ``c · tanh(s / c)`` before the mask (Gemma 2). Lengths
    need not divide the blocks: they are padded (segment 0) to a block multiple and cut back.
    Probabilities are float32, products in the inputs' dtype with float32 accumulation.

    256 × 256 blocks are fastest on CPU since the walk skips other documents' blocks (2 cores,
    head_dim 64, the train step at S = 2048: 25 % less wall time than 128 × 128 for one
    document a row, 7-10 % for 3 or 8; 512 × 512 and mixed 256/128 slower; docs/attention.md).
    """
    S = q.shape[3]
    bq, bkv = min(block_q, _round_up(S, 8)), min(block_kv, _round_up(S, 8))
    q, k, v, seg = pad_sequence(q, k, v, segment_ids, int(np.lcm(bq, bkv)))
    out = _flash(q, k, v, seg, causal, sliding_window, scale, bq, bkv, softcap)
    return out[:, :, :, :S]
