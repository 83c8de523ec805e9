"""Floating dtypes by the names configs and checkpoints use: the one table jaxlora keeps.

``"float32"``, ``"bfloat16"``, ``"float16"`` are what ``config.json`` (``dtype``/``torch_dtype``),
recipes (``model.dtype``), PEFT/bitsandbytes metadata and our exports say. The values are
``jax.numpy`` scalar types, which numpy accepts too (``jnp.bfloat16`` is ``ml_dtypes.bfloat16``).
"""

from __future__ import annotations

import jax.numpy as jnp

FLOAT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FLOAT_DTYPE_NAMES = tuple(FLOAT_DTYPES)


def float_dtype(name: str, where: str = "dtype"):
    """The dtype called ``name``; a :class:`ValueError` naming ``where`` for anything else."""
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{where}={name!r}: expected one of {', '.join(FLOAT_DTYPE_NAMES)}")
    return FLOAT_DTYPES[name]
