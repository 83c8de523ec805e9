"""The one projection every model layer calls: ``dense(x, w)``.

Model code never asks what kind of weight it holds. Weights are values:

* a ``jax.Array`` in torch orientation ``[out, in]``  -> ``x @ wᵀ``
* any other weight type (``NF4Tensor``, ``LoRAWeight``) implements ``matmul(x, *, rng)``
  returning ``x @ Wᵀ`` for the ``[out, in]`` matrix it stands for.

Keeping torch orientation everywhere makes the Hugging Face key table the identity (no
transposes on load or export) and keeps NF4's 64-element blocks running along the contracted
``in`` axis, which is what the dequant-matmul kernels want.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

# Floating dtypes by the names configs and checkpoints use ("float32", "bfloat16", "float16").
FLOAT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@runtime_checkable
class Weight(Protocol):
    """A weight that is not a plain array: it knows how to multiply an input by itself."""

    shape: tuple[int, ...]

    def matmul(self, x: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """``x [..., in] -> x @ Wᵀ [..., out]`` in ``x.dtype``."""
        ...


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
