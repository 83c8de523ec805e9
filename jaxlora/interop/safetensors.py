"""Safetensors checkpoints: the files of a Hugging Face directory, read and written with the
``safetensors`` package (numpy backend; bfloat16 arrives as ``ml_dtypes.bfloat16``).

What is ours: resolving which files make a checkpoint (the index, refusing pickled weights),
streaming ``(key, array)`` one tensor at a time (the loader quantizes each as it arrives, so
host memory never holds a second copy of the model), atomic writes, and errors that name the
file. Sharding into ``model-0000i-of-0000n.safetensors`` + index is ``huggingface_hub``'s.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import safetensors.numpy
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import SafetensorError, safe_open

INDEX_NAME = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or holds something we refuse to read."""


@contextmanager
def open_file(path: str | os.PathLike):
    """``safe_open(path, framework="np")``, with a corrupt or truncated file a
    :class:`CheckpointError` that names it."""
    try:
        f = safe_open(str(path), framework="np")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    with f:
        yield f


def read_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file, keyed as stored."""
    with open_file(path) as f:
        return {key: _get(f, path, key) for key in f.keys()}


def _get(f, path, key: str) -> np.ndarray:
    try:
        return f.get_tensor(key)
    except (SafetensorError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from None


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata=None) -> None:
    """Write numpy arrays (bf16 included) as one safetensors file, atomically (tmp + rename),
    so an interrupted write never leaves a half-written file under the real name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    safetensors.numpy.save_file(arrays, str(tmp), metadata=dict(metadata or {"format": "pt"}))
    os.replace(tmp, path)


def save_sharded(
    tensors: Mapping[str, np.ndarray], directory: Path, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Write HF-style ``model-0000i-of-0000n.safetensors`` (+ index when > 1 shard).

    A previous save's weights in ``directory`` that this one does not rewrite — its shards, its
    index, its single ``model.safetensors`` — are removed once the new files are in place, as
    ``transformers``' ``save_pretrained`` cleans its folder: a loader would otherwise read an
    old index's shards (a bfloat16 re-export still loading as the float32 one)."""
    split = split_state_dict_into_shards_factory(
        dict(tensors),
        get_storage_size=lambda a: a.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_bytes,
    )
    for name, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, directory / name)
    index_path = directory / INDEX_NAME
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        tmp = index_path.with_name(INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, index_path)
    else:
        index_path.unlink(missing_ok=True)
    for old in directory.glob("model*.safetensors"):
        stale = old.name == "model.safetensors" or _SHARD.fullmatch(old.name)
        if stale and old.name not in split.filename_to_tensors:
            old.unlink()
    return list(split.filename_to_tensors)


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint directory; refuses pickled-only checkpoints."""
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: corrupt index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise CheckpointError(f"{index} names missing shard(s): {missing}")
        return [directory / f for f in files]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickled:
        raise CheckpointError(
            f"{directory} holds only pickled weights {pickled}: jaxlora reads safetensors only, "
            "because unpickling can execute arbitrary code. Convert once with transformers "
            "(`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            "safe_serialization=True)`) in a process you trust."
        )
    raise CheckpointError(f"{directory}: no .safetensors weights found")


def iter_tensors(directory: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every ``(key, array)`` of a checkpoint, one tensor in host memory at a time."""
    for path in checkpoint_files(directory):
        with open_file(path) as f:
            for key in f.keys():
                yield key, _get(f, path, key)


def edge_bytes(f, key: str, n: int = 4096) -> tuple[str, tuple[int, ...], bytes, bytes]:
    """``(dtype, shape, first n bytes, last n bytes)`` of a stored tensor, reading only the
    leading and trailing rows (``get_slice``), not the whole tensor."""
    sl = f.get_slice(key)
    shape = tuple(sl.get_shape())
    if not shape or math.prod(shape) == 0:
        arr = f.get_tensor(key)
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        return str(arr.dtype), shape, raw[:n].tobytes(), raw[-n:].tobytes()
    row = math.prod(shape[1:])
    head = sl[: min(shape[0], -(-n // max(1, row)) + 1)]
    tail = sl[max(0, shape[0] - (-(-n // max(1, row)) + 1)) :]
    dtype = str(head.dtype)
    head = np.ascontiguousarray(head).reshape(-1).view(np.uint8)
    tail = np.ascontiguousarray(tail).reshape(-1).view(np.uint8)
    return dtype, shape, head[:n].tobytes(), tail[-n:].tobytes()
