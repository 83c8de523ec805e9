"""Adam's moments in 8 bits, as bitsandbytes' ``AdamW8bit`` keeps them (``optim_bits=8``,
``block_wise=True``): each moment flattened, cut into blocks of 256, every block stored as
its absmax (float32) and one byte per value — the index of the nearest entry of bnb's dynamic
map (signed for the first moment, unsigned for the second) to ``value / absmax``. Each update
dequantizes, updates in float32, and quantizes again; parameters smaller than
``min_8bit_size`` (bnb's 4096) keep float32 moments, as bnb does.

Written here because optax has no 8-bit state and bnb's kernels are torch ops. The rounding
is bnb's CUDA optimizer kernel's (``kOptimizerStatic8bit2StateBlockwise``): the nearest code
(``quantize_2D``, the same binary search as ``dQuantize``, ties to the search's pivot), except
that the first moment keeps its sign: a negative value whose nearest code is 0 stores the
smallest negative code instead. bnb's CPU kernel searches approximately: it sometimes stores a
farther code (tests/training/test_optimizers.py measures how often) and never stores 0 for a
value under about 2e-5 of its block's absmax, zero included (it stores that code instead).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlora.weights.nf4_format import DYNAMIC_MAP, UNSIGNED_DYNAMIC_MAP, dynamic_quantize

BLOCKSIZE = 256  # bnb's Optimizer8bit: blocksize = 256 in init_state
MIN_8BIT_SIZE = 4096  # bnb's AdamW8bit(min_8bit_size=4096)


class Quantized8bit(NamedTuple):
    """One moment of one parameter: ``codes [n] uint8`` (flat), ``absmax [ceil(n/256)]``."""

    codes: jax.Array
    absmax: jax.Array


class ScaleByAdam8bitState(NamedTuple):
    count: jax.Array  # [] int32
    mu: Any  # per leaf: Quantized8bit (signed map) or a float32 array (small leaves)
    nu: Any  # per leaf: Quantized8bit (unsigned map) or a float32 array


def quantize(x: jax.Array, table: np.ndarray, *, keep_sign: bool = False) -> Quantized8bit:
    """``x`` (any shape, float32) -> blockwise 8-bit codes of ``table`` and per-block absmax.

    ``keep_sign`` (the first moment, signed map): where the nearest code's sign differs from the
    value's (a negative value nearest to code 0.0), the neighbouring code towards the value's
    side is stored, as bnb's 8-bit optimizer kernels do."""
    flat = x.reshape(-1)
    n = flat.shape[0]
    blocks = jnp.pad(flat, (0, (-n) % BLOCKSIZE)).reshape(-1, BLOCKSIZE)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # An all-zero block (absmax 0) stores code 0 × absmax 0 = 0 whatever the code.
    scaled = blocks * (1.0 / jnp.where(absmax == 0, 1.0, absmax))[:, None]
    codes = dynamic_quantize(jnp, scaled, table)
    if keep_sign:
        flipped = jnp.signbit(jnp.asarray(table)[codes]) != jnp.signbit(scaled)
        shifted = codes.astype(jnp.int32) + jnp.where(scaled > 0, 1, -1)
        codes = jnp.where(flipped, shifted, codes).astype(jnp.uint8)
    return Quantized8bit(codes.reshape(-1)[:n], absmax)


def dequantize(q: Quantized8bit, table: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
    """``table[codes] × absmax`` of each block, float32, in ``shape``."""
    n = q.codes.shape[0]
    codes = jnp.pad(q.codes, (0, (-n) % BLOCKSIZE)).reshape(-1, BLOCKSIZE)
    values = jnp.asarray(table)[codes] * q.absmax[:, None]
    return values.reshape(-1)[:n].reshape(shape)


def _zeros(p: jax.Array, table: np.ndarray, min_8bit_size: int) -> Any:
    if p.size < min_8bit_size:
        return jnp.zeros(p.shape, jnp.float32)
    return quantize(jnp.zeros(p.shape, jnp.float32), table)


def _one_minus_power(b: float, t: jax.Array) -> jax.Array:
    """``1 - bᵗ`` to float32 precision. ``1 - b**t`` in float32 loses digits to cancellation
    (``1 - 0.999`` is 4.7e-5 off in relative terms), where bnb computes in float64."""
    return -jnp.expm1(t.astype(jnp.float32) * jnp.float32(np.log(b)))


def scale_by_adam_8bit(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, min_8bit_size: int = MIN_8BIT_SIZE
) -> optax.GradientTransformation:
    """Adam's direction ``m̂ / (√v̂ + ε)`` with 8-bit blockwise moments (module docstring).

    The arithmetic is bnb's CPU update (``_optimizer_update_8bit_blockwise_cpu``):
    ``m = b1·m + (1-b1)·g``, ``v = b2·v + (1-b2)·g·g``, direction
    ``m / (√v / √(1-b2ᵗ) + ε) / (1-b1ᵗ)``. Chain ``add_decayed_weights`` and the learning
    rate after it for AdamW.
    """
    is_q = lambda x: isinstance(x, Quantized8bit)

    def init(params):
        mu = jax.tree.map(lambda p: _zeros(p, DYNAMIC_MAP, min_8bit_size), params)
        nu = jax.tree.map(lambda p: _zeros(p, UNSIGNED_DYNAMIC_MAP, min_8bit_size), params)
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), mu, nu)

    def load(state, table, g):
        return dequantize(state, table, g.shape) if is_q(state) else state

    def store(like, x, table, keep_sign=False):
        return quantize(x, table, keep_sign=keep_sign) if is_q(like) else x

    def update(grads, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        c1 = _one_minus_power(b1, count)
        c2 = jnp.sqrt(_one_minus_power(b2, count))

        def one(g, mq, vq):
            g = g.astype(jnp.float32)
            m = load(mq, DYNAMIC_MAP, g) * jnp.float32(b1) + jnp.float32(1 - b1) * g
            v = load(vq, UNSIGNED_DYNAMIC_MAP, g) * jnp.float32(b2) + jnp.float32(1 - b2) * g * g
            direction = m / (jnp.sqrt(v) / c2 + jnp.float32(eps)) / c1
            m_q = store(mq, m, DYNAMIC_MAP, keep_sign=True)
            return direction, m_q, store(vq, v, UNSIGNED_DYNAMIC_MAP)

        out = jax.tree.map(one, grads, state.mu, state.nu, is_leaf=is_q)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out, is_leaf=is_q)
        return pick(0), ScaleByAdam8bitState(count, pick(1), pick(2))

    return optax.GradientTransformation(init, update)
