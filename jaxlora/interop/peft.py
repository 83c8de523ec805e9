"""PEFT adapter directories <-> jaxlora parameter trees.

A PEFT LoRA adapter (peft 0.21.2, ``PeftModel.save_pretrained``) is ``adapter_config.json`` plus
``adapter_model.safetensors`` keyed ``base_model.model.<HF module path>.<suffix>``:

* ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``, ``lora_magnitude_vector [out]`` (DoRA);
* biases, for ``bias="all"`` every bias (``<path>.base_layer.bias`` when the layer is
  LoRA-wrapped, else ``<path>.bias``), for ``"lora_only"`` those of wrapped layers;
* ``modules_to_save``: every parameter of the module under its plain name (``lm_head.weight``).

Keys and config fields were read off ``peft/utils/save_and_load.py`` and checked against what
PEFT writes (tests/interop/test_peft_parity.py compares the key sets).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxlora.config.lora import LoraConfig, LoraConfigError
from jaxlora.dtypes import FLOAT_DTYPES
from jaxlora.interop.peft_config import UnsupportedAdapterError, config_from_peft, config_to_peft
from jaxlora.interop.safetensors import read_file, save_file
from jaxlora.lora import init as lora_init
from jaxlora.lora import targets as lora_targets
from jaxlora.weights.lora import LoRAWeight

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# ---- save ----------------------------------------------------------------------------------------


def adapter_tensors(params: dict, cfg: LoraConfig) -> dict[str, np.ndarray]:
    """The ``{PEFT key: array}`` PEFT would save for ``params`` under ``cfg``.

    Checks that the LoRA weights in ``params`` are exactly the modules, ranks and scales ``cfg``
    describes, so the written ``adapter_config.json`` cannot misdescribe the tensors.
    """
    flat = flatten_dict(params, sep=".")
    lora = {k.rsplit(".", 1)[0]: v for k, v in flat.items() if isinstance(v, LoRAWeight)}
    if not lora:
        raise ValueError("save_adapter: the parameters hold no LoRA weights")
    base_params = {k: (v.base if isinstance(v, LoRAWeight) else v) for k, v in flat.items()}
    targets = lora_targets.resolve_targets(unflatten_dict(base_params, sep="."), cfg, strict=False)
    if set(targets) != set(lora):
        raise ValueError(
            "save_adapter: the config targets differ from the LoRA weights in the params: "
            f"only in config {sorted(set(targets) - set(lora))[:6]}, "
            f"only in params {sorted(set(lora) - set(targets))[:6]}"
        )
    out: dict[str, Any] = {}
    for path, lw in sorted(lora.items()):
        r, _ = targets[path]
        if lw.rank != r or not np.isclose(lw.scale, cfg.scale(path), rtol=1e-6):
            raise ValueError(
                f"save_adapter: {path} has r={lw.rank}, scale={lw.scale:g}; the config says "
                f"r={r}, scale={cfg.scale(path):g}"
            )
        if lw.use_dora != cfg.use_dora:
            raise ValueError(f"save_adapter: {path} use_dora={lw.use_dora}, config {cfg.use_dora}")
        out[f"{PREFIX}{path}.lora_A.weight"] = lw.a
        out[f"{PREFIX}{path}.lora_B.weight"] = lw.b
        if lw.use_dora:
            out[f"{PREFIX}{path}.lora_magnitude_vector"] = lw.magnitude
    saved = lora_targets.modules_to_save_paths(params, cfg)
    for key, leaf in flat.items():
        module, name = key.rsplit(".", 1)
        if lora_targets.under(module, saved):
            out[f"{PREFIX}{key}"] = leaf
        elif name == "bias" and (cfg.bias == "all" or (cfg.bias == "lora_only" and module in lora)):
            wrapped = module in lora
            out[f"{PREFIX}{module}.base_layer.bias" if wrapped else f"{PREFIX}{key}"] = leaf
    return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}


def save_adapter(
    params: dict,
    cfg: LoraConfig,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``params``' adapter as a PEFT adapter directory that ``PeftModel.from_pretrained``
    loads with no missing or unexpected keys (``Model.save_adapter`` is the usual way in).

    ``init_lora_weights`` is written as PEFT would, so PEFT re-derives the same base on load:
    ``"pissa"`` makes PEFT recompute the (deterministic) residual from the original base. A
    randomized PiSSA (``pissa_niter_K``) or LoftQ base cannot be re-derived; those adapters are
    written with ``init_lora_weights: true`` and belong with the modified base (export it).
    """
    tensors = adapter_tensors(params, cfg)
    d = config_to_peft(cfg, base_model_name_or_path)
    if cfg.init == "loftq" or cfg.init.startswith("pissa_niter_"):
        log.warning(
            "save_adapter: init=%r modified the base weights in a way PEFT cannot re-derive; "
            "the adapter is written with init_lora_weights=true and is only valid on the "
            "modified base (export that base alongside it)",
            cfg.init,
        )
        d["init_lora_weights"], d["loftq_config"] = True, {}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    # Top-level keys sorted as PEFT writes them, but rank/alpha_pattern kept in order: the first
    # matching key wins, and PEFT's sort_keys=True can change which one that is.
    (directory / CONFIG_NAME).write_text(json.dumps(dict(sorted(d.items())), indent=2))
    return directory


# ---- load ----------------------------------------------------------------------------------------


def read_adapter(directory: str | Path) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """``(config, {module-relative key: array})`` of a PEFT adapter directory (keys without the
    ``base_model.model.`` prefix). Pickled ``adapter_model.bin`` is refused."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.exists():
        raise UnsupportedAdapterError(f"{directory}: no {CONFIG_NAME}")
    try:
        cfg = config_from_peft(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as e:
        raise UnsupportedAdapterError(f"{cfg_path}: invalid JSON ({e})") from None
    except UnsupportedAdapterError as e:
        raise UnsupportedAdapterError(f"{directory}/{e}") from None
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        if (directory / "adapter_model.bin").exists():
            raise UnsupportedAdapterError(
                f"{directory} holds only a pickled adapter_model.bin; jaxlora reads safetensors "
                "only (unpickling can run arbitrary code). Re-save it with PEFT's "
                "save_pretrained(safe_serialization=True) in a process you trust."
            )
        raise UnsupportedAdapterError(f"{directory}: no {WEIGHTS_NAME}")
    tensors = {}
    for key, arr in read_file(weights).items():
        if not key.startswith(PREFIX):
            raise UnsupportedAdapterError(f"{weights}: key {key!r} lacks the {PREFIX!r} prefix")
        tensors[key[len(PREFIX) :]] = arr
    return cfg, tensors


def _refuse(directory: Any, msg: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"{directory}: {msg}")


def load_adapter(params: dict, directory: str | Path) -> tuple[dict, LoraConfig]:
    """Apply a PEFT LoRA adapter directory to a parameter tree without LoRA; returns the new
    tree and the adapter's config (``Model.load_adapter`` is the usual way in).

    The adapter's tensors decide which modules get LoRA; they must be exactly the modules its
    config targets on this model, with the config's ranks. Scales come from the config
    (``lora_alpha``, ``alpha_pattern``, ``use_rslora``). Adapters saved with
    ``init_lora_weights="pissa"`` get the base residual ``W − top_r(W)`` recomputed, as PEFT
    does when it loads one; randomized PiSSA and LoftQ bases cannot be re-derived and are refused.
    """
    cfg, tensors = read_adapter(directory)
    if cfg.init == "loftq" or cfg.init.startswith("pissa_niter_"):
        raise _refuse(
            directory,
            f"init_lora_weights={cfg.init!r}: the adapter belongs to a base PEFT modified at init "
            "and that cannot be re-derived here; load the modified base and an adapter saved "
            "with init_lora_weights=true",
        )
    flat = flatten_dict(params, sep=".")
    lora, replaced = _sort_tensors(directory, cfg, tensors, flat, params)
    try:
        targets = lora_targets.resolve_targets(params, cfg, strict=False)
        lora_targets.check_modules_to_save(params, cfg)
    except LoraConfigError as e:
        raise _refuse(directory, f"does not fit this model: {e}") from None
    if set(targets) != set(lora):
        raise _refuse(
            directory,
            "its tensors and its config disagree on the LoRA modules: config only "
            f"{sorted(set(targets) - set(lora))[:6]}, "
            f"tensors only {sorted(set(lora) - set(targets))[:6]}",
        )
    dtype = FLOAT_DTYPES[cfg.dtype]
    new = dict(flat)
    for path, parts in lora.items():
        new[f"{path}.weight"] = _lora_weight(
            directory, cfg, path, parts, flat[f"{path}.weight"], dtype
        )
    for key, arr in replaced.items():
        new[key] = _replacement(directory, key, arr, flat[key])
    return unflatten_dict(new, sep="."), cfg


def _sort_tensors(directory, cfg: LoraConfig, tensors: dict, flat: dict, params: dict):
    """``({module: {"A.weight"|"B.weight"|"magnitude_vector": array}}, {param key: array})``:
    the LoRA factors by module, and the tensors that replace base parameters (biases,
    ``modules_to_save``, saved embeddings); anything else is refused by name."""
    lora: dict[str, dict[str, np.ndarray]] = {}
    replaced: dict[str, np.ndarray] = {}
    saved = lora_targets.modules_to_save_paths(params, cfg)
    embedding_lora = sorted(k for k in tensors if ".lora_embedding_" in k)
    if embedding_lora:
        raise _refuse(directory, f"{embedding_lora[0]}: embedding LoRA is not supported")
    for key, arr in tensors.items():
        module, _, suffix = key.partition(".lora_")
        if suffix:
            if suffix not in ("A.weight", "B.weight", "magnitude_vector"):
                raise _refuse(directory, f"{key}: lora_{suffix} is not supported")
            lora.setdefault(module, {})[suffix] = arr
            continue
        if key.endswith(".base_layer.bias"):
            key = key.removesuffix(".base_layer.bias") + ".bias"
        if key not in flat:
            raise _refuse(directory, f"unexpected tensor {key!r}: no such parameter in the model")
        module, name = key.rsplit(".", 1)
        # PEFT also saves the embedding layers (save_embedding_layers) and loads them over the
        # base's; a resized vocabulary then fails the shape check in _replacement.
        embedding = (
            module.rsplit(".", 1)[-1] in (*lora_targets.EMBEDDINGS, lora_targets.HEAD)
            and name == "weight"
        )
        wanted_bias = name == "bias" and cfg.bias != "none"
        if not (lora_targets.under(module, saved) or embedding or wanted_bias):
            raise _refuse(
                directory,
                f"unexpected tensor {key!r} (not a LoRA weight, not a bias for this bias mode, "
                "not in modules_to_save)",
            )
        replaced[key] = arr
    return lora, replaced


def _replacement(directory, key: str, arr: np.ndarray, old: Any) -> jax.Array:
    """``arr`` in place of the base parameter ``old``, checked and cast to its dtype."""
    if not isinstance(old, jax.Array | np.ndarray):
        raise _refuse(directory, f"{key}: cannot replace a {type(old).__name__} in full")
    if tuple(arr.shape) != tuple(old.shape):
        raise _refuse(
            directory,
            f"{key} has shape {arr.shape}, the model {tuple(old.shape)}"
            + (" (resized vocabulary?)" if "embed" in key or "lm_head" in key else ""),
        )
    return jnp.asarray(arr).astype(old.dtype)


def _lora_weight(
    directory, cfg: LoraConfig, path: str, parts: dict, base: Any, dtype
) -> LoRAWeight:
    want = {"A.weight", "B.weight"} | ({"magnitude_vector"} if cfg.use_dora else set())
    if set(parts) != want:
        raise _refuse(directory, f"{path}: has lora_{sorted(parts)}, expected lora_{sorted(want)}")
    a, b = parts["A.weight"], parts["B.weight"]
    out, inn = base.shape
    r, _ = cfg.rank_alpha(path)
    if a.shape != (r, inn) or b.shape != (out, r):
        raise _refuse(
            directory,
            f"{path}: lora_A {a.shape} / lora_B {b.shape} do not fit the weight {(out, inn)} "
            f"at rank {r} (from r / rank_pattern)",
        )
    magnitude = None
    if cfg.use_dora:
        magnitude = jnp.asarray(parts["magnitude_vector"]).astype(dtype)
        if magnitude.shape != (out,):
            raise _refuse(directory, f"{path}: lora_magnitude_vector {magnitude.shape} != ({out},)")
    scale = cfg.scale(path)
    if cfg.init == "pissa":  # PEFT re-runs pissa_init on load, then loads A and B over it
        key = jax.random.key(0)  # unused by full-SVD PiSSA
        base, _, _ = lora_init.init_lora(cfg, base, r, scale, key, dtype, where=path)
    return LoRAWeight(
        base,
        jnp.asarray(a).astype(dtype),
        jnp.asarray(b).astype(dtype),
        magnitude,
        scale=scale,
        dropout=cfg.dropout,
        use_dora=cfg.use_dora,
    )
