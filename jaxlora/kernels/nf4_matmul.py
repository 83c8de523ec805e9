"""Fused NF4 dequant-matmul ``y = x @ dequant(W)ᵀ`` with a custom VJP (QLoRA's frozen base).

``W`` is ``[N, K]`` in torch orientation, held as bnb bytes ``codes [N, K/2]`` (uint8, high
nibble first) and a float32 ``absmax [N, K/blocksize]`` (a double-quantized absmax is
dequantized before the call, by :func:`dequantize_absmax`: it is 1/64 of the elements and
cheap in XLA). The VJP gives
``dx = dy @ dequant(W)`` with a second kernel and no gradient for the frozen weight.

Backends: GPU -> Pallas Triton kernels (``nf4_triton``), TPU -> Pallas Mosaic kernels
(``nf4_tpu``); either runs on CPU in Pallas interpret mode (tests). ``reference_*`` are the
plain-jnp definitions the kernels must match: dequantize to the input dtype (float32
product, then cast, as ``NF4Tensor.dequantize``), float32-accumulated dot, cast back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlora.kernels import nf4_tpu, nf4_triton

PLATFORMS = ("gpu", "tpu")


def no_fma(product: jax.Array, nonneg: jax.Array) -> jax.Array:
    """``product``, rounded to float32 on its own before any later add.

    Under ``jit`` XLA (CPU and GPU) contracts ``a * b + c`` into one FMA, which rounds once
    and differs from bnb by an ulp; optimization barriers and reduce_precision are removed
    before codegen. XOR-ing the bits with the sign bit of ``nonneg`` (values >= 0, so the
    XOR is a no-op) is opaque to the compiler and keeps the multiply and the add apart.
    """
    zero = jax.lax.bitcast_convert_type(nonneg, jnp.uint32) >> 31
    bits = jax.lax.bitcast_convert_type(product, jnp.uint32) ^ zero
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def dequantize_absmax(
    codes: jax.Array,
    nested_absmax: jax.Array,
    offset: jax.Array,
    *,
    table: tuple[float, ...],
    nested_blocksize: int,
    first_row: jax.Array | int = 0,
    first_col: jax.Array | int = 0,
    cols: int | None = None,
) -> jax.Array:
    """A double-quantized absmax ``codes [n, kb]`` (uint8) as float32:
    ``table[code] · nested_absmax[i // nested_blocksize] + offset``, where ``i`` is the entry's
    index in the whole weight's flat absmax, ``(first_row + r) · cols + first_col + c`` (a
    shard starts at ``first_row, first_col`` of a ``[·, cols]`` absmax; the whole one at 0, 0).

    Two float32 roundings, as bnb's ``dequantize_blockwise`` followed by ``absmax += offset``.
    """
    n, kb = codes.shape
    cols = kb if cols is None else cols
    rows = first_row + jax.lax.broadcasted_iota(jnp.int32, (n, kb), 0)
    index = rows * cols + first_col + jax.lax.broadcasted_iota(jnp.int32, (n, kb), 1)
    nested = jnp.asarray(nested_absmax)[index // nested_blocksize]
    scaled = no_fma(jnp.asarray(table, jnp.float32)[codes] * nested, nested)
    return scaled + jnp.asarray(offset)


def dequantize_reference(
    codes: jax.Array, absmax: jax.Array, code: tuple[float, ...], blocksize: int, dtype
) -> jax.Array:
    """``codes [N, K/2], absmax [N, K/bs] -> W [N, K]`` in ``dtype``."""
    n, k = codes.shape[0], codes.shape[1] * 2
    c = codes.astype(jnp.int32)
    idx = jnp.stack([c >> 4, c & 15], axis=-1).reshape(n, k)
    v = jnp.asarray(code, jnp.float32)[idx].reshape(n, k // blocksize, blocksize)
    return (v * absmax[:, :, None]).reshape(n, k).astype(dtype)


def reference_forward(x, codes, absmax, *, code, blocksize):
    """``x [M, K] -> x @ Wᵀ [M, N]`` in ``x.dtype`` (jnp reference for the forward kernel)."""
    w = dequantize_reference(codes, absmax, code, blocksize, x.dtype)
    prec = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.dot(x, w.T, precision=prec, preferred_element_type=jnp.float32).astype(x.dtype)


def reference_input_grad(dy, codes, absmax, *, code, blocksize):
    """``dy [M, N] -> dy @ W [M, K]`` in ``dy.dtype`` (jnp reference for the dx kernel)."""
    w = dequantize_reference(codes, absmax, code, blocksize, dy.dtype)
    prec = jax.lax.Precision.HIGHEST if dy.dtype == jnp.float32 else None
    return jnp.dot(dy, w, precision=prec, preferred_element_type=jnp.float32).astype(dy.dtype)


def _impl(platform: str | None, interpret: bool):
    if platform is None:
        platform = jax.default_backend()
        if platform not in PLATFORMS:
            if not interpret:
                raise ValueError(
                    f"nf4_matmul: no compiled Pallas kernel for backend {platform!r}; "
                    "pass interpret=True (slow) or use the dequantize-then-dot path"
                )
            platform = "gpu"  # interpret the GPU kernels by default
    if platform not in PLATFORMS:
        raise ValueError(f"nf4_matmul: platform must be one of {PLATFORMS}, got {platform!r}")
    return nf4_triton if platform == "gpu" else nf4_tpu


def _check(x, codes, absmax, blocksize):
    n, k2 = codes.shape
    if codes.dtype != jnp.uint8 or x.ndim != 2 or x.shape[1] != 2 * k2:
        raise ValueError(
            "nf4_matmul: want x [M, K] and uint8 codes [N, K/2], "
            f"got {x.shape}, {codes.dtype}{codes.shape}"
        )
    if (
        (2 * k2) % blocksize
        or absmax.shape != (n, 2 * k2 // blocksize)
        or absmax.dtype != jnp.float32
    ):
        raise ValueError(
            f"nf4_matmul: want float32 absmax [{n}, {2 * k2}/{blocksize}], "
            f"got {absmax.dtype}{absmax.shape}"
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _matmul(x, codes, absmax, code, blocksize, interpret, platform):
    impl = _impl(platform, interpret)
    return impl.forward(x, codes, absmax, code=code, blocksize=blocksize, interpret=interpret)


def _matmul_fwd(x, codes, absmax, code, blocksize, interpret, platform):
    return _matmul(x, codes, absmax, code, blocksize, interpret, platform), (codes, absmax)


def _matmul_bwd(code, blocksize, interpret, platform, res, dy):
    codes, absmax = res
    impl = _impl(platform, interpret)
    dx = impl.input_grad(dy, codes, absmax, code=code, blocksize=blocksize, interpret=interpret)
    return dx, None, None  # the 4-bit weight is frozen: no cotangent


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def nf4_matmul(
    x: jax.Array,
    codes: jax.Array,
    absmax: jax.Array,
    *,
    code: tuple[float, ...],
    blocksize: int,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """``x [M, K] -> x @ dequant(W)ᵀ [M, N]`` in ``x.dtype``, differentiable in ``x`` only.

    ``code`` is the 16-entry value table (NF4 or FP4) as Python floats; ``platform`` picks the
    kernel family (``"gpu"`` Triton, ``"tpu"`` Mosaic; default: the running backend).
    """
    _check(x, codes, absmax, blocksize)
    return _matmul(x, codes, absmax, tuple(code), blocksize, interpret, platform)


def tile_operands(codes: jax.Array, absmax: jax.Array, *, blocksize: int):
    """``codes [N, K/2], absmax [N, K/bs]`` (float32) in the layout the Mosaic kernels read
    (``nf4_tpu.tile_layout``), made once for several calls of :func:`nf4_matmul_tiled`."""
    _check(jnp.zeros((1, 2 * codes.shape[1]), jnp.float32), codes, absmax, blocksize)
    return nf4_tpu.tile_layout(codes, absmax, nf4_tpu.k_tile(blocksize))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _matmul_tiled(x, codes_t, absmax_t, code, blocksize, interpret):
    return nf4_tpu.forward_tiled(
        x, codes_t, absmax_t, code=code, blocksize=blocksize, interpret=interpret
    )


def _matmul_tiled_fwd(x, codes_t, absmax_t, code, blocksize, interpret):
    y = _matmul_tiled(x, codes_t, absmax_t, code, blocksize, interpret)
    return y, (codes_t, absmax_t)


def _matmul_tiled_bwd(code, blocksize, interpret, res, dy):
    codes_t, absmax_t = res
    dx = nf4_tpu.input_grad_tiled(
        dy, codes_t, absmax_t, code=code, blocksize=blocksize, interpret=interpret
    )
    return dx, None, None


_matmul_tiled.defvjp(_matmul_tiled_fwd, _matmul_tiled_bwd)


def nf4_matmul_tiled(
    x: jax.Array,
    codes_t: jax.Array,
    absmax_t: jax.Array,
    *,
    code: tuple[float, ...],
    blocksize: int,
    interpret: bool = False,
) -> jax.Array:
    """:func:`nf4_matmul` on the Mosaic kernels with operands from :func:`tile_operands`
    (``K`` zero-padded to whole tiles here, so the gradient comes back cut to ``x``'s)."""
    kp = codes_t.shape[0] * 2
    if x.ndim != 2 or not x.shape[1] <= kp < x.shape[1] + nf4_tpu.k_tile(blocksize):
        raise ValueError(f"nf4_matmul_tiled: x {x.shape} does not match codes_t {codes_t.shape}")
    if kp != x.shape[1]:
        x = jnp.pad(x, ((0, 0), (0, kp - x.shape[1])))
    return _matmul_tiled(x, codes_t, absmax_t, tuple(code), blocksize, interpret)
