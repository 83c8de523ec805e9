"""Hugging Face checkpoints <-> jaxlora parameter trees.

The key table is the identity: ``model.layers.0.self_attn.q_proj.weight`` in the checkpoint is
``params["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"]`` here, same ``[out, in]``
orientation. Loading streams one tensor at a time from memory-mapped safetensors, asserts its
shape against the architecture, converts (cast, or quantize to 4 bits) and places it, so host
memory holds the result plus one tensor — never a second full copy of the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from huggingface_hub import snapshot_download

from jaxlora.dtypes import FLOAT_DTYPES
from jaxlora.interop import bnb
from jaxlora.interop.safetensors import (
    CheckpointError,
    checkpoint_files,
    edge_bytes,
    iter_tensors,
    open_file,
    save_sharded,
)
from jaxlora.models import gemma_config
from jaxlora.models.config import LlamaConfig, UnsupportedConfigError
from jaxlora.models.registry import config_from_hf, param_shapes
from jaxlora.models.stacking import StackingSink
from jaxlora.weights.nf4 import NF4Tensor

log = logging.getLogger(__name__)

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
    log.info("downloading %s from the Hugging Face hub (safetensors only)", path_or_id)
    return Path(snapshot_download(str(path_or_id), revision=revision, allow_patterns=_HUB_PATTERNS))


def resolve_config(path_or_id: str | Path, revision: str | None = None) -> Path:
    """Like :func:`resolve`, but a hub id fetches ``config.json`` only (planning needs no
    weights)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir() or path.exists() or str(path_or_id).startswith((".", "/", "~")):
        return resolve(path_or_id, revision)
    log.info("downloading %s/config.json from the Hugging Face hub", path_or_id)
    return Path(
        snapshot_download(str(path_or_id), revision=revision, allow_patterns=["config.json"])
    )


TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
GENERATION_CONFIG = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class Generation:
    """What a checkpoint tells ``generate`` besides its weights: ``config.json``'s token ids
    and ``generation_config.json`` (None without one; transformers then derives one from those
    ids). Exports write both back, so a merged or 4-bit model stops where its base did."""

    token_ids: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] | None = None

    @property
    def eos_ids(self) -> list[int]:
        """The ids transformers' ``generate`` stops at: ``generation_config.json``'s
        ``eos_token_id`` (an id or a list), else ``config.json``'s."""
        source = self.config if self.config and "eos_token_id" in self.config else self.token_ids
        eos = source.get("eos_token_id")
        return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    def write(self, directory: Path) -> None:
        if self.config is not None:
            text = json.dumps(self.config, indent=2, sort_keys=True)
            (directory / GENERATION_CONFIG).write_text(text)


def read_generation(directory: Path, raw: dict[str, Any]) -> Generation:
    """The :class:`Generation` of a checkpoint directory whose ``config.json`` is ``raw``."""
    ids = {k: raw[k] for k in TOKEN_IDS if raw.get(k) is not None}
    path = directory / GENERATION_CONFIG
    if not path.exists():
        return Generation(ids)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    config.pop("transformers_version", None)
    return Generation(ids, config)


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
        return config_from_hf(raw), raw
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(f"{path}: {e}") from None


# A converter turns one checked host tensor into the leaf stored in the tree (cast, quantize,
# place on a sharding). Returning None means "not mine": the default cast applies.
Converter = Callable[[str, np.ndarray], Any]


def load_params(
    directory: Path,
    config: LlamaConfig,
    dtype: str = "float32",
    convert: Converter | None = None,
    raw_config: dict[str, Any] | None = None,
    sink: StackingSink | None = None,
) -> dict:
    """Stream a checkpoint into a parameter tree, asserting every key and shape.

    Unexpected keys, missing keys and shape mismatches are errors naming the key. A tied
    checkpoint that also stores ``lm_head.weight`` has it dropped (transformers ties it anyway).
    bitsandbytes 4-bit checkpoints are read without requantizing (see ``jaxlora.nf4``).
    With ``sink``, each converted leaf goes to it as it is read and the tree is the one the
    sink builds: a :class:`~jaxlora.models.stacking.StackingSink` writes the layers straight
    into their runs' stacked arrays on the device.
    """
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(FLOAT_DTYPES)}")
    expected = {k: v.shape for k, v in flatten_dict(param_shapes(config), sep=".").items()}
    reader = _bnb_reader(raw_config or {})
    text_part = (raw_config or {}).get("model_type") == gemma_config.MULTIMODAL
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for key, arr in iter_tensors(directory):
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if text_part:
            key = language_model_key(key)
            if key is None:
                continue
        if reader is not None:
            done = reader.feed(key, arr, expected)
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
        if key in seen:
            raise CheckpointError(f"{directory}: tensor {key!r} appears twice")
        if leaf is None:
            if tuple(arr.shape) != tuple(expected[key]):
                raise CheckpointError(
                    f"{directory}: {key} has shape {tuple(arr.shape)}, "
                    f"expected {tuple(expected[key])} from config.json"
                )
            leaf = convert(key, arr) if convert is not None else None
            if leaf is None:
                leaf = jnp.asarray(np.asarray(arr, dtype=FLOAT_DTYPES[dtype]))
        elif tuple(leaf.shape) != tuple(expected[key]):
            raise CheckpointError(f"{directory}: {key} dequantizes to shape {leaf.shape}")
        seen.add(key)
        if sink is None:
            out[key] = leaf
        else:
            sink.put(key.split("."), leaf)
        del leaf  # the sink holds it now (or its slot of a stacked array)
    if reader is not None:
        reader.check_complete(directory)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {missing[:8]}")
    return unflatten_dict(out, sep=".") if sink is None else sink.tree()


# Where an image-text Gemma 3 keeps its language model: transformers 4.5x wrote
# ``language_model.model.*`` / ``language_model.lm_head.*``, transformers 5 writes
# ``model.language_model.*`` / ``lm_head.*``. The vision tower and projector are not read.
_LANGUAGE_MODEL = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)
_VISION = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def language_model_key(key: str) -> str | None:
    """A ``gemma3`` checkpoint's tensor name as the text model's (``model.layers.0...``), or
    None for the vision tower and projector, which the text model leaves out. Any other name is
    returned as it is, so the caller's key check names it."""
    if key.startswith(_VISION):
        return None
    for old, new in _LANGUAGE_MODEL:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _bnb_reader(raw_config: dict[str, Any]):
    qc = raw_config.get("quantization_config")
    if not qc:
        return None
    try:
        return bnb.BnbCheckpointReader(qc)
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
    generation: Generation | None = None,
) -> Path:
    """Write a plain HF checkpoint (config.json + sharded safetensors) from array params, with
    ``generation``'s token ids and ``generation_config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected = {k: v.shape for k, v in flatten_dict(param_shapes(config), sep=".").items()}
    flat = flatten_dict(params, sep=".")
    tensors = {}
    for key, shape in expected.items():
        leaf = flat.get(key)
        if not isinstance(leaf, jax.Array | np.ndarray):
            raise CheckpointError(f"cannot export {key}: {type(leaf).__name__} is not an array")
        if tuple(leaf.shape) != tuple(shape):
            raise CheckpointError(f"export: {key} has shape {leaf.shape}, expected {shape}")
        tensors[key] = np.asarray(jax.device_get(leaf)).astype(FLOAT_DTYPES[dtype])
    save_sharded(tensors, directory, max_shard_bytes)
    write_config(directory, config, generation, dtype=dtype, **dict(extra_config or {}))
    return directory


def save_bnb4(
    params: dict,
    config,
    directory: str | Path,
    *,
    dtype: str = "bfloat16",
    quant_storage: str = "uint8",
    compute_dtype: str = "bfloat16",
    generation: Generation | None = None,
) -> Path:
    """Write params whose decoder linears are NF4/FP4 tensors as a bitsandbytes-4bit HF checkpoint.

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads it through
    bitsandbytes with no requantization. Other weights are written in ``dtype``.
    """
    if config.model_type == "falcon":
        log.warning(
            "bnb4 export of a Falcon: transformers 5 quantizes only exact nn.Linear modules, "
            "not Falcon's FalconLinear, so it cannot load this checkpoint (transformers 4.x "
            "and jaxlora can); for transformers 5 export merged (dense) or peft"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    kinds = set()
    for key, leaf in flatten_dict(params, sep=".").items():
        if isinstance(leaf, NF4Tensor):
            kinds.add((leaf.quant_type, leaf.double_quant))
            prefix = key[: -len(".weight")]
            for suffix, arr in bnb.to_bnb(jax.device_get(leaf), quant_storage).items():
                tensors[f"{prefix}.{suffix}"] = arr
        elif isinstance(leaf, jax.Array | np.ndarray):
            tensors[key] = np.asarray(jax.device_get(leaf)).astype(FLOAT_DTYPES[dtype])
        else:
            raise ValueError(f"save_bnb4: {key} is a {type(leaf).__name__}; merge LoRA first")
    if len(kinds) != 1:
        raise ValueError(f"save_bnb4: need exactly one 4-bit kind across weights, got {kinds}")
    ((quant_type, dq),) = kinds
    save_sharded(tensors, directory)
    qc = bnb.quantization_config(
        quant_type=quant_type,
        double_quant=dq,
        compute_dtype=compute_dtype,
        quant_storage=quant_storage,
    )
    write_config(directory, config, generation, dtype=dtype, quantization_config=qc)
    return directory


def write_config(
    directory: Path, config: LlamaConfig, generation: Generation | None = None, **fields: Any
) -> None:
    """``config.json`` for ``config`` with ``generation``'s token ids and ``fields``
    (``dtype``, ``quantization_config``) set, and ``generation``'s ``generation_config.json``."""
    gen = generation or Generation()
    cfg = config.to_hf() | gen.token_ids | fields
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    gen.write(directory)


def fingerprint(directory: Path) -> str:
    """A cheap identity of a checkpoint: config.json, every tensor's name/dtype/shape, and the
    first and last 4 KiB of each tensor's bytes (sha256, 16 hex digits). Resume refuses a
    mismatch. Only those edges are read, so it costs little even for a large model."""
    h = hashlib.sha256()
    cfg = json.loads((directory / "config.json").read_text())
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for path in checkpoint_files(directory):
        with open_file(path) as f:
            for key in sorted(f.keys()):
                dtype, shape, head, tail = edge_bytes(f, key)
                h.update(f"{key}:{dtype}:{shape}".encode())
                h.update(head)
                h.update(tail)
    return h.hexdigest()[:16]
