"""Zero-copy safetensors reading and plain writing in numpy (bf16 included, via ml_dtypes).

The ``safetensors`` package's numpy backend cannot represent bfloat16, and its flax backend puts
every tensor on the default device. Reading the format ourselves (8-byte header length, a JSON
header of ``{name: {dtype, shape, data_offsets}}``, then raw little-endian bytes) lets the loader
memory-map a file and stream one tensor at a time into host numpy, which is what quantize-while-
loading needs. Spec: https://github.com/huggingface/safetensors#format.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or holds something we refuse to read."""


class SafetensorsFile:
    """A memory-mapped ``.safetensors`` file: ``keys()``, ``shape(key)``, ``get(key)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{self.path}: header length {n} exceeds file size {size}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self._data_start = 8 + n
        for key, info in header.items():
            if info["dtype"] not in DTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}"
                )
            begin, end = info["data_offsets"]
            if self._data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor {key!r} runs past the end of the file")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size > 0 else None

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the mapped file (no copy)."""
        info = self._header[key]
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(dtype).reshape(info["shape"])


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata=None) -> None:
    """Write numpy arrays (bf16 included) as one safetensors file, atomically (tmp + rename)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for key, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {key!r} of dtype {arr.dtype}")
        header[key] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as the reference does
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def save_sharded(
    tensors: Mapping[str, np.ndarray], directory: Path, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Write HF-style ``model-0000i-of-0000n.safetensors`` (+ index when > 1 shard)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, directory / name)
        weight_map |= dict.fromkeys(shard, name)
    total = sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint directory; refuses pickled-only checkpoints."""
    index = directory / "model.safetensors.index.json"
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
    """Every ``(key, array view)`` of a checkpoint, one file mapped at a time."""
    for path in checkpoint_files(directory):
        f = SafetensorsFile(path)
        for key in f.keys():
            yield key, f.get(key)
