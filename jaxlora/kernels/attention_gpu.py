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

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

from jaxlora.kernels.attention_chunked import pad_sequence


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
    bq = min(block, max(16, 1 << (S - 1).bit_length()))  # a power of two, >= 16 for Triton
    q, k, v, seg = pad_sequence(q, k, v, segment_ids, bq)
    kh = jnp.repeat(k.transpose(0, 2, 1, 3), G, axis=2)  # (B, S, H, D), head kv * G + g
    vh = jnp.repeat(v.transpose(0, 2, 1, 3), G, axis=2)
    bwd = min(32, bq)
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
