"""How LoRA starts: A and B (and, for PiSSA / LoftQ, a new base) for one targeted weight.

Initialisations follow PEFT 0.21.2's ``LoraLayer.reset_lora_parameters`` / ``pissa_init`` and
LoftQ (Li et al. 2023, arXiv:2310.08659; ``peft.utils.loftq_utils.loftq_init``); PiSSA is Meng
et al. 2024 (arXiv:2404.02948); DoRA's magnitude is ``DoraLinearLayer.update_layer``'s.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config.lora import LOFTQ_QUANT, LoraConfig, LoraConfigError
from jaxlora.dtypes import FLOAT_DTYPES
from jaxlora.weights.dispatch import dense_weight
from jaxlora.weights.lora import LoRAWeight
from jaxlora.weights.nf4 import quantize


def _svd_factors(w: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """``(B [out, r], A [r, in])`` with ``s·B·A`` the best rank-r approximation of ``w``.

    PEFT's ``pissa_init``: ``A = diag(√(S_r/s))·Vhᵣ``, ``B = Uᵣ·diag(√(S_r/s))``.
    """
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[:r] / scale)
    return u[:, :r] * root[None, :], root[:, None] * vh[:r]


def _svd_lowrank_factors(w, r: int, scale: float, niter: int, key) -> tuple[jax.Array, jax.Array]:
    """Randomized range finder with ``niter`` subspace iterations (Halko et al. 2011, Alg. 4.4;
    what ``torch.svd_lowrank`` computes for ``q=r``), then the factors of :func:`_svd_factors`."""
    q, _ = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], r), w.dtype))
    for _ in range(niter):
        q, _ = jnp.linalg.qr(w.T @ q)
        q, _ = jnp.linalg.qr(w @ q)
    b, a = _svd_factors(q.T @ w, r, scale)  # (r, in) has the same top-r spectrum
    return q @ b, a


def _float_base(weight: Any, init: str, where: str) -> jax.Array:
    if not isinstance(weight, jax.Array | np.ndarray):
        raise LoraConfigError(
            f"lora.init={init!r} needs the unquantized weight, but {where} is a "
            f"{type(weight).__name__}; load the model unquantized"
            + (" (LoftQ quantizes the base itself)" if init == "loftq" else "")
        )
    return jnp.asarray(weight, jnp.float32)


def init_lora(
    cfg: LoraConfig, weight: Any, r: int, scale: float, key: jax.Array, dtype: Any, *, where: str
) -> tuple[Any, jax.Array, jax.Array]:
    """``(base, A [r, in], B [out, r])`` for one ``[out, in]`` weight, per ``cfg.init``.

    ``base`` is ``weight`` unchanged, except PiSSA (``W − s·B·A``, same dtype) and LoftQ (an
    ``NF4Tensor`` of ``W − s·B·A``).
    """
    out, inn = weight.shape
    k_a, k_b = jax.random.split(key)
    init = cfg.init
    uses_svd = init in ("pissa", "loftq") or init.startswith("pissa_niter_")
    if uses_svd and r > min(out, inn):
        raise LoraConfigError(f"lora.r={r} exceeds min{weight.shape} of {where} for {init!r}")
    if init in ("default", "random", "gaussian"):
        if init == "gaussian":  # nn.init.normal_(A, std=1/r)
            a = jax.random.normal(k_a, (r, inn), jnp.float32) / r
        else:  # kaiming_uniform_(a=√5) on a [r, in] matrix: U(±1/√in)
            bound = 1.0 / math.sqrt(inn)
            a = jax.random.uniform(k_a, (r, inn), jnp.float32, -bound, bound)
        if init == "random":  # init_lora_weights=False keeps nn.Linear's default for B too
            bound = 1.0 / math.sqrt(r)
            b = jax.random.uniform(k_b, (out, r), jnp.float32, -bound, bound)
        else:
            b = jnp.zeros((out, r), jnp.float32)
        return weight, a.astype(dtype), b.astype(dtype)
    w = _float_base(weight, init, where)
    if init == "pissa":
        b, a = _svd_factors(w, r, scale)
    elif init.startswith("pissa_niter_"):
        b, a = _svd_lowrank_factors(w, r, scale, int(init.rsplit("_", 1)[1]), k_a)
    elif init == "loftq":
        return _loftq(w, weight.dtype, r, scale, cfg.loftq_iters, dtype)
    else:  # LoraConfig validates init; reaching here is a bug
        raise AssertionError(init)
    a, b = a.astype(dtype), b.astype(dtype)
    base = (w - scale * (b.astype(jnp.float32) @ a.astype(jnp.float32))).astype(weight.dtype)
    return base, a, b


def _loftq(w: jax.Array, base_dtype, r: int, scale: float, iters: int, dtype) -> tuple:
    """Alternate ``Q = NF4(W − s·B·A)`` and ``s·B·A = SVD_r(W − deq(Q))``, ``iters`` times.

    As ``peft.utils.loftq_utils.loftq_init``, except that the factors are divided by the scale
    (PEFT uses ``B·A ≈ W − Q`` and is exact only when ``s = 1``); here ``Q + s·B·A ≈ W`` for any
    ``alpha / r``.
    """
    res = w
    for i in range(iters):
        q = quantize(res.astype(base_dtype), **LOFTQ_QUANT)
        b, a = _svd_factors(w - q.dequantize(jnp.float32), r, scale)
        if i + 1 == iters:
            break
        res = w - scale * (b @ a)
    return q, a.astype(dtype), b.astype(dtype)


def dora_magnitude(base: Any, a: jax.Array, b: jax.Array, scale: float, dtype: Any) -> jax.Array:
    """DoRA's initial magnitude ``m = ‖W + s·B·A‖`` per output row, in float32
    (``DoraLinearLayer.update_layer``; an NF4 base is dequantized first)."""
    w = dense_weight(base, jnp.float32)
    w = w + scale * (b.astype(jnp.float32) @ a.astype(jnp.float32))
    return jnp.linalg.norm(w, axis=1).astype(dtype)


def module_keys(targets: Any, key: jax.Array) -> dict[str, jax.Array]:
    """One key per targeted module path, dealt in sorted path order: a module's A and B depend
    on the key and the set of targets only, not on how the tree is laid out."""
    return dict(zip(sorted(targets), jax.random.split(key, len(targets)), strict=True))


def changes_base(cfg: LoraConfig) -> bool:
    """Whether :func:`init_lora` returns a new base (PiSSA, LoftQ) rather than the weight."""
    return cfg.init in ("pissa", "loftq") or cfg.init.startswith("pissa_niter_")


def reads_weight(cfg: LoraConfig) -> bool:
    """Whether initialising reads the weight's values (PiSSA, LoftQ, DoRA's magnitude); the
    other inits need only its shape."""
    return changes_base(cfg) or cfg.use_dora


def wrap(cfg: LoraConfig, module: str, weight: Any, r: int, key: jax.Array) -> LoRAWeight:
    """``weight`` (of ``module``) as a :class:`LoRAWeight` of rank ``r``, initialised per
    ``cfg`` from ``key``. When :func:`reads_weight` is false ``weight`` may be its shape (a
    ``ShapeDtypeStruct``), which then stands as the base."""
    dtype = FLOAT_DTYPES[cfg.dtype]
    scale = cfg.scale(module)
    base, a, b = init_lora(cfg, weight, r, scale, key, dtype, where=module)
    magnitude = dora_magnitude(base, a, b, scale, dtype) if cfg.use_dora else None
    return LoRAWeight(
        base, a, b, magnitude, scale=scale, dropout=cfg.dropout, use_dora=cfg.use_dora
    )
