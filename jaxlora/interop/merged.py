"""Merged export: a plain Hugging Face checkpoint with the adapter folded into the weights.

``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads the result with no PEFT
involved. Each LoRA weight becomes ``W + s·B·A`` computed in float32 (DoRA: scaled by
``m/‖W + s·B·A‖``), which is what ``PeftModel.merge_and_unload()`` computes, and is cast to the
export dtype once. 4-bit (NF4) bases are dequantized: a merged checkpoint is dense.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxlora.dtypes import FLOAT_DTYPES
from jaxlora.interop.hf import Generation, save_pretrained
from jaxlora.lora import merge
from jaxlora.lora.targets import EMBEDDINGS
from jaxlora.models.config import LlamaConfig
from jaxlora.weights import LoRAWeight, Quantized, dense_weight

log = logging.getLogger(__name__)


def merged_params(params: dict, *, dtype: Any = jnp.float32) -> dict:
    """Every weight as a dense ``dtype`` array: LoRA weights merged (in float32), NF4 weights
    dequantized, arrays cast. The input tree may mix all three."""

    def dense(path: str, leaf: Any) -> Any:
        if isinstance(leaf, jax.Array | np.ndarray | Quantized):
            return dense_weight(leaf, jnp.float32).astype(dtype)
        raise TypeError(f"merged_params: cannot export {path} of type {type(leaf).__name__}")

    flat = flatten_dict(merge(params, dtype=jnp.float32), sep=".")
    return unflatten_dict({k: dense(k, v) for k, v in flat.items()}, sep=".")


def param_dtype(params: dict) -> str:
    """The dtype name of the unquantized weights (embeddings are never quantized)."""
    ends = tuple(f"{name}.weight" for name in EMBEDDINGS)
    leaf = next(v for k, v in flatten_dict(params, sep=".").items() if k.endswith(ends))
    return jnp.dtype(leaf.dtype).name


def save_merged(
    params: dict,
    config: LlamaConfig,
    directory: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    generation: Generation | None = None,
) -> Path:
    """Write ``params`` (LoRA applied or not, NF4 or dense) as a merged HF checkpoint:
    ``config.json`` + sharded safetensors, with ``generation``'s token ids and
    ``generation_config.json``. ``Model.save_merged`` adds the tokenizer files.

    ``dtype``: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default the dtype the
    unquantized weights are stored in.
    """
    dtype = dtype or param_dtype(params)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"save_merged: dtype={dtype!r}; expected one of {sorted(FLOAT_DTYPES)}")
    flat = flatten_dict(params, sep=".")
    n_lora = sum(isinstance(v, LoRAWeight) for v in flat.values())
    log.info("merged export to %s: %d LoRA weights folded in, dtype %s", directory, n_lora, dtype)
    dense = merged_params(params, dtype=jnp.float32)  # save_pretrained casts once
    return save_pretrained(
        dense,
        config,
        directory,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        generation=generation,
    )
