"""TPU flash attention: Pallas splash attention (``jax.experimental.pallas.ops.tpu``), adapted
to the model's heads-first grouped-query layout.

Splash takes one sequence, ``q [H, S, D]`` and ``k, v [KV, S, D]`` (its "MHA" mode reads kv
head ``h // (H / KV)`` for query head ``h``, which is exactly the model's ``(KV, G)`` head
order flattened), a static mask object (causal, or ``LocalMask`` for a sliding window) and
segment ids; the batch is a ``vmap``. It has its own VJP (dq and dkv kernels recomputing the
probabilities from the saved logsumexp), so training memory is linear in the length.

What the adaptor adds: the scale (splash has none: q is multiplied by it first, as MaxText
does), padding of the length to a multiple of 128 (the kernel's lane width) with segment 0, and
zeros on padding rows. Splash itself lets segment-0 rows attend to each other (it compares ids
and has no notion of padding); those rows are overwritten, and real rows never see them
because their segment ids differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from jaxlora.kernels.attention_chunked import pad_sequence

_LANES = 128


def _block(n: int, largest: int) -> int:
    """The largest of ``largest, largest/2, ..., 128`` dividing ``n`` (a multiple of 128)."""
    b = largest
    while n % b:
        b //= 2
    return b


def _check_precision(dtype) -> None:
    """Mosaic refuses a 16-bit matmul asked for float32 contract precision, which a process-wide
    ``jax_default_matmul_precision`` of "highest" or "float32" asks for (splash's dots take no
    precision argument). Say so, instead of a Mosaic error at compile time."""
    precision = jax.config.jax_default_matmul_precision
    if jnp.dtype(dtype).itemsize == 2 and precision not in (None, "default", "bfloat16"):
        raise ValueError(
            f"splash attention on {jnp.dtype(dtype).name} inputs needs the default matmul "
            f"precision, not {precision!r} (Mosaic cannot compile 16-bit matmuls at float32 "
            "precision): trace the step under jax.default_matmul_precision('default')"
        )


def make_kernel(
    heads: int,
    length: int,
    *,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None = None,
    block: int = 512,
    interpret: bool = False,
) -> sk.SplashAttentionKernel:
    """The splash kernel for ``heads`` query heads over ``length`` tokens (a multiple of 128);
    ``softcap``: splash's own ``attn_logits_soft_cap`` (``c · tanh(s / c)`` on the scaled
    scores, before the mask, as Gemma 2 in transformers)."""
    shape = (length, length)
    if sliding_window is not None:  # transformers: k > q - window, i.e. q - (window - 1) <= k <= q
        mask = sm.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
    elif causal:
        mask = sm.CausalMask(shape)
    else:
        mask = sm.FullMask(shape)
    b = _block(length, block)
    sizes = sk.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    return sk.make_splash_mha(
        sm.MultiHeadMask([mask] * heads),
        block_sizes=sizes,
        attn_logits_soft_cap=softcap,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    block: int = 512,
    interpret: bool = False,
) -> jax.Array:
    """Self-attention ``q (B, KV, G, S, D)``, ``k, v (B, KV, S, D)`` -> ``(B, KV, G, S, D)`` with
    the semantics of :func:`jaxlora.models.attention.attention` (segment-0 rows output 0)."""
    B, KV, G, S, D = q.shape
    q, k, v, seg = pad_sequence(q, k, v, segment_ids, _LANES)
    sp = q.shape[3]
    kernel = make_kernel(
        KV * G,
        sp,
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        block=block,
        interpret=interpret,
    )
    q = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(B, KV * G, sp, D)

    def one(q, k, v, seg):  # one sequence: q (H, S, D), k, v (KV, S, D)
        return kernel(q, k, v, segment_ids=sk.SegmentIds(q=seg, kv=seg))

    _check_precision(q.dtype)
    out = jax.vmap(one)(q, k, v, seg)  # (B, H, S, D)
    out = out.reshape(B, KV, G, sp, D)[:, :, :, :S]
    return jnp.where((segment_ids != 0)[:, None, None, :, None], out, 0)
