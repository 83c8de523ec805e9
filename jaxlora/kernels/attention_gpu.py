"""GPU flash attention, adapted to the model's heads-first grouped-query layout.

Two kernels, because neither covers every mask the model uses:

==============  ======  ==============  =========================  ============
kernel          causal  sliding window  segments                   GQA
==============  ======  ==============  =========================  ============
``cudnn``       yes     yes             one per row, right-padded  native
``pallas_gpu``  yes     no              any (packing, padding)     k/v repeated
==============  ======  ==============  =========================  ============

* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash
  attention (forward and backward kernels). Its public API masks padding only through
  per-row lengths (``query_seq_lengths``: the first ``n`` tokens are real), so a row must be one
  sequence followed by padding. Packed rows would need cuDNN's packed layout (segment offsets),
  which JAX exposes only privately and refuses to trace on a machine without a Hopper GPU (so it
  cannot be compiled ahead of time here); a boolean ``mask`` would be turned into a
  materialized ``[B, H, S, T]`` bias. Whether a batch is packed is data, not a shape, so the
  caller chooses: ``pallas_gpu`` for packed batches.
* ``pallas_gpu``: ``jax.experimental.pallas.ops.gpu.attention.mha``, the Pallas flash kernel
  with segment ids (Triton lowering; its own forward and backward kernels). It has no sliding
  window and wants as many kv heads as query heads, so k and v are repeated per group (a
  ``(B, S, H, D)`` copy, linear in the length); ``dk, dv`` are summed back by autodiff.

Both take ``(B, S, H, D)``; the adaptors transpose in and out and set padding rows to 0.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from jaxlora.kernels.attention_chunked import pad_sequence


@functools.cache
def _pallas_attention():
    """``jax.experimental.pallas.ops.gpu.attention``, imported when a program first uses it.

    JAX 0.11 deprecates the module, pointing to tokamax (a separate package); it still ships
    and runs it (jax 0.11.2 on an H200: docs/kernels.md). Its DeprecationWarning names a
    change for jaxlora to make, not for its user, so it is not passed on; a JAX without the
    module gets an error saying what to use instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"jax\.experimental\.pallas\.ops\.gpu\.attention is deprecated"
        )
        try:
            from jax.experimental.pallas.ops.gpu import attention
        except ImportError as e:
            raise NotImplementedError(
                f"pallas_gpu attention: jax {jax.__version__} has no "
                "jax.experimental.pallas.ops.gpu.attention (moved to tokamax); use "
                "impl='chunked' (or 'cudnn' for unpacked rows)"
            ) from e
    return attention


def _to_bshd(q: jax.Array) -> jax.Array:
    B, KV, G, S, D = q.shape  # head h = kv * G + g, the order jax.nn's GQA groups in
    return q.transpose(0, 3, 1, 2, 4).reshape(B, S, KV * G, D)


def _from_bshd(o: jax.Array, kv: int) -> jax.Array:
    B, S, H, D = o.shape
    return o.reshape(B, S, kv, H // kv, D).transpose(0, 2, 3, 1, 4)


def _zero_padding(out: jax.Array, q_segment_ids: jax.Array) -> jax.Array:
    return jnp.where((q_segment_ids != 0)[:, None, None, :, None], out, 0)


def _no_softcap(kernel: str, softcap: float | None) -> None:
    """Neither kernel soft-caps scores (Gemma 2): refuse rather than compute another model."""
    if softcap is not None:
        raise NotImplementedError(
            f"{kernel} attention has no logit soft-capping (attn_logit_softcapping={softcap}); "
            "use impl='chunked' (jaxlora.weights.kernels_for picks it for such models)"
        )


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
    """
    _no_softcap("cudnn", softcap)
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
    segment ids, no sliding window. The length is padded (segment 0) to a block multiple."""
    _no_softcap("pallas_gpu", softcap)
    if sliding_window is not None:
        raise NotImplementedError(
            "pallas_gpu attention has no sliding window; use impl='cudnn' (unpacked batches) "
            "or impl='chunked'"
        )
    B, KV, G, S, D = q.shape
    # a power of two, >= 16 for Triton, within the shared memory a block has
    bq = min(block, tile_rows(D, q.dtype), max(16, 1 << (S - 1).bit_length()))
    q, k, v, seg = pad_sequence(q, k, v, segment_ids, bq)
    kh = jnp.repeat(k.transpose(0, 2, 1, 3), G, axis=2)  # (B, S, H, D), head kv * G + g
    vh = jnp.repeat(v.transpose(0, 2, 1, 3), G, axis=2)
    bwd = min(32, bq)
    pallas_attention = _pallas_attention()
    sizes = pallas_attention.BlockSizes(
        block_q=bq, block_k=bq, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd
    )
    out = pallas_attention.mha(
        _to_bshd(q),
        kh,
        vh,
        seg,
        sm_scale=scale,
        causal=causal,
        block_sizes=sizes,
        interpret=interpret,
    )
    return _zero_padding(_from_bshd(out, KV)[:, :, :, :S], segment_ids)
