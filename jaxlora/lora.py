"""LoRA with PEFT's semantics, as pure functions of parameter trees.

``x ↦ W₀x + s·B(A(dropout(x)))`` with ``A [r, in]``, ``B [out, r]`` and ``s = α/r`` (``α/√r`` with
rsLoRA), Hu et al. 2021 (arXiv:2106.09685); DoRA, Liu et al. 2024 (arXiv:2402.09353). Names,
defaults and matching rules follow ``peft`` 0.21.2 (``peft/tuners/lora/{config,layer,dora}.py``,
``peft/tuners/tuners_utils.py``), so an adapter moves between jaxlora and PEFT unchanged.

The vocabulary is lorax/levanter's: :func:`inject` wraps targeted weights in :class:`LoRAWeight`
(the model's ``dense`` dispatch does the rest), :func:`partition`/:func:`combine` split the tree
into frozen and trainable halves (gradients and optimizer state exist only for the latter),
:func:`merge`/:func:`unmerge` fold the adapter into the base and back. Which modules are targeted
and how A and B start is in :mod:`jaxlora.lora_init`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.lora_config import (  # noqa: F401  (re-exported: jaxlora.lora is the public face)
    BIAS_MODES,
    DTYPES,
    INITS,
    LoraConfig,
    LoraConfigError,
    LoraError,
    to_meta,
)
from jaxlora.ops import dense

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


def dense_weight(w: Any, dtype: Any) -> jax.Array:
    """The ``[out, in]`` matrix a weight stands for: an array cast, or anything with
    ``.dequantize(dtype)`` (``NF4Tensor``) dequantized."""
    if isinstance(w, jax.Array | np.ndarray):
        return jnp.asarray(w).astype(dtype)
    if hasattr(w, "dequantize"):
        return w.dequantize(dtype)
    raise TypeError(f"cannot materialize a {type(w).__name__} weight as a dense matrix")


def weight_dtype(w: Any) -> Any:
    """The dtype a base weight computes in (an NF4Tensor: the dtype it dequantizes to)."""
    return jnp.dtype(w.dtype)


def _fusable_base(base: Any, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array | None:
    """The dense ``[out, in]`` base to run with the adapter as one matmul (:func:`_lora_dense`),
    or ``None``.

    It applies on CPU, where it was measured (docs/benchmarks.md), when input, base and adapter
    share one dtype, the base is an array or an ``NF4Tensor`` on its dequantize-then-dot path,
    and there are at least as many tokens as input features (``[x | s·h]·[W | B]ᵀ`` copies
    ``W`` each call: worth it only then). Elsewhere the rank-r branch runs beside the base: on
    GPU and TPU (not measured there), with an NF4 base that has a fused kernel, and for a
    float32 adapter on a bf16 base (PEFT's mixed-precision sum).
    """
    if jax.default_backend() != "cpu":  # measured faster on CPU only (docs/benchmarks.md)
        return None
    if not x.dtype == a.dtype == b.dtype:
        return None
    if x.size // x.shape[-1] < x.shape[-1]:  # few tokens (decoding): copying W costs more
        return None
    if isinstance(base, jax.Array):
        return base if base.dtype == x.dtype else None
    if hasattr(base, "fallback_weight"):
        return base.fallback_weight(x.dtype, x.shape)
    return None


def _dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    # torch.nn.Dropout: zero with probability p, scale the survivors by 1/(1-p).
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


@jax.tree_util.register_pytree_with_keys_class
class LoRAWeight:
    """A frozen ``[out, in]`` base plus a low-rank update: ``W₀ + s·B·A``, never materialized.

    Leaves: ``base`` (array or ``NF4Tensor``, ``[out, in]``), ``a [r, in]``, ``b [out, r]``,
    ``magnitude [out]`` (DoRA only, else ``None``). Static: ``scale`` (s), ``dropout`` (rate),
    ``use_dora``. :func:`partition` builds halves with ``None`` in place of the other side's
    leaves; :func:`combine` puts them back together.
    """

    _LEAVES = ("base", "a", "b", "magnitude")

    def __init__(self, base, a, b, magnitude=None, *, scale: float, dropout: float = 0.0,
                 use_dora: bool = False):  # fmt: skip
        self.base, self.a, self.b, self.magnitude = base, a, b, magnitude
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.use_dora = bool(use_dora)

    def _aux(self) -> tuple[float, float, bool]:
        return (self.scale, self.dropout, self.use_dora)

    def tree_flatten_with_keys(self):
        children = [(jax.tree_util.GetAttrKey(k), getattr(self, k)) for k in self._LEAVES]
        return children, self._aux()

    def tree_flatten(self):
        return tuple(getattr(self, k) for k in self._LEAVES), self._aux()

    @classmethod
    def tree_unflatten(cls, aux, children):
        scale, dropout, use_dora = aux
        return cls(*children, scale=scale, dropout=dropout, use_dora=use_dora)

    def replace(self, **kw: Any) -> LoRAWeight:
        fields = {k: getattr(self, k) for k in self._LEAVES}
        fields |= {"scale": self.scale, "dropout": self.dropout, "use_dora": self.use_dora}
        return LoRAWeight(**(fields | kw))

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
        return (f"LoRAWeight(shape={self.shape}, r={r}, scale={self.scale:g}, "
                f"dropout={self.dropout:g}, use_dora={self.use_dora}, base={base})")  # fmt: skip

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
        lora_dtype = self.a.dtype
        xl = x.astype(lora_dtype)
        dropped = rng is not None and self.dropout > 0.0
        if dropped:
            xl = _dropout(xl, self.dropout, rng)
        flat = xl.reshape(-1, xl.shape[-1])
        w = None if self.use_dora else _fusable_base(self.base, x, self.a, self.b)
        if w is not None:
            y = _lora_dense(x.reshape(flat.shape), flat, w, self.a, self.b, self.scale)
            return y.reshape(*x.shape[:-1], -1)
        y = dense(x, self.base)  # (..., out) in x.dtype
        if not self.use_dora:
            lora = _lora_branch(flat, self.a, self.b, self.scale).reshape(*xl.shape[:-1], -1)
            return (y + lora).astype(x.dtype)
        lora = jnp.einsum("...i,ri->...r", xl, self.a)
        lora = jnp.einsum("...r,or->...o", lora, self.b)  # (..., out)
        w = dense_weight(self.base, lora_dtype)
        delta = jax.lax.stop_gradient(self.b @ self.a)
        norm = jax.lax.stop_gradient(jnp.linalg.norm(w + self.scale * delta, axis=1))
        mag = self.magnitude.astype(lora_dtype) / norm  # (out,)
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
        return w.astype(weight_dtype(self.base) if dtype is None else dtype)


# ---- tree functions -----------------------------------------------------------------------------


def _map(tree: dict, fn, path: str = "") -> dict:
    """Rebuild a nested dict, calling ``fn(path, leaf)`` on every non-dict value."""
    return {
        k: _map(v, fn, f"{path}{k}.") if isinstance(v, dict) else fn(f"{path}{k}", v)
        for k, v in tree.items()
    }


def inject(params: dict, cfg: LoraConfig, key: jax.Array) -> dict:
    """Wrap every weight ``cfg`` targets in a :class:`LoRAWeight`; everything else is unchanged.

    ``params`` is the Hugging Face-shaped tree (arrays or ``NF4Tensor`` weights). Matching,
    ranks, scales and the initial A, B (and, for PiSSA/LoftQ, the new base) come from
    :mod:`jaxlora.lora_init`. Raises :class:`LoraConfigError` for a target that matches nothing
    (listing the modules there are) or a module LoRA cannot wrap.
    """
    from jaxlora import lora_init

    targets = lora_init.resolve_targets(params, cfg, strict=True)
    lora_init.check_modules_to_save(params, cfg)
    keys = dict(zip(sorted(targets), jax.random.split(key, len(targets)), strict=True))
    dtype = DTYPES[cfg.dtype]

    def wrap(path: str, leaf: Any) -> Any:
        module, name = path.rsplit(".", 1)
        if name != "weight" or module not in targets:
            return leaf
        r, _ = targets[module]
        scale = cfg.scale(module)
        base, a, b = lora_init.init_lora(cfg, leaf, r, scale, keys[module], dtype, where=module)
        magnitude = lora_init.dora_magnitude(base, a, b, scale, dtype) if cfg.use_dora else None
        return LoRAWeight(base, a, b, magnitude, scale=scale, dropout=cfg.dropout,
                          use_dora=cfg.use_dora)  # fmt: skip

    return _map(params, wrap)


def _is_trainable_leaf(path: str, leaf: Any, lora_modules: set[str], saved: set[str], bias: str):
    module, name = path.rsplit(".", 1) if "." in path else ("", path)
    prefixes = module.split(".")
    if any(".".join(prefixes[:i]) in saved for i in range(1, len(prefixes) + 1)):
        return True
    if name == "bias":
        return bias == "all" or (bias == "lora_only" and module in lora_modules)
    return False


def partition(params: dict, cfg: LoraConfig) -> tuple[dict, dict]:
    """``params -> (frozen, trainable)``, two trees of the same shape with ``None`` holes.

    Trainable: every LoRA ``a``, ``b`` and DoRA ``magnitude``; biases per ``cfg.bias``; every
    leaf of a ``modules_to_save`` module. A LoRA weight splits into a half with only ``base``
    and a half with only ``a``/``b``/``magnitude``. ``None`` is an empty pytree, so
    ``jax.grad``/optax over ``trainable`` see exactly the trainable arrays.
    """
    from jaxlora import lora_init

    flat = _flatten(params)
    lora_modules = {p.rsplit(".", 1)[0] for p, v in flat.items() if isinstance(v, LoRAWeight)}
    saved = lora_init.modules_to_save_paths(params, cfg)

    def split(path: str, leaf: Any, want_trainable: bool) -> Any:
        if isinstance(leaf, LoRAWeight):
            if want_trainable:
                return leaf.replace(base=None)
            return leaf.replace(a=None, b=None, magnitude=None)
        trainable = _is_trainable_leaf(path, leaf, lora_modules, saved, cfg.bias)
        return leaf if trainable == want_trainable else None

    frozen = _map(params, lambda p, v: split(p, v, False))
    trainable = _map(params, lambda p, v: split(p, v, True))
    return frozen, trainable


def combine(frozen: dict, trainable: dict) -> dict:
    """Inverse of :func:`partition`: fill each tree's ``None`` holes from the other."""

    def join(f: Any, t: Any, path: str) -> Any:
        if isinstance(f, dict) and isinstance(t, dict):
            if f.keys() != t.keys():
                raise ValueError(f"combine: keys differ under {path or '<root>'!r}")
            return {k: join(f[k], t[k], f"{path}{k}.") for k in f}
        if isinstance(f, LoRAWeight) and isinstance(t, LoRAWeight):
            return f.replace(a=t.a, b=t.b, magnitude=t.magnitude)
        if f is None:
            return t
        if t is None:
            return f
        raise ValueError(f"combine: {path.rstrip('.')!r} is set in both trees")

    return join(frozen, trainable, "")


def merge(params: dict, *, dtype: Any = None) -> dict:
    """Fold every :class:`LoRAWeight` into a plain ``[out, in]`` array (see ``LoRAWeight.merged``).

    The sum is taken in float32 (PEFT's ``merge_and_unload`` adds the float32 delta in place).
    An NF4 base is dequantized and the merged weight returned dense: requantizing ``W + s·B·A``
    to 4 bits would lose most of the update, so merging never writes back into NF4.
    """
    return _map(params, lambda p, v: v.merged(dtype) if isinstance(v, LoRAWeight) else v)


def unmerge(merged: dict, adapters: dict) -> dict:
    """Inverse of :func:`merge` for plain-array bases: ``W₀ = W − s·B·A`` (in float32).

    ``adapters`` holds the :class:`LoRAWeight` leaves to take out (the pre-merge params, or the
    trainable half from :func:`partition`). DoRA cannot be unmerged without the pre-merge norm
    ``‖W₀ + s·B·A‖``, which the merged weight no longer determines (PEFT caches it), so it raises.
    """
    lora = {p: v for p, v in _flatten(adapters).items() if isinstance(v, LoRAWeight)}
    flat = _flatten(merged)
    missing = sorted(set(lora) - set(flat))
    if missing:
        raise ValueError(f"unmerge: merged params have no weight at {missing[:4]}")

    def restore(path: str, leaf: Any) -> Any:
        if path not in lora:
            return leaf
        lw = lora[path]
        if lw.use_dora:
            raise ValueError(f"unmerge: {path} is DoRA; its merge cannot be inverted")
        if not isinstance(leaf, jax.Array | np.ndarray):
            raise ValueError(f"unmerge: {path} is a {type(leaf).__name__}, not a merged array")
        delta = lw.scale * (lw.b.astype(jnp.float32) @ lw.a.astype(jnp.float32))
        base = (jnp.asarray(leaf, jnp.float32) - delta).astype(leaf.dtype)
        return lw.replace(base=base)

    return _map(merged, restore)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    from jaxlora.hf import flatten

    return flatten(tree, prefix)
