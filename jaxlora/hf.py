"""Hugging Face checkpoints <-> jaxlora parameter trees.

The key table is the identity: ``model.layers.0.self_attn.q_proj.weight`` in the checkpoint is
``params["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"]`` here, same ``[out, in]``
orientation. Loading streams one tensor at a time from memory-mapped safetensors, asserts its
shape against the architecture, converts (cast, or quantize to 4 bits) and places it, so host
memory holds the result plus one tensor — never a second full copy of the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.config import LlamaConfig, UnsupportedConfigError
from jaxlora.models.llama import param_shapes
from jaxlora.ops import FLOAT_DTYPES
from jaxlora.safetensors_io import CheckpointError, iter_tensors, save_sharded

log = logging.getLogger(__name__)

DTYPES = FLOAT_DTYPES

# Buffers some exporters write that are recomputed here, not parameters.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

_HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "*.txt",
]


def resolve(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a hub id downloaded (safetensors only) to the HF cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a Hugging Face checkpoint directory")
    if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1:
        raise CheckpointError(f"{path_or_id}: no such directory")
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face hub (safetensors only)", path_or_id)
    return Path(snapshot_download(str(path_or_id), revision=revision, allow_patterns=_HUB_PATTERNS))


def read_config(directory: Path) -> tuple[LlamaConfig, dict[str, Any]]:
    """Parse ``config.json`` strictly; returns the architecture and the raw dict."""
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    try:
        return LlamaConfig.from_hf(raw), raw
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(f"{path}: {e}") from None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}} -> {"a.b": x}``; weight types (NF4Tensor, LoRAWeight) stay whole."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


# A converter turns one checked host tensor into the leaf stored in the tree (cast, quantize,
# place on a sharding). Returning None means "not mine": the default cast applies.
Converter = Callable[[str, np.ndarray], Any]


def load_params(
    directory: Path,
    config: LlamaConfig,
    dtype: str = "float32",
    convert: Converter | None = None,
    raw_config: dict[str, Any] | None = None,
) -> dict:
    """Stream a checkpoint into a parameter tree, asserting every key and shape.

    Unexpected keys, missing keys and shape mismatches are errors naming the key. A tied
    checkpoint that also stores ``lm_head.weight`` has it dropped (transformers ties it anyway).
    bitsandbytes 4-bit checkpoints are read without requantizing (see ``jaxlora.nf4``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    expected = {k: v.shape for k, v in flatten(param_shapes(config)).items()}
    bnb = _bnb_reader(raw_config or {})
    out: dict[str, Any] = {}
    for key, arr in iter_tensors(directory):
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if bnb is not None:
            done = bnb.feed(key, arr, expected)
            if done is None:
                continue  # a bnb component: buffered until its weight is complete
            key, leaf = done
        else:
            leaf = None
        if key not in expected:
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue
            raise CheckpointError(
                f"{directory}: unexpected tensor {key!r} for {config.architecture} "
                f"(expected keys like {sorted(expected)[:3]}...)"
            )
        if key in out:
            raise CheckpointError(f"{directory}: tensor {key!r} appears twice")
        if leaf is None:
            if tuple(arr.shape) != tuple(expected[key]):
                raise CheckpointError(
                    f"{directory}: {key} has shape {tuple(arr.shape)}, "
                    f"expected {tuple(expected[key])} from config.json"
                )
            leaf = convert(key, arr) if convert is not None else None
            if leaf is None:
                leaf = jnp.asarray(np.asarray(arr, dtype=DTYPES[dtype]))
        elif tuple(leaf.shape) != tuple(expected[key]):
            raise CheckpointError(f"{directory}: {key} dequantizes to shape {leaf.shape}")
        out[key] = leaf
    if bnb is not None:
        bnb.check_complete(directory)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {missing[:8]}")
    return unflatten(out)


def _bnb_reader(raw_config: dict[str, Any]):
    qc = raw_config.get("quantization_config")
    if not qc:
        return None
    from jaxlora.nf4_bnb import BnbCheckpointReader

    try:
        return BnbCheckpointReader(qc)
    except ValueError as e:
        raise UnsupportedConfigError(
            f"config.json: {e}; jaxlora reads bitsandbytes 4-bit (nf4/fp4) checkpoints"
        ) from None


def save_pretrained(
    params: dict,
    config: LlamaConfig,
    directory: str | Path,
    *,
    dtype: str = "float32",
    extra_config: dict[str, Any] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a plain HF checkpoint (config.json + sharded safetensors) from array params."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected = {k: v.shape for k, v in flatten(param_shapes(config)).items()}
    flat = flatten(params)
    tensors = {}
    for key, shape in expected.items():
        leaf = flat.get(key)
        if not isinstance(leaf, jax.Array | np.ndarray):
            raise CheckpointError(f"cannot export {key}: {type(leaf).__name__} is not an array")
        if tuple(leaf.shape) != tuple(shape):
            raise CheckpointError(f"export: {key} has shape {leaf.shape}, expected {shape}")
        tensors[key] = np.asarray(jax.device_get(leaf)).astype(DTYPES[dtype])
    save_sharded(tensors, directory, max_shard_bytes)
    cfg = config.to_hf() | {"dtype": dtype} | dict(extra_config or {})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return directory


def fingerprint(directory: Path) -> str:
    """A cheap identity of a checkpoint: config.json, every tensor's name/dtype/shape, and a
    sample of each weight file's bytes (sha256, 16 hex digits). Resume refuses a mismatch."""
    import hashlib

    from jaxlora.safetensors_io import SafetensorsFile, checkpoint_files

    h = hashlib.sha256()
    cfg = json.loads((directory / "config.json").read_text())
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for path in checkpoint_files(directory):
        f = SafetensorsFile(path)
        for key in sorted(f.keys()):
            arr = f.get(key)
            h.update(f"{key}:{arr.dtype}:{arr.shape}".encode())
            raw = arr.reshape(-1).view(np.uint8)
            h.update(raw[:4096].tobytes())
            h.update(raw[-4096:].tobytes())
    return h.hexdigest()[:16]
