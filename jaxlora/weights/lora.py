"""The LoRA weight type: a frozen base plus a low-rank update, ``x ↦ W₀x + s·B(A(dropout(x)))``.

``A [r, in]``, ``B [out, r]`` and ``s = α/r`` (``α/√r`` with rsLoRA), Hu et al. 2021
(arXiv:2106.09685); DoRA, Liu et al. 2024 (arXiv:2402.09353). The forward follows
``peft.tuners.lora.Linear.forward`` and ``DoraLinearLayer`` (peft 0.21.2). The tree functions
that put these weights into a model (inject, partition, combine, merge) are :mod:`jaxlora.lora`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from jaxlora.weights.dispatch import dense, dense_weight, fusable_base, staged

# ---- the LoRA branch, with a hand-written backward pass ---------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lora_branch(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``s·(x·Aᵀ)·Bᵀ`` for ``x [T, in]``, ``A [r, in]``, ``B [out, r]`` -> ``[T, out]``.

    The custom VJP forms every gradient from the rank-r intermediates, so only ``[T, r]``
    operands get transposed; XLA's default derivation of ``dB`` transposes the ``[T, out]``
    cotangent instead (measured: ~10 % of a CPU train step, tools/bench_train.py).
    """
    return ((x @ a.T) @ b.T) * scale


def _lora_branch_fwd(x, a, b, scale):
    h = x @ a.T  # (T, r)
    return (h @ b.T) * scale, (x, a, b, h)


def _lora_branch_bwd(scale, res, g):
    x, a, b, h = res
    gs = g * scale  # (T, out)
    dh = gs @ b  # (T, r)
    return dh @ a, dh.T @ x, (h.T @ gs).T  # dx (T, in), dA (r, in), dB (out, r)


_lora_branch.defvjp(_lora_branch_fwd, _lora_branch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lora_dense(
    x: jax.Array, xl: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float
) -> jax.Array:
    """``x·Wᵀ + s·(xl·Aᵀ)·Bᵀ`` as one matmul, ``[x | s·xl·Aᵀ] · [W | B]ᵀ``, for a dense base.

    ``x [T, in]`` feeds the base and ``xl`` (x after LoRA dropout, or x itself) the adapter;
    ``W [out, in]``, ``A [r, in]``, ``B [out, r]``, all one dtype. The backward is one matmul
    against ``[W | B]`` too, which gives ``dx`` and the adapter's ``dh`` together; ``dW`` is
    formed only if asked for (a frozen base never is, and XLA drops it).
    """
    return _lora_dense_fwd(x, xl, w, a, b, scale)[0]


def _lora_dense_fwd(x, xl, w, a, b, scale):
    hs = (xl @ a.T) * scale  # (T, r)
    y = jnp.concatenate([x, hs], axis=-1) @ jnp.concatenate([w, b], axis=-1).T
    return y, (x, xl, w, a, b, hs)


def _lora_dense_bwd(scale, res, g):
    x, xl, w, a, b, hs = res
    n_in = x.shape[-1]
    d = g @ jnp.concatenate([w, b], axis=-1)  # (T, in + r)
    dh = d[:, n_in:] * scale  # (T, r)
    return d[:, :n_in], dh @ a, g.T @ x, dh.T @ xl, (hs.T @ g).T


_lora_dense.defvjp(_lora_dense_fwd, _lora_dense_bwd)


# ---- the weight type -------------------------------------------------------------------------


@dataclass(frozen=True)
class FactorUse:
    """How a sharded program holds an adapter's factors while it multiplies them (static data
    of the weight, set by :func:`jaxlora.weights.prepare`): ``a``, ``b`` (and DoRA's
    ``magnitude``) constrained to these specs on ``mesh``, one layer's (the layer axis of
    stacked parameters dropped). They are the factors' stored specs without ``fsdp``: FSDP
    gathers each factor where it is used, as it does the base, and reduce-scatters its gradient.
    Left to itself XLA may instead move the activations to where a split factor lies (seen on
    the GPU: the whole batch's activations all-gathered, +2.5 GiB at Llama-3.1-8B, S = 8192)."""

    mesh: Mesh | AbstractMesh
    a: PartitionSpec
    b: PartitionSpec
    magnitude: PartitionSpec | None = None

    def place(self, x: jax.Array | None, spec: PartitionSpec | None) -> jax.Array | None:
        if x is None or spec is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def _dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    # torch.nn.Dropout: zero with probability p, scale the survivors by 1/(1-p).
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


@jax.tree_util.register_pytree_with_keys_class
class LoRAWeight:
    """A frozen ``[out, in]`` base plus a low-rank update: ``W₀ + s·B·A``, never materialized.

    Leaves: ``base`` (array or ``NF4Tensor``, ``[out, in]``), ``a [r, in]``, ``b [out, r]``,
    ``magnitude [out]`` (DoRA only, else ``None``). Static: ``scale`` (s), ``dropout`` (rate),
    ``use_dora``, ``fuse`` (base and adapter as one matmul where that applies: set by
    :func:`jaxlora.weights.prepare` from the program's kernels), ``use`` (a sharded program's
    :class:`FactorUse`, also set by ``prepare``; None: as they are). :func:`partition` builds
    halves with ``None`` in place of the other side's leaves; :func:`combine` joins them.
    """

    _LEAVES = ("base", "a", "b", "magnitude")

    def __init__(
        self,
        base,
        a,
        b,
        magnitude=None,
        *,
        scale: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        fuse: bool = False,
        use: FactorUse | None = None,
    ):
        self.base, self.a, self.b, self.magnitude = base, a, b, magnitude
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.use_dora = bool(use_dora)
        self.fuse = bool(fuse)
        self.use = use

    def _aux(self) -> tuple[float, float, bool, bool, FactorUse | None]:
        return (self.scale, self.dropout, self.use_dora, self.fuse, self.use)

    def tree_flatten_with_keys(self):
        children = [(jax.tree_util.GetAttrKey(k), getattr(self, k)) for k in self._LEAVES]
        return children, self._aux()

    def tree_flatten(self):
        return tuple(getattr(self, k) for k in self._LEAVES), self._aux()

    @classmethod
    def tree_unflatten(cls, aux, children):
        scale, dropout, use_dora, fuse, use = aux
        return cls(*children, scale=scale, dropout=dropout, use_dora=use_dora, fuse=fuse, use=use)

    def replace(self, **kw: Any) -> LoRAWeight:
        fields = {k: getattr(self, k) for k in self._LEAVES}
        fields |= {
            "scale": self.scale,
            "dropout": self.dropout,
            "use_dora": self.use_dora,
            "fuse": self.fuse,
            "use": self.use,
        }
        return LoRAWeight(**(fields | kw))

    def staged(self) -> LoRAWeight:
        """The same weight with its base ready for several products in a row (``staged``)."""
        return self.replace(base=staged(self.base))

    def _factors(self) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """``a``, ``b`` and the magnitude where the program multiplies them (:class:`FactorUse`)."""
        u = self.use
        if u is None:
            return self.a, self.b, self.magnitude
        return u.place(self.a, u.a), u.place(self.b, u.b), u.place(self.magnitude, u.magnitude)

    @property
    def shape(self) -> tuple[int, int]:
        if self.base is not None:
            return tuple(self.base.shape)
        return (int(self.b.shape[0]), int(self.a.shape[1]))

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def __repr__(self) -> str:
        base = "None" if self.base is None else type(self.base).__name__
        r = None if self.a is None else self.rank
        return (
            f"LoRAWeight(shape={self.shape}, r={r}, scale={self.scale:g}, "
            f"dropout={self.dropout:g}, use_dora={self.use_dora}, base={base})"
        )

    def matmul(self, x: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """``x [..., in] -> [..., out]`` in ``x.dtype``, as ``peft.tuners.lora.Linear.forward``.

        Plain: ``base(x) + s·B(A(dropout(x)))``. The LoRA branch runs in the adapter's dtype (x is
        cast to it first) and the sum is taken in the promoted dtype before casting back. When
        base, adapter and input share one dtype and the base is dense (or an NF4 base is
        dequantized for a plain dot anyway), base and adapter run as one matmul
        (:func:`_lora_dense`), which is the same sum.
        DoRA (``DoraLinearLayer.forward``): with ``n = ‖W + s·B·A‖`` per output row, detached,
        ``base(x) + (m/n − 1)·base(x_d) + (m/n)·s·B(A(x_d))`` where ``x_d`` is the dropped-out
        input; without dropout ``base(x_d)`` is the base output already computed (no bias: the
        bias is added by ``dense`` outside this call, as PEFT subtracts it).
        """
        if self.base is None or self.a is None or self.b is None:
            raise ValueError("LoRAWeight.matmul on a partitioned half: combine() it first")
        a, b, magnitude = self._factors()
        lora_dtype = a.dtype
        xl = x.astype(lora_dtype)
        dropped = rng is not None and self.dropout > 0.0
        if dropped:
            xl = _dropout(xl, self.dropout, rng)
        flat = xl.reshape(-1, xl.shape[-1])
        w = None if self.use_dora else fusable_base(self.base, x, a, b, self.fuse)
        if w is not None:
            y = _lora_dense(x.reshape(flat.shape), flat, w, a, b, self.scale)
            return y.reshape(*x.shape[:-1], -1)
        y = dense(x, self.base)  # (..., out) in x.dtype
        if not self.use_dora:
            lora = _lora_branch(flat, a, b, self.scale).reshape(*xl.shape[:-1], -1)
            return (y + lora).astype(x.dtype)
        lora = jnp.einsum("...i,ri->...r", xl, a)
        lora = jnp.einsum("...r,or->...o", lora, b)  # (..., out)
        w = dense_weight(self.base, lora_dtype)
        delta = jax.lax.stop_gradient(b @ a)
        norm = jax.lax.stop_gradient(jnp.linalg.norm(w + self.scale * delta, axis=1))
        mag = magnitude.astype(lora_dtype) / norm  # (out,)
        base_term = jnp.einsum("...i,oi->...o", xl, w) if dropped else y
        return (y + ((mag - 1) * base_term + mag * lora * self.scale)).astype(x.dtype)

    def merged(self, dtype: Any = None) -> jax.Array:
        """``W₀ + s·B·A`` computed in float32 (DoRA: ``m/‖W₀ + s·B·A‖ · (W₀ + s·B·A)``), cast to
        ``dtype`` (default: the base's dtype; an NF4 base's is the dtype it dequantizes to)."""
        w = dense_weight(self.base, jnp.float32)
        w = w + self.scale * (self.b.astype(jnp.float32) @ self.a.astype(jnp.float32))
        if self.use_dora:
            norm = jnp.linalg.norm(w, axis=1)
            w = (self.magnitude.astype(jnp.float32) / norm)[:, None] * w
        return w.astype(jnp.dtype(self.base.dtype) if dtype is None else dtype)
