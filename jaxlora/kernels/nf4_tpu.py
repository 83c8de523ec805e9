"""NF4 dequant-matmul kernels for TPU: Pallas with the Mosaic lowering.

Mosaic wants (8, 128)-aligned blocks and has no cheap lane interleave or lane broadcast,
so the weight is presented transposed and tile-reordered (``tile_layout``, a per-call XLA
pass over the 4-bit bytes, N*K/2 bytes, small next to a training matmul):

* ``codes_t [Kp/2, N]``: for K-tile ``t`` of ``bk`` elements, byte row ``j`` holds element
  ``t*bk + j`` in the high nibble and ``t*bk + bk/2 + j`` in the low one, so a tile's two
  halves are two sublane-aligned slabs (a concat along sublanes, no interleave);
* ``absmax_t [Kp/bs, N]``: one row per block, broadcast over ``bs`` sublanes in-kernel.

The relayout stays per call, on the one weight the call reads. In a step that scans its
layers, each call's ``codes`` are one layer's slice of a stacked ``[L, N, K/2]`` array; left
free, XLA's TPU layout assignment makes the transpose free inside the loops by giving the whole
loop-carried stack the transposed layout: one relayout copy of every layer's codes, made before
the loops and alive through the step (Llama-3.1-8B: 104 MiB a layer, 3.2 GiB of temporaries on
a 16 GiB v5e chip). An optimization barrier on the call's operands keeps it from reaching
through them (tests/targets/test_scan_memory.py).

``K`` is zero-padded to a multiple of ``bk`` (absmax 0 -> weight 0). The grid runs the
contracted axis last ("arbitrary") into a float32 VMEM accumulator. Edge blocks along M and
N read unspecified values; they only reach outputs that are dropped, except in ``dx``
where N is contracted and the tail is masked explicitly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxlora.kernels.nf4_triton import lut


def k_tile(blocksize: int) -> int:
    """K tile: bk/2 bytes fill 8-bit sublane tiles (32) and bk/bs absmax rows fill 8."""
    return max(512, 8 * blocksize)


def tile_layout(codes: jax.Array, absmax: jax.Array, bk: int) -> tuple[jax.Array, jax.Array]:
    """``codes [N, K/2], absmax [N, K/bs] -> codes_t [Kp/2, N], absmax_t [Kp/bs, N]``, from
    these operands as they are (the barrier: see the module docstring), not from a relayout of
    an array they were sliced from."""
    codes, absmax = lax.optimization_barrier((codes, absmax))
    n, k = codes.shape[0], codes.shape[1] * 2
    kp = pl.cdiv(k, bk) * bk
    c = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(n, k)
    c = jnp.pad(c, ((0, 0), (0, kp - k))).reshape(n, kp // bk, 2, bk // 2)
    c = (c[:, :, 0] << 4) | c[:, :, 1]  # (n, tiles, bk/2)
    bs = k // absmax.shape[1]
    a = jnp.pad(absmax, ((0, 0), (0, (kp - k) // bs)))
    return c.reshape(n, kp // 2).T, a.T


def _tile_t(c, a, bk: int, bs: int, code) -> jax.Array:
    """``c [bk/2, bn] uint8, a [bk/bs, bn] -> Wᵀ tile [bk, bn]`` float32."""
    c = c.astype(jnp.int32)
    v = jnp.concatenate([lut(c >> 4, code), lut(c & 15, code)], axis=0)
    bn = c.shape[1]
    return v * jnp.broadcast_to(a[:, None, :], (bk // bs, bs, bn)).reshape(bk, bn)


def _precision(dtype) -> lax.Precision:
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _fwd_kernel(x_ref, c_ref, a_ref, o_ref, acc_ref, *, bk, bs, code):
    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...]
    wt = _tile_t(c_ref[...], a_ref[...], bk, bs, code).astype(x.dtype)
    acc_ref[...] += jnp.dot(
        x, wt, precision=_precision(x.dtype), preferred_element_type=jnp.float32
    )

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _dx_kernel(dy_ref, c_ref, a_ref, o_ref, acc_ref, *, n, bn, bk, bs, code):
    s = pl.program_id(2)

    @pl.when(s == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    valid = s * bn + lax.broadcasted_iota(jnp.int32, (1, bn), 1) < n  # the N tail
    dy = jnp.where(valid, dy_ref[...], 0).astype(dy_ref.dtype)
    wt = jnp.where(valid, _tile_t(c_ref[...], a_ref[...], bk, bs, code), 0).astype(dy.dtype)
    dims = (((1,), (1,)), ((), ()))  # dy (bm, bn) . wt (bk, bn) -> (bm, bk)
    acc_ref[...] += lax.dot_general(
        dy, wt, dims, precision=_precision(dy.dtype), preferred_element_type=jnp.float32
    )

    @pl.when(s == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _bm(m: int, dtype) -> int:
    sub = 8 * (4 // jnp.dtype(dtype).itemsize)  # sublane packing: 8 f32, 16 bf16 rows
    return min(256, pl.cdiv(m, sub) * sub)


def _bn(n: int) -> int:
    return n if n <= 256 else 256


def _cost(m: int, n: int, kp: int, dtype, blocksize: int, lhs: int, out: int) -> pl.CostEstimate:
    """What XLA's cost analysis should count for one call (it cannot look inside a Mosaic
    kernel): the matmul's ``2·M·N·Kp`` flops and one pass over each operand and the result
    (``lhs [M, lhs]`` in, ``[M, out]`` out)."""
    weight = n * kp // 2 + 4 * n * kp // blocksize  # codes + float32 absmax
    io = m * (lhs + out) * jnp.dtype(dtype).itemsize
    return pl.CostEstimate(flops=2 * m * n * kp, transcendentals=0, bytes_accessed=weight + io)


def forward(x, codes, absmax, *, code, blocksize, interpret=False):
    """``x [M, K] -> x @ dequant(W)ᵀ [M, N]`` in ``x.dtype`` (Mosaic kernel)."""
    codes_t, absmax_t = tile_layout(codes, absmax, k_tile(blocksize))
    return forward_tiled(x, codes_t, absmax_t, code=code, blocksize=blocksize, interpret=interpret)


def forward_tiled(x, codes_t, absmax_t, *, code, blocksize, interpret=False):
    """:func:`forward` on operands already in :func:`tile_layout`'s layout (made once for
    several calls: the tiles of a tiled MLP)."""
    (m, k), n = x.shape, codes_t.shape[1]
    bk = k_tile(blocksize)
    kp = codes_t.shape[0] * 2
    if kp != k:
        x = jnp.pad(x, ((0, 0), (0, kp - k)))
    bm, bn = _bm(m, x.dtype), _bn(n)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, bk=bk, bs=blocksize, code=code),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), kp // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, t: (i, t)),
            pl.BlockSpec((bk // 2, bn), lambda i, j, t: (t, j)),
            pl.BlockSpec((bk // blocksize, bn), lambda i, j, t: (t, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, t: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        cost_estimate=_cost(m, n, kp, x.dtype, blocksize, lhs=kp, out=n),
        name="nf4_matmul_fwd_tpu",
    )(x, codes_t, absmax_t)


def input_grad(dy, codes, absmax, *, code, blocksize, interpret=False):
    """``dy [M, N] -> dy @ dequant(W) [M, K]`` in ``dy.dtype`` (Mosaic kernel)."""
    codes_t, absmax_t = tile_layout(codes, absmax, k_tile(blocksize))
    dx = input_grad_tiled(
        dy, codes_t, absmax_t, code=code, blocksize=blocksize, interpret=interpret
    )
    k = codes.shape[1] * 2
    return dx if dx.shape[1] == k else dx[:, :k]


def input_grad_tiled(dy, codes_t, absmax_t, *, code, blocksize, interpret=False):
    """:func:`input_grad` on operands in :func:`tile_layout`'s layout: ``dx [M, Kp]``, ``K``
    padded to whole tiles (the caller cuts it back)."""
    m, n = dy.shape
    bk = k_tile(blocksize)
    kp = codes_t.shape[0] * 2
    bm, bn = _bm(m, dy.dtype), _bn(n)
    return pl.pallas_call(
        functools.partial(_dx_kernel, n=n, bn=bn, bk=bk, bs=blocksize, code=code),
        out_shape=jax.ShapeDtypeStruct((m, kp), dy.dtype),
        grid=(pl.cdiv(m, bm), kp // bk, pl.cdiv(n, bn)),
        in_specs=[
            pl.BlockSpec((bm, bn), lambda i, t, s: (i, s)),
            pl.BlockSpec((bk // 2, bn), lambda i, t, s: (t, s)),
            pl.BlockSpec((bk // blocksize, bn), lambda i, t, s: (t, s)),
        ],
        out_specs=pl.BlockSpec((bm, bk), lambda i, t, s: (i, t)),
        scratch_shapes=[pltpu.VMEM((bm, bk), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        cost_estimate=_cost(m, n, kp, dy.dtype, blocksize, lhs=n, out=kp),
        name="nf4_matmul_dx_tpu",
    )(dy, codes_t, absmax_t)
