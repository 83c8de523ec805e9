"""NF4 dequant-matmul kernels for GPU: Pallas with the Triton lowering.

jax 0.10.2 offers two Pallas GPU lowerings: Mosaic GPU (Hopper/Blackwell-specific
warpgroup kernels; ``pl.pallas_call`` for it is deprecated in favour of ``plgpu.kernel``) and
Triton (``jax._src.pallas.triton``), which runs on every CUDA GPU jax supports and needs no
hand-written pipelining. We use Triton, selected by passing its ``CompilerParams``.

Both kernels read the weight in bnb's byte order (``codes [N, K/2]``, first element of a
pair in the high nibble) with a float32 ``absmax [N, K/blocksize]``, and rebuild a
``[bn, bk]`` weight tile in registers: nibbles -> code values (a select tree; Triton has no
register gather) -> times absmax -> cast to the input dtype, exactly as
``NF4Tensor.dequantize(x.dtype)`` would, then a float32-accumulated ``dot``. The 4-bit
weight is never written out at 16 bits. Each program loops over the contracted axis and
masks every load and store, so no size needs to be a multiple of a tile (Triton needs
power-of-two tiles; ``K`` only needs to be a multiple of ``blocksize``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def lut(idx: jax.Array, code: tuple[float, ...]) -> jax.Array:
    """``code[idx]`` for int32 ``idx`` in [0, 16) as a 4-level select tree (float32)."""
    level = [jnp.float32(c) for c in code]
    for bit in range(4):
        take_odd = (idx & (1 << bit)) != 0
        level = [
            jnp.where(take_odd, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)
        ]
    return level[0]


def _load_w(c_ref, a_ref, n0, bn: int, k0, bk: int, n: int, k: int, bs: int, code) -> jax.Array:
    """Weight tile ``W[n0:n0+bn, k0:k0+bk]`` in float32; rows/columns past the end are 0."""
    rows = n0 + jnp.arange(bn)
    kc = k0 // 2 + jnp.arange(bk // 2)
    c = plgpu.load(
        c_ref.at[pl.ds(n0, bn), pl.ds(k0 // 2, bk // 2)],
        mask=(rows[:, None] < n) & (kc[None, :] < k // 2),
        other=jnp.uint8(0),
    ).astype(jnp.int32)
    ka = k0 // bs + jnp.arange(bk // bs)
    a = plgpu.load(
        a_ref.at[pl.ds(n0, bn), pl.ds(k0 // bs, bk // bs)],
        mask=(rows[:, None] < n) & (ka[None, :] < k // bs),
        other=jnp.float32(0),
    )
    # (bn, bk/2) bytes -> (bn, bk) codes: high nibble first (bnb order), via tt.join.
    idx = jnp.stack([c >> 4, c & 15], axis=-1).reshape(bn, bk)
    v = lut(idx, code).reshape(bn, bk // bs, bs)
    return (v * a[:, :, None]).reshape(bn, bk)


def _precision(dtype) -> lax.Precision:
    # float32 inputs: full-precision dot (no TF32), so results match the float32 reference.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _fwd_kernel(x_ref, c_ref, a_ref, o_ref, *, m, n, k, bm, bn, bk, bs, code):
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * bm + jnp.arange(bm)
    cols = j * bn + jnp.arange(bn)

    def body(t, acc):
        k0 = t * bk
        kx = k0 + jnp.arange(bk)
        x = plgpu.load(
            x_ref.at[pl.ds(i * bm, bm), pl.ds(k0, bk)],
            mask=(rows[:, None] < m) & (kx[None, :] < k),
            other=jnp.zeros((), x_ref.dtype),
        )
        w = _load_w(c_ref, a_ref, j * bn, bn, k0, bk, n, k, bs, code).astype(x.dtype)
        dims = (((1,), (1,)), ((), ()))  # x (bm, bk) . w (bn, bk) -> (bm, bn)
        return acc + lax.dot_general(
            x, w, dims, precision=_precision(x.dtype), preferred_element_type=jnp.float32
        )

    acc = lax.fori_loop(0, pl.cdiv(k, bk), body, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(
        o_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)],
        acc.astype(o_ref.dtype),
        mask=(rows[:, None] < m) & (cols[None, :] < n),
    )


def _dx_kernel(dy_ref, c_ref, a_ref, o_ref, *, m, n, k, bm, bn, bk, bs, code):
    i, t = pl.program_id(0), pl.program_id(1)
    rows = i * bm + jnp.arange(bm)
    kx = t * bk + jnp.arange(bk)

    def body(s, acc):
        n0 = s * bn
        ncols = n0 + jnp.arange(bn)
        dy = plgpu.load(
            dy_ref.at[pl.ds(i * bm, bm), pl.ds(n0, bn)],
            mask=(rows[:, None] < m) & (ncols[None, :] < n),
            other=jnp.zeros((), dy_ref.dtype),
        )
        w = _load_w(c_ref, a_ref, n0, bn, t * bk, bk, n, k, bs, code).astype(dy.dtype)
        return acc + jnp.dot(
            dy, w, precision=_precision(dy.dtype), preferred_element_type=jnp.float32
        )

    acc = lax.fori_loop(0, pl.cdiv(n, bn), body, jnp.zeros((bm, bk), jnp.float32))
    plgpu.store(
        o_ref.at[pl.ds(i * bm, bm), pl.ds(t * bk, bk)],
        acc.astype(o_ref.dtype),
        mask=(rows[:, None] < m) & (kx[None, :] < k),
    )


def _pow2_at_least(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, (v - 1).bit_length())))


def fwd_tiles(m: int, bs: int) -> tuple[int, int, int, int]:
    """``(bm, bn, bk, num_warps)`` for the forward kernel: skinny M (decode) streams the
    weight with many programs along N; large M uses square-ish tensor-core tiles."""
    if m <= 16:
        return 16, 64, max(256, bs), 4
    if m <= 64:
        return _pow2_at_least(m, 16, 64), 64, max(128, bs), 4
    return 128, 128, max(64, bs), 8


def forward(x, codes, absmax, *, code, blocksize, interpret=False):
    """``x [M, K] -> x @ dequant(W)ᵀ [M, N]`` in ``x.dtype`` (Triton kernel)."""
    (m, k), n = x.shape, codes.shape[0]
    bm, bn, bk, warps = fwd_tiles(m, blocksize)
    kernel = functools.partial(
        _fwd_kernel, m=m, n=n, k=k, bm=bm, bn=bn, bk=bk, bs=blocksize, code=code
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn)),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=3),
        interpret=interpret,
        name="nf4_matmul_fwd",
    )(x, codes, absmax)


def input_grad(dy, codes, absmax, *, code, blocksize, interpret=False):
    """``dy [M, N] -> dy @ dequant(W) [M, K]`` in ``dy.dtype`` (Triton kernel)."""
    (m, n), k = dy.shape, codes.shape[1] * 2
    bm = _pow2_at_least(m, 16, 64)
    bk, bn = max(128, blocksize), 64
    kernel = functools.partial(
        _dx_kernel, m=m, n=n, k=k, bm=bm, bn=bn, bk=bk, bs=blocksize, code=code
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, k), dy.dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(k, bk)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="nf4_matmul_dx",
    )(dy, codes, absmax)
