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

from jaxlora import hf
from jaxlora.lora import LoRAWeight, dense_weight, merge

log = logging.getLogger(__name__)


def merged_params(params: dict, *, dtype: Any = jnp.float32) -> dict:
    """Every weight as a dense ``dtype`` array: LoRA weights merged (in float32), NF4 weights
    dequantized, arrays cast. The input tree may mix all three."""
    merged = merge(params, dtype=jnp.float32)

    def dense(path: str, leaf: Any) -> Any:
        if isinstance(leaf, dict):
            return {k: dense(f"{path}.{k}", v) for k, v in leaf.items()}
        if isinstance(leaf, jax.Array | np.ndarray):
            return jnp.asarray(leaf).astype(dtype)
        if hasattr(leaf, "dequantize"):
            return dense_weight(leaf, jnp.float32).astype(dtype)
        raise TypeError(f"merged_params: cannot export {path} of type {type(leaf).__name__}")

    return {k: dense(k, v) for k, v in merged.items()}


def _param_dtype(params: dict) -> str:
    """The dtype name of the unquantized weights (embeddings are never quantized)."""
    leaf = params["model"]["embed_tokens"]["weight"]
    return jnp.dtype(leaf.dtype).name


def save_merged(
    model: Any,
    directory: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``model`` (a :class:`jaxlora.Model`, LoRA applied or not) as a merged HF checkpoint:
    ``config.json`` + sharded safetensors (+ the tokenizer files when the model has a tokenizer).

    ``dtype``: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default the dtype the model's
    unquantized weights are stored in.
    """
    dtype = dtype or _param_dtype(model.params)
    if dtype not in hf.DTYPES:
        raise ValueError(f"save_merged: dtype={dtype!r}; expected one of {sorted(hf.DTYPES)}")
    n_lora = sum(isinstance(v, LoRAWeight) for v in hf.flatten(model.params).values())
    log.info("merged export to %s: %d LoRA weights folded in, dtype %s", directory, n_lora, dtype)
    params = merged_params(model.params, dtype=jnp.float32)  # save_pretrained casts once
    directory = hf.save_pretrained(
        params, model.config, directory, dtype=dtype, max_shard_bytes=max_shard_bytes
    )
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(directory))
    return directory
