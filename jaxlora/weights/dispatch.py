"""The one projection every model layer calls, ``dense(x, w)``, and every decision about how a
weight is multiplied.

Model code never asks what kind of weight it holds. Weights are values:

* a ``jax.Array`` in torch orientation ``[out, in]``  -> ``x @ wᵀ``
* any other weight type (``NF4Tensor``, ``LoRAWeight``) implements ``matmul(x, *, rng)``
  returning ``x @ Wᵀ`` for the ``[out, in]`` matrix it stands for.

Keeping torch orientation everywhere makes the Hugging Face key table the identity (no
transposes on load or export) and keeps NF4's 64-element blocks running along the contracted
``in`` axis, which is what the dequant-matmul kernels want.

Which path a product takes is decided here and nowhere else: whether a 4-bit weight goes
through the fused Pallas kernel or is dequantized for a plain dot (:func:`kernel_applies`,
:func:`dequantized_operand`), and whether a LoRA weight runs base and adapter as one matmul
(:func:`fusable_base`). The weight types only state facts (layout, block size, dtype).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import kernels

log = logging.getLogger(__name__)


@runtime_checkable
class Weight(Protocol):
    """A weight that is not a plain array: it knows how to multiply an input by itself."""

    shape: tuple[int, ...]

    def matmul(self, x: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """``x [..., in] -> x @ Wᵀ [..., out]`` in ``x.dtype``."""
        ...


@runtime_checkable
class Quantized(Protocol):
    """A packed weight (``NF4Tensor``): what the dispatch needs to know about it."""

    shape: tuple[int, ...]
    blocksize: int

    @property
    def is_2d(self) -> bool: ...

    def dequantize(self, dtype: Any = None) -> jax.Array: ...


def dense(
    x: jax.Array,
    w: jax.Array | Weight,
    bias: jax.Array | None = None,
    *,
    rng: jax.Array | None = None,
) -> jax.Array:
    """``x [..., in] ↦ x @ wᵀ + bias`` with ``w`` of shape ``[out, in]``, computed in ``x.dtype``.

    ``rng`` is only consumed by weights with randomness in their forward pass (LoRA dropout);
    ``None`` means deterministic.
    """
    if isinstance(w, jax.Array | np.ndarray):
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    else:
        y = w.matmul(x, rng=rng)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def dense_weight(w: Any, dtype: Any) -> jax.Array:
    """The ``[out, in]`` matrix a weight stands for: an array cast, a packed weight dequantized."""
    if isinstance(w, jax.Array | np.ndarray):
        return jnp.asarray(w).astype(dtype)
    if isinstance(w, Quantized):
        return w.dequantize(dtype)
    raise TypeError(f"cannot materialize a {type(w).__name__} weight as a dense matrix")


# ---- 4-bit weights: fused kernel or dequantize-then-dot -----------------------------------------


def kernel_applies(is_2d: bool, blocksize: int) -> tuple[bool, str]:
    """``(use_kernel, reason)`` for an NF4 matmul; ``reason`` says why not, for the log.

    The kernel mode is :mod:`jaxlora.kernels`' (``auto`` runs kernels on GPU and TPU only).
    """
    mode = kernels.get_mode()
    if mode == "off":
        return False, "kernel mode 'off'"
    if mode == "auto" and jax.default_backend() not in ("gpu", "tpu"):
        return False, f"kernel mode 'auto' on {jax.default_backend()}: no compiled kernel"
    if not is_2d:
        return False, "in_features not a multiple of blocksize (flat layout)"
    if blocksize not in kernels.KERNEL_BLOCKSIZES:
        return False, f"blocksize {blocksize} not in {kernels.KERNEL_BLOCKSIZES}"
    return True, ""


_FALLBACK_LOGGED: set[tuple] = set()


def dequantized_operand(w: Quantized, dtype: Any, x_shape: tuple[int, ...]) -> jax.Array | None:
    """``None`` when the fused dequant-matmul kernel computes ``x @ Wᵀ``; otherwise the
    dequantized ``[out, in]`` weight in ``dtype`` (no gradient) for a plain dot, with the
    reason logged once per shape."""
    use, reason = kernel_applies(w.is_2d, w.blocksize)
    if use:
        return None
    key = (tuple(w.shape), tuple(x_shape), reason)
    if key not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add(key)
        log.info("NF4 %s x %s: dequantize-then-dot (%s)", x_shape, w.shape, reason)
    return jax.lax.stop_gradient(w.dequantize(dtype))


# ---- LoRA: base and adapter as one matmul, or side by side --------------------------------------


def fusable_base(base: Any, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array | None:
    """The dense ``[out, in]`` base to run with the adapter as one matmul
    (``[x | s·xAᵀ]·[W | B]ᵀ``), or ``None`` to run the rank-r branch beside the base.

    It applies on CPU, where it was measured (docs/benchmarks.md), when input, base and adapter
    share one dtype, the base is an array or a packed weight on its dequantize-then-dot path,
    and there are at least as many tokens as input features (the concatenation copies ``W``
    each call: worth it only then). Elsewhere the branch runs beside the base: on GPU and TPU
    (not measured there), with a packed base that has a fused kernel, and for a float32 adapter
    on a bf16 base (PEFT's mixed-precision sum).
    """
    if jax.default_backend() != "cpu":  # measured faster on CPU only (docs/benchmarks.md)
        return None
    if not x.dtype == a.dtype == b.dtype:
        return None
    if x.size // x.shape[-1] < x.shape[-1]:  # few tokens (decoding): copying W costs more
        return None
    if isinstance(base, jax.Array):
        return base if base.dtype == x.dtype else None
    if isinstance(base, Quantized):
        return dequantized_operand(base, x.dtype, x.shape)
    return None
