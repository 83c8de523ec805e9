"""bitsandbytes 4-bit <-> jaxlora: per-tensor interop, whole-checkpoint reading and writing.

A bnb-4bit Hugging Face checkpoint stores each quantized linear ``P`` as ``P.weight`` (packed
codes, ``[numel/2, 1]``) plus ``P.weight.absmax``, ``P.weight.quant_map``,
``P.weight.nested_absmax``, ``P.weight.nested_quant_map`` and
``P.weight.quant_state.bitsandbytes__nf4`` (JSON bytes). Those entries may arrive in any order
and across shards; :class:`BnbCheckpointReader` buffers them per ``P`` and hands the loader one
:class:`~jaxlora.nf4.NF4Tensor` when a weight is complete — no requantization.
:func:`to_bnb` gives the same layout back (``jaxlora.interop.hf.save_bnb4`` writes a whole
checkpoint), so ``transformers`` + bitsandbytes load our exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxlora.dtypes import FLOAT_DTYPE_NAMES
from jaxlora.weights.lora import LoRAWeight
from jaxlora.weights.nf4 import NF4Tensor, quantize
from jaxlora.weights.nf4_format import CODES, DYNAMIC_MAP

_QS_PREFIX = "quant_state.bitsandbytes__"


def _check_table(name: str, got: np.ndarray, want: np.ndarray) -> None:
    got = np.asarray(got)
    if (
        got.dtype != np.float32
        or got.shape != want.shape
        or not np.array_equal(got.view(np.uint32), want.view(np.uint32))
    ):
        raise ValueError(f"from_bnb: {name} is not bitsandbytes' table ({got.dtype}{got.shape})")


def _quant_state_meta(arr: np.ndarray) -> dict[str, Any]:
    """The ``quant_state.bitsandbytes__<type>`` entry: uint8 bytes of a JSON dict."""
    return json.loads(bytes(np.asarray(arr, np.uint8)).decode("utf-8"))


def from_bnb(packed: np.ndarray, quant_state: dict[str, np.ndarray]) -> NF4Tensor:
    """Wrap one bnb-4bit linear weight from a Hugging Face checkpoint, without requantizing.

    ``packed`` is ``P.weight`` (uint8 ``[numel/2, 1]``, or the same bytes in another dtype
    when ``bnb_4bit_quant_storage`` is e.g. bfloat16). ``quant_state`` maps the suffixes of
    ``P.weight.<suffix>`` to their arrays: ``absmax``, ``quant_map``, ``nested_absmax``,
    ``nested_quant_map`` (the last two with double quant) and
    ``quant_state.bitsandbytes__nf4`` (or ``__fp4``), the uint8 bytes of a JSON dict.
    The code tables must be bnb's (checked bit for bit). Leaves come back as numpy arrays.
    """
    qs_keys = [k for k in quant_state if k.startswith(_QS_PREFIX)]
    if len(qs_keys) != 1:
        raise ValueError(f"from_bnb: want exactly one '{_QS_PREFIX}<type>' entry, got {qs_keys}")

    meta = _quant_state_meta(quant_state[qs_keys[0]])
    quant_type = meta["quant_type"]
    if quant_type not in CODES or qs_keys[0] != _QS_PREFIX + quant_type:
        raise ValueError(f"from_bnb: unsupported quant_type {quant_type!r} under {qs_keys[0]}")
    shape = tuple(meta["shape"])
    if len(shape) != 2:
        raise ValueError(f"from_bnb: only 2-D linear weights are supported, got shape {shape}")
    if meta["dtype"] not in FLOAT_DTYPE_NAMES:
        raise ValueError(f"from_bnb: unsupported dtype {meta['dtype']!r}")
    known = {"absmax", "quant_map", "nested_absmax", "nested_quant_map", qs_keys[0]}
    if set(quant_state) - known:
        raise ValueError(f"from_bnb: unexpected entries {sorted(set(quant_state) - known)}")
    _check_table("quant_map", quant_state["quant_map"], CODES[quant_type])
    nested = offset = nested_blocksize = None
    if "nested_absmax" in quant_state:
        _check_table("nested_quant_map", quant_state["nested_quant_map"], DYNAMIC_MAP)
        if meta["nested_dtype"] != "float32":
            raise ValueError(f"from_bnb: unsupported nested_dtype {meta['nested_dtype']!r}")
        nested = np.asarray(quant_state["nested_absmax"], np.float32)
        if np.signbit(nested).any():  # absmax values are >= +0; _no_fma relies on it
            raise ValueError("from_bnb: nested_absmax has negative entries")
        offset = np.float32(meta["nested_offset"])  # a float32 written as a double: exact
        nested_blocksize = int(meta["nested_blocksize"])
    raw = np.ascontiguousarray(packed).reshape(-1).view(np.uint8)
    return NF4Tensor.from_flat(
        raw,
        np.asarray(quant_state["absmax"]),
        nested,
        offset,
        shape=shape,
        dtype=meta["dtype"],
        blocksize=int(meta["blocksize"]),
        quant_type=quant_type,
        nested_blocksize=nested_blocksize,
    )


def to_bnb(t: NF4Tensor, quant_storage: str = "uint8") -> dict[str, np.ndarray]:
    """The entries transformers writes for a bnb-4bit linear ``P``, keyed by the suffix after
    ``P.``: ``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
    ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__<type>`` (as
    ``QuantState.as_dict(packed=True)`` builds them). ``quant_storage`` views the packed
    bytes as another dtype (e.g. ``"bfloat16"``), shape ``[bytes/itemsize, 1]``.
    """

    packed = np.asarray(t.codes, np.uint8).reshape(-1)
    storage = jnp.dtype(quant_storage)
    if packed.size % storage.itemsize:
        raise ValueError(f"to_bnb: {packed.size} bytes do not fill whole {storage} elements")
    meta: dict[str, Any] = {
        "quant_type": t.quant_type,
        "blocksize": t.blocksize,
        "dtype": t.dtype_name,
        "shape": list(t.shape),
    }
    out = {
        "weight": packed.view(storage).reshape(-1, 1),
        "weight.absmax": np.asarray(t.absmax).reshape(-1),
        "weight.quant_map": CODES[t.quant_type].copy(),
    }
    if t.double_quant:
        out["weight.nested_absmax"] = np.asarray(t.nested_absmax, np.float32)
        out["weight.nested_quant_map"] = DYNAMIC_MAP.copy()
        meta.update(
            nested_blocksize=t.nested_blocksize,
            nested_dtype="float32",
            nested_offset=float(np.float32(t.offset)),
        )
    blob = json.dumps(meta).encode("utf-8")
    out[f"weight.{_QS_PREFIX}{t.quant_type}"] = np.frombuffer(blob, np.uint8).copy()
    return out


def quantization_config(
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    quant_storage: str = "uint8",
    skip_modules: list[str] | None = None,
) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for a bnb-4bit export: the dict
    ``transformers.BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`` produces."""
    if quant_type not in CODES:
        raise ValueError(
            f"quantization_config: quant_type must be 'nf4' or 'fp4', got {quant_type!r}"
        )
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": quant_storage,
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


def parse_quantization_config(qc: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint's ``quantization_config``: ``{quant_type, double_quant,
    compute_dtype, quant_storage, skip_modules}``; anything but bnb 4-bit is refused."""
    if qc.get("quant_method") != "bitsandbytes":
        raise ValueError(
            f"quantization_config: quant_method {qc.get('quant_method')!r} unsupported"
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError("quantization_config: 8-bit (LLM.int8) checkpoints are not supported")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ValueError("quantization_config: neither load_in_4bit nor load_in_8bit is set")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # transformers' default
    if quant_type not in CODES:
        raise ValueError(f"quantization_config: bnb_4bit_quant_type {quant_type!r} unsupported")
    return {
        "quant_type": quant_type,
        "double_quant": bool(qc.get("bnb_4bit_use_double_quant", False)),
        "compute_dtype": qc.get("bnb_4bit_compute_dtype") or "float32",
        "quant_storage": qc.get("bnb_4bit_quant_storage") or "uint8",
        "skip_modules": qc.get("llm_int8_skip_modules"),
    }


# ---- whole checkpoints ----------------------------------------------------------------------

# Decoder linears are what QLoRA quantizes; embeddings, norms and lm_head stay in 16/32 bits
# (as bitsandbytes via transformers leaves them).
QUANTIZED_MODULES = (
    *("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    *("qkv_proj", "gate_up_proj"),  # Phi-3's fused projections
    *("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),  # Falcon
)


def is_quantized_weight(key: str) -> bool:
    module, _, leaf = key.rpartition(".")
    return leaf == "weight" and module.rpartition(".")[2] in QUANTIZED_MODULES


def to_device(t: NF4Tensor) -> NF4Tensor:
    return jax.tree.map(jnp.asarray, t)


def quantizing_converter(
    quant: str, *, dtype: str = "float32", blocksize: int = 64, double_quant: bool = True
):
    """A loader converter that quantizes each decoder linear to 4 bits as it streams in.

    The host holds one float tensor at a time (a memory-mapped view) and keeps only its packed
    codes: peak host memory is the 4-bit model plus one tensor, never the 16-bit model.
    """
    if quant not in CODES:
        raise ValueError(f"quant={quant!r}: expected one of {sorted(CODES)} or None")

    def convert(key: str, arr: np.ndarray):
        if not is_quantized_weight(key):
            return None
        t = quantize(
            np.asarray(arr, dtype=np.dtype(jnp.dtype(dtype))),
            blocksize=blocksize,
            quant_type=quant,
            double_quant=double_quant,
        )
        return to_device(t)

    return convert


def quantize_linears(
    params: dict,
    quant: str,
    *,
    dtype: str = "float32",
    blocksize: int = 64,
    double_quant: bool = True,
) -> dict:
    """``params`` with every decoder linear still in float quantized as
    :func:`quantizing_converter` quantizes it while loading, the float base of a LoRA weight
    too (PiSSA's residual); a base already quantized (LoftQ's) stays as it is."""
    convert = quantizing_converter(
        quant, dtype=dtype, blocksize=blocksize, double_quant=double_quant
    )
    flat = flatten_dict(params, sep=".")
    for key, leaf in flat.items():
        wrapped = isinstance(leaf, LoRAWeight)
        dense = leaf.base if wrapped else leaf
        quantized = convert(key, np.asarray(dense)) if isinstance(dense, jax.Array) else None
        if quantized is not None:
            flat[key] = leaf.replace(base=quantized) if wrapped else quantized
    return unflatten_dict(flat, sep=".")


class BnbCheckpointReader:
    """Collects the entries of each bnb-4bit weight while a checkpoint streams by."""

    def __init__(self, quantization_config: dict[str, Any]):
        self.config = parse_quantization_config(quantization_config)
        self.pending: dict[str, dict[str, np.ndarray]] = {}

    def feed(self, key: str, arr: np.ndarray, expected: dict[str, tuple]):
        """``None`` while buffering; ``(param_key, leaf)`` when ready (``leaf`` None = plain)."""
        prefix, component = self._split(key, arr, expected)
        if prefix is None:
            return key, None
        parts = self.pending.setdefault(prefix, {})
        if component in parts:
            raise ValueError(f"bnb checkpoint: {prefix}.{component} appears twice")
        parts[component] = np.asarray(arr)
        if not self._complete(parts):
            return None
        del self.pending[prefix]
        packed = parts.pop("weight")
        quant_state = {k.removeprefix("weight."): v for k, v in parts.items()}
        try:
            t = from_bnb(packed, quant_state)
        except ValueError as e:
            raise ValueError(f"bnb checkpoint: {prefix}.weight: {e}") from None
        return f"{prefix}.weight", to_device(t)

    @staticmethod
    def _split(key: str, arr: np.ndarray, expected: dict[str, tuple]):
        if ".weight." in key:
            prefix, _, rest = key.partition(".weight.")
            return prefix, f"weight.{rest}"
        if key.endswith(".weight") and key in expected:
            want = tuple(expected[key])
            if len(want) == 2 and arr.ndim == 2 and arr.shape[1] == 1 and tuple(arr.shape) != want:
                return key[: -len(".weight")], "weight"
        return None, None

    @staticmethod
    def _complete(parts: dict[str, np.ndarray]) -> bool:
        state = [k for k in parts if k.startswith("weight." + _QS_PREFIX)]
        if not state or "weight" not in parts:
            return False
        meta = _quant_state_meta(parts[state[0]])
        need = {"weight.absmax", "weight.quant_map"}
        if "nested_blocksize" in meta:
            need |= {"weight.nested_absmax", "weight.nested_quant_map"}
        return need <= set(parts)

    def check_complete(self, where: Path) -> None:
        if self.pending:
            prefix, parts = next(iter(self.pending.items()))
            raise ValueError(
                f"{where}: bnb-4bit weight {prefix}.weight is incomplete (have {sorted(parts)}); "
                f"{len(self.pending)} weight(s) affected"
            )
