"""GPU flash attention on the model's heads-first grouped-query layout.

Two kernels:

==============  ======  ==============  =========================  ======  ============
kernel          causal  sliding window  segments                   GQA     soft-capping
==============  ======  ==============  =========================  ======  ============
``cudnn``       yes     yes             one per row, right-padded  native  no
``pallas_gpu``  yes     yes             any (packing, padding)     native  yes
==============  ======  ==============  =========================  ======  ============

* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash
  attention (forward and backward kernels). Its public API masks padding only through
  per-row lengths (``query_seq_lengths``: the first ``n`` tokens are real), so a row must be one
  sequence followed by padding. Packed rows would need cuDNN's packed layout (segment offsets),
  which JAX exposes only privately and refuses to trace on a machine without a Hopper GPU (so it
  cannot be compiled ahead of time here); a boolean ``mask`` would be turned into a
  materialized ``[B, H, S, T]`` bias. Whether a batch is packed is data, not a shape, so the
  caller chooses: ``pallas_gpu`` for packed batches.
* ``pallas_gpu``: jaxlora's flash attention in Pallas with the Triton lowering (FlashAttention-2:
  an online softmax over key tiles in the forward, which keeps each row's log-sum-exp; a
  backward that recomputes the probabilities tile by tile in two kernels, one for ``dq`` over
  query tiles and one for ``dk, dv`` over key tiles). It reads ``q (B, KV, G, S, D)`` and
  ``k, v (B, KV, S, D)`` where they are: query head ``kv · G + g`` reads kv head ``kv``'s tiles
  (no repeated ``k, v``), and the ``dk, dv`` kernel sums the ``G`` query heads of its kv head
  itself. Tiles wholly above the diagonal or outside the window are never visited, nor, in a
  packed row, tiles outside the documents a tile's rows belong to: a query tile's loop runs
  over the keys from the first token of its first document to the last of its last
  (:func:`segment_spans`), so a row of short documents costs about one tile band along the
  diagonal instead of the whole causal triangle (FlashAttention's variable-length batches).

  It replaced ``jax.experimental.pallas.ops.gpu.attention.mha``, which JAX 0.11 deprecates
  (moved to the separate tokamax package), has no sliding window or soft-capping, and wants as
  many kv heads as query heads (a repeated ``(B, S, H, D)`` copy of ``k`` and ``v``).
  Its tiles and warps are that kernel's; the H200 run of docs/benchmarks.md was made with that
  kernel, before this one.

Both return ``(B, KV, G, S, D)`` with padding rows (segment 0) set to 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxlora.kernels.attention_chunked import document_range, pad_sequence, segment_spans


def _to_bshd(q: jax.Array) -> jax.Array:
    B, KV, G, S, D = q.shape  # head h = kv * G + g, the order jax.nn's GQA groups in
    return q.transpose(0, 3, 1, 2, 4).reshape(B, S, KV * G, D)


def _from_bshd(o: jax.Array, kv: int) -> jax.Array:
    B, S, H, D = o.shape
    return o.reshape(B, S, kv, H // kv, D).transpose(0, 2, 3, 1, 4)


def _zero_padding(out: jax.Array, q_segment_ids: jax.Array) -> jax.Array:
    return jnp.where((q_segment_ids != 0)[:, None, None, :, None], out, 0)


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    implementation: str = "cudnn",
) -> jax.Array:
    """cuDNN flash attention on ``q (B, KV, G, S, D)``, ``k, v (B, KV, S, D)``.

    Each row of ``segment_ids`` must be ``1 … 1 0 … 0`` (one sequence, right-padded): the
    segment ids only give each row's length. Packed rows: use :func:`pallas_gpu_attention`.
    ``implementation="xla"`` runs the same call through XLA (tests on CPU: cuDNN needs a GPU).
    cuDNN does not soft-cap scores (Gemma 2): refused rather than computing another model.
    """
    if softcap is not None:
        raise NotImplementedError(
            f"cudnn attention has no logit soft-capping (attn_logit_softcapping={softcap}); "
            "use impl='pallas_gpu' (jaxlora.weights.kernels_for picks it for such models)"
        )
    kv = k.shape[1]
    lengths = jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(
        _to_bshd(q),
        k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3),
        scale=scale,
        is_causal=causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
        implementation=implementation,
    )
    return _zero_padding(_from_bshd(out, kv), segment_ids)


# Rows of a q, k or v tile by the bytes of one row (head_dim padded to a power of two, as Triton
# pads it, × the itemsize): the largest power of two whose forward and backward kernels compile
# for an L4 / RTX 4090 (99 KiB of shared memory a block, the least of jaxlora's GPU targets;
# tests/targets/test_aot.py). The forward kernel keeps q, k and v tiles and the [rows, rows]
# scores with Triton's pipelined copies, so the need grows faster than the row: float32 at
# head_dim 128 and 64 rows asks an L4 for 114,944 bytes; at 128 rows an H100 for 262,656.
TILE_ROWS = {128: 128, 256: 128, 512: 32, 1024: 16}
BACKWARD_ROWS = 32  # the backward kernels' q and k tiles (they hold five [rows, rows] products)
# Scores outside the mask: finite, so a tile with no visible key gives exp(0) = 1 rather than
# NaN, and far enough below any real score that the next visible tile's rescaling
# (exp2(m_old - m_new)) underflows it to exactly 0.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


def tile_rows(head_dim: int, dtype) -> int:
    """Rows of the kernel's tiles for ``head_dim`` at ``dtype`` (:data:`TILE_ROWS`)."""
    row = max(128, (1 << (head_dim - 1).bit_length()) * jnp.dtype(dtype).itemsize)
    if row not in TILE_ROWS:
        raise NotImplementedError(
            f"pallas_gpu attention: head_dim {head_dim} at {jnp.dtype(dtype).name} ({row} bytes "
            f"a row) has no tile size known to fit a GPU's shared memory (up to "
            f"{max(TILE_ROWS)} bytes); use impl='chunked'"
        )
    return TILE_ROWS[row]


@dataclasses.dataclass(frozen=True)
class _Flash:
    """What the kernels are compiled for (static: hashable)."""

    scale: float
    causal: bool
    window: int | None
    softcap: float | None
    block: int  # forward tiles, q and k
    block_bwd: int  # backward tiles, q and k
    interpret: bool
    exact: bool = False  # float32 products in full float32 (FMAs), not TF32 tensor-core passes

    def dot(self, a, b, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
        """A float32-accumulated tile product (float32 inputs: TF32 unless ``exact``)."""
        precision = lax.Precision.HIGHEST if self.exact else None
        return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)

    def scores(self, q, k, rows, cols, q_seg, kv_seg):
        """Base-2 scores ``log2(e) · cap(scale · q kᵀ)`` of a tile, masked; and the capped
        natural scores' ``tanh`` (the soft-cap's derivative needs it; None without a cap)."""
        s = self.dot(q, k, trans_b=True)
        t = None
        if self.softcap is None:
            s = s * (self.scale * LOG2E)
        else:
            t = jnp.tanh(s * (self.scale / self.softcap))
            s = t * (self.softcap * LOG2E)
        visible = (q_seg[:, None] == kv_seg[None, :]) & (kv_seg[None, :] != 0)
        if self.causal:
            visible &= cols[None, :] <= rows[:, None]
        if self.window is not None:
            visible &= cols[None, :] > rows[:, None] - self.window
        return jnp.where(visible, s, MASKED), t

    def key_tiles(self, first_row, rows: int, tile: int, n_tiles: int):
        """Key tiles ``[lo, hi)`` that rows ``first_row .. first_row + rows - 1`` can see."""
        hi = lax.div(first_row + rows + tile - 1, tile) if self.causal else n_tiles
        lo = 0
        if self.window is not None:
            lo = lax.div(lax.max(first_row - self.window + 1, 0), tile)
        return lo, hi

    def query_tiles(self, first_col, cols: int, tile: int, n_tiles: int):
        """Query tiles ``[lo, hi)`` that can see keys ``first_col .. first_col + cols - 1``."""
        lo = lax.div(first_col, tile) if self.causal else 0
        hi = n_tiles
        if self.window is not None:
            last_row = first_col + cols - 2 + self.window
            hi = lax.min(lax.div(last_row + tile, tile), n_tiles)
        return lo, hi

    @staticmethod
    def segment_tiles(seg, first, last, tile: int):
        """Tiles ``[lo, hi)`` (of ``tile`` tokens) that hold a token of a segment of the
        ``seg`` tokens (one tile's ids, ``first``/``last``: their segments' ends, from
        :func:`segment_spans`). Padding (segment 0) sees and is seen by nothing: a tile of
        padding alone gives an empty range."""
        lo, hi = document_range(seg, first, last)
        return lax.div(lo, tile), lax.div(hi + tile, tile)

    @staticmethod
    def bounds(causal, segments):
        """The loop over the tiles both ranges allow (empty when they do not meet)."""
        return lax.max(causal[0], segments[0]), lax.min(causal[1], segments[1])


def _forward_kernel(
    q_ref, k_ref, v_ref, seg_ref, first_ref, last_ref, o_ref, lse_ref, *, f: _Flash
):
    bq = bk = f.block
    S, D = k_ref.shape
    i = pl.program_id(0)
    rows = i * bq + jnp.arange(bq)
    q = q_ref[...]
    mine = pl.ds(i * bq, bq)
    q_seg = seg_ref[mine]

    def body(j, carry):
        o, m, total = carry
        at = pl.ds(j * bk, bk)
        s, _ = f.scores(q, k_ref[at, :], rows, j * bk + jnp.arange(bk), q_seg, seg_ref[at])
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])
        rescale = jnp.exp2(m - m_new)
        v = v_ref[at, :]
        pv = f.dot(p.astype(v.dtype), v)
        return rescale[:, None] * o + pv, m_new, rescale * total + jnp.sum(p, axis=1)

    lo, hi = f.bounds(
        f.key_tiles(i * bq, bq, bk, S // bk),
        f.segment_tiles(q_seg, first_ref[mine], last_ref[mine], bk),
    )
    init = (
        jnp.zeros((bq, D), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    o, m, total = lax.fori_loop(lo, hi, body, init)  # total: each row's sum of 2^(s - m)
    # total 0: a tile of padding that visited no key tile. Output 0, and a log-sum-exp of 0
    # so the backward's exp2(MASKED - lse) is 0 should a key tile's loop reach its rows.
    seen = total > 0
    o_ref[...] = (o / jnp.where(seen, total, 1)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, total, 1)), 0)


def _dq_kernel(
    q_ref, k_ref, v_ref, seg_ref, first_ref, last_ref, do_ref, lse_ref, delta_ref, dq_ref, *, f
):
    bq = bk = f.block_bwd
    S, D = k_ref.shape
    i = pl.program_id(0)
    rows = i * bq + jnp.arange(bq)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    mine = pl.ds(i * bq, bq)
    q_seg = seg_ref[mine]

    def body(j, dq):
        at = pl.ds(j * bk, bk)
        k, v = k_ref[at, :], v_ref[at, :]
        s, t = f.scores(q, k, rows, j * bk + jnp.arange(bk), q_seg, seg_ref[at])
        p = jnp.exp2(s - lse[:, None])
        dp = f.dot(do, v, trans_b=True)
        ds = _score_grad(p * (dp - delta[:, None]), t, f)
        return dq + f.dot(ds.astype(k.dtype), k)

    lo, hi = f.bounds(
        f.key_tiles(i * bq, bq, bk, S // bk),
        f.segment_tiles(q_seg, first_ref[mine], last_ref[mine], bk),
    )
    dq = lax.fori_loop(lo, hi, body, jnp.zeros((bq, D), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    seg_ref,
    first_ref,
    last_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    f: _Flash,
):
    bq = bk = f.block_bwd
    G, S, D = q_ref.shape
    j = pl.program_id(0)
    cols = j * bk + jnp.arange(bk)
    k, v = k_ref[...], v_ref[...]
    mine = pl.ds(j * bk, bk)
    kv_seg = seg_ref[mine]
    lo, hi = f.bounds(
        f.query_tiles(j * bk, bk, bq, S // bq),
        f.segment_tiles(kv_seg, first_ref[mine], last_ref[mine], bq),
    )

    def head(g, carry):
        def body(i, carry):
            dk, dv = carry
            at = pl.ds(i * bq, bq)
            q, do = q_ref[g, at, :], do_ref[g, at, :]
            s, t = f.scores(q, k, i * bq + jnp.arange(bq), cols, seg_ref[at], kv_seg)
            p = jnp.exp2(s - lse_ref[g, at][:, None])
            dv = dv + f.dot(p.astype(do.dtype), do, trans_a=True)
            dp = f.dot(do, v, trans_b=True)
            ds = _score_grad(p * (dp - delta_ref[g, at][:, None]), t, f)
            dk = dk + f.dot(ds.astype(q.dtype), q, trans_a=True)
            return dk, dv

        return lax.fori_loop(lo, hi, body, carry)

    zeros = jnp.zeros((bk, D), jnp.float32)
    dk, dv = lax.fori_loop(0, G, head, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _score_grad(ds, t, f: _Flash):
    """The gradient at ``q kᵀ`` from the gradient at the (capped, scaled) scores: ``scale``,
    times ``1 - tanh²`` under a soft-cap."""
    return ds * f.scale if t is None else ds * (f.scale * (1 - t * t))


def _params(f: _Flash, head_dim: int, backward: bool):
    if f.interpret:
        return None
    warps = 4 if backward or head_dim <= 64 else 8
    return plgpu.CompilerParams(num_warps=warps, num_stages=2)


def _forward(q, k, v, seg, spans, f: _Flash):
    B, KV, G, S, D = q.shape
    bq = f.block
    q_spec = pl.BlockSpec((None, None, None, bq, D), lambda i, b, h: (b, h // G, h % G, i, 0))
    kv_spec = pl.BlockSpec((None, None, S, D), lambda i, b, h: (b, h // G, 0, 0))
    seg_spec = pl.BlockSpec((None, S), lambda i, b, h: (b, 0))
    lse_spec = pl.BlockSpec((None, None, None, bq), lambda i, b, h: (b, h // G, h % G, i))
    return pl.pallas_call(
        functools.partial(_forward_kernel, f=f),
        grid=(S // bq, B, KV * G),
        in_specs=[q_spec, kv_spec, kv_spec, seg_spec, seg_spec, seg_spec],
        out_specs=[q_spec, lse_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, KV, G, S), jnp.float32),
        ],
        compiler_params=_params(f, D, backward=False),
        interpret=f.interpret,
        name="flash_fwd",
    )(q, k, v, seg, *spans)


def _backward(q, k, v, seg, spans, o, lse, do, f: _Flash):
    B, KV, G, S, D = q.shape
    b = f.block_bwd
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # (B, KV, G, S)
    row_spec = pl.BlockSpec((None, None, None, b, D), lambda i, n, h: (n, h // G, h % G, i, 0))
    kv_spec = pl.BlockSpec((None, None, S, D), lambda i, n, h: (n, h // G, 0, 0))
    seg_spec = pl.BlockSpec((None, S), lambda i, n, h: (n, 0))
    stat_spec = pl.BlockSpec((None, None, None, b), lambda i, n, h: (n, h // G, h % G, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, f=f),
        grid=(S // b, B, KV * G),
        in_specs=[
            row_spec,
            kv_spec,
            kv_spec,
            seg_spec,
            seg_spec,
            seg_spec,
            row_spec,
            stat_spec,
            stat_spec,
        ],
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(f, D, backward=True),
        interpret=f.interpret,
        name="flash_dq",
    )(q, k, v, seg, *spans, do, lse, delta)
    group_spec = pl.BlockSpec((None, None, G, S, D), lambda j, n, kv: (n, kv, 0, 0, 0))
    tile_spec = pl.BlockSpec((None, None, b, D), lambda j, n, kv: (n, kv, j, 0))
    seg_spec = pl.BlockSpec((None, S), lambda j, n, kv: (n, 0))
    group_stat = pl.BlockSpec((None, None, G, S), lambda j, n, kv: (n, kv, 0, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, f=f),
        grid=(S // b, B, KV),
        in_specs=[
            group_spec,
            tile_spec,
            tile_spec,
            seg_spec,
            seg_spec,
            seg_spec,
            group_spec,
            group_stat,
            group_stat,
        ],
        out_specs=[tile_spec, tile_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(f, D, backward=True),
        interpret=f.interpret,
        name="flash_dkv",
    )(q, k, v, seg, *spans, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, f: _Flash):
    return _forward(q, k, v, seg, segment_spans(seg), f)[0]


def _flash_fwd(q, k, v, seg, f: _Flash):
    spans = segment_spans(seg)  # the backward's loops are bounded by the same documents
    o, lse = _forward(q, k, v, seg, spans, f)
    return o, (q, k, v, seg, spans, o, lse)


def _flash_bwd(f: _Flash, res, do):
    q, k, v, seg, spans, o, lse = res
    return (*_backward(q, k, v, seg, spans, o, lse, do, f), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_gpu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    block: int = 128,
    interpret: bool = False,
) -> jax.Array:
    """Pallas (Triton) flash attention on ``q (B, KV, G, S, D)``, ``k, v (B, KV, S, D)``; any
    segment ids, sliding window and soft-cap. The length is padded (segment 0) to a tile
    multiple, ``head_dim`` with zeros to a power of two of at least 16 (Triton's tiles)."""
    B, KV, G, S, D = q.shape
    # a power of two, >= 16 for Triton, within the shared memory a block has
    bq = min(block, tile_rows(D, q.dtype), max(16, 1 << (S - 1).bit_length()))
    # float32 as XLA's own GPU dots take it: TF32 at the default precision, full float32 where
    # jax_default_matmul_precision asks for it (the tests do; so does the eager reference then)
    precision = jax.config.jax_default_matmul_precision
    f = _Flash(
        scale=scale,
        causal=causal,
        window=sliding_window,
        softcap=softcap,
        block=bq,
        block_bwd=min(BACKWARD_ROWS, bq),
        interpret=interpret,
        exact=q.dtype == jnp.float32 and precision in ("highest", "float32"),
    )
    qp, kp, vp, seg = pad_sequence(q, k, v, segment_ids, bq)
    width = max(16, 1 << (D - 1).bit_length())
    if width != D:  # zero columns change no score and give zero output columns
        wide = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - D)])
        qp, kp, vp = wide(qp), wide(kp), wide(vp)
    out = _flash(qp, kp, vp, seg.astype(jnp.int32), f)
    return _zero_padding(out[..., :S, :D], segment_ids)
