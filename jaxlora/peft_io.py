"""PEFT adapter directories <-> jaxlora parameter trees.

A PEFT LoRA adapter (peft 0.21.2, ``PeftModel.save_pretrained``) is ``adapter_config.json`` plus
``adapter_model.safetensors`` keyed ``base_model.model.<HF module path>.<suffix>``:

* ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``, ``lora_magnitude_vector [out]`` (DoRA);
* biases, for ``bias="all"`` every bias (``<path>.base_layer.bias`` when the layer is
  LoRA-wrapped, else ``<path>.bias``), for ``"lora_only"`` those of wrapped layers;
* ``modules_to_save``: every parameter of the module under its plain name (``lm_head.weight``).

Keys and config fields were read off ``peft/utils/save_and_load.py`` and checked against what
PEFT writes (tests/test_peft_parity.py compares the key sets).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.hf import flatten, unflatten
from jaxlora.lora import DTYPES, LoraConfig, LoraConfigError, LoraError, LoRAWeight
from jaxlora.safetensors_io import SafetensorsFile, save_file

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"


class UnsupportedAdapterError(LoraError):
    """An adapter uses something jaxlora does not implement, or does not fit the model."""


# ---- adapter_config.json ------------------------------------------------------------------------

# Fields PEFT writes that jaxlora cannot honour unless they hold PEFT's default (the value here).
_MUST_BE_DEFAULT = {
    "fan_in_fan_out": False,
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "megatron_config": None,
    "alora_invocation_tokens": None,
    "velora_config": None,
    "arrow_config": None,
    "kasa_config": None,
    "use_bdlora": None,
    "monteclora_config": None,
}
# Keys older PEFT versions wrote; harmless at these values, never written.
_LEGACY = {"enable_lora": None, "merge_weights": False}
# Fields that do not change what the adapter computes (bookkeeping, other inits' settings).
_IGNORED = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "runtime_config",
    "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying",
}  # fmt: skip
_READ = {
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias",
    "modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "use_rslora", "use_dora", "init_lora_weights", "loftq_config",
}  # fmt: skip
# init_lora_weights values whose adapter is plain LoRA on an unchanged base once loaded.
_BASE_PRESERVING = {True: "default", False: "random", "gaussian": "gaussian", "eva": "default",
                    "orthogonal": "default"}  # fmt: skip


def config_to_peft(cfg: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The dict ``peft.LoraConfig(...).to_dict()`` + ``save_pretrained`` write for ``cfg``."""
    tm = cfg.target_modules if cfg.target_modules is not None else ("q_proj", "v_proj")
    init: Any = {"default": True, "random": False}.get(cfg.init, cfg.init)
    d: dict[str, Any] = dict(_MUST_BE_DEFAULT)
    d |= {
        "peft_type": "LORA",
        "peft_version": PEFT_VERSION,
        "task_type": "CAUSAL_LM",
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": tm if isinstance(tm, str) else sorted(tm),
        "exclude_modules": (
            cfg.exclude_modules if not isinstance(cfg.exclude_modules, tuple)
            else sorted(cfg.exclude_modules)
        ),
        "bias": cfg.bias,
        "modules_to_save": list(cfg.modules_to_save) or None,
        "layers_to_transform": (
            list(cfg.layers_to_transform) if isinstance(cfg.layers_to_transform, tuple)
            else cfg.layers_to_transform
        ),
        "layers_pattern": (
            list(cfg.layers_pattern) if isinstance(cfg.layers_pattern, tuple)
            else cfg.layers_pattern
        ),
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "init_lora_weights": init,
        "loftq_config": (
            {"loftq_bits": 4, "loftq_iter": cfg.loftq_iters} if cfg.init == "loftq" else {}
        ),
        "megatron_core": "megatron.core",
        "qalora_group_size": 16,
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "ensure_weight_tying": False,
    }  # fmt: skip
    return d


def config_from_peft(d: Mapping[str, Any]) -> LoraConfig:
    """Parse an ``adapter_config.json`` dict into a :class:`LoraConfig`, refusing by name every
    PEFT feature jaxlora does not implement and every field it does not know."""
    where = "adapter_config.json"
    if d.get("peft_type") != "LORA":
        raise UnsupportedAdapterError(
            f"{where}: peft_type={d.get('peft_type')!r}; jaxlora reads LoRA adapters only"
        )
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        raise UnsupportedAdapterError(
            f"{where}: task_type={d['task_type']!r}; jaxlora models are causal LMs"
        )
    unknown = sorted(set(d) - set(_MUST_BE_DEFAULT) - set(_LEGACY) - _IGNORED - _READ)
    if unknown:
        raise UnsupportedAdapterError(f"{where}: unknown field(s) {unknown}")
    for key, default in (_MUST_BE_DEFAULT | _LEGACY).items():
        value = d.get(key, default)
        if value != default and not (default is None and value in ([], {})):
            raise UnsupportedAdapterError(
                f"{where}: {key}={value!r} is not supported by jaxlora (only {default!r})"
            )
    init_w = d.get("init_lora_weights", True)
    loftq = d.get("loftq_config") or {}
    if isinstance(init_w, bool | str) and init_w in _BASE_PRESERVING:
        init = _BASE_PRESERVING[init_w]
    elif init_w == "pissa" or (isinstance(init_w, str) and init_w.startswith("pissa_niter_")):
        init = init_w
    elif init_w == "loftq":
        if loftq.get("loftq_bits", 4) != 4:
            raise UnsupportedAdapterError(f"{where}: loftq_bits={loftq['loftq_bits']}; only 4")
        init = "loftq"
    else:
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights={init_w!r} is not supported (it changes the base model "
            "in a way jaxlora does not reproduce)"
        )

    def seq(v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    try:
        return LoraConfig(
            r=d.get("r", 8),
            alpha=d.get("lora_alpha", 8),
            dropout=d.get("lora_dropout", 0.0),
            target_modules=seq(d.get("target_modules")),
            exclude_modules=seq(d.get("exclude_modules")),
            bias=d.get("bias", "none"),
            modules_to_save=tuple(d.get("modules_to_save") or ()),
            layers_to_transform=seq(d.get("layers_to_transform")),
            layers_pattern=seq(d.get("layers_pattern")) or None,
            rank_pattern=d.get("rank_pattern") or {},
            alpha_pattern=d.get("alpha_pattern") or {},
            use_rslora=bool(d.get("use_rslora", False)),
            use_dora=bool(d.get("use_dora", False)),
            init=init,
            loftq_iters=int(loftq.get("loftq_iter", 1)),
        )
    except LoraConfigError as e:
        raise UnsupportedAdapterError(f"{where}: {e}") from None


# ---- save ------------------------------------------------------------------------------------------


def _params_and_cfg(model_or_params: Any, cfg: LoraConfig | None) -> tuple[dict, LoraConfig]:
    params = getattr(model_or_params, "params", model_or_params)
    cfg = cfg if cfg is not None else getattr(model_or_params, "lora", None)
    if not isinstance(params, dict):
        raise TypeError(f"expected a Model or a parameter dict, got {type(model_or_params)}")
    if cfg is None:
        raise ValueError("save_adapter: no LoraConfig given and the model has none applied")
    return params, cfg


def adapter_tensors(params: dict, cfg: LoraConfig) -> dict[str, np.ndarray]:
    """The ``{PEFT key: array}`` PEFT would save for ``params`` under ``cfg``.

    Checks that the LoRA weights in ``params`` are exactly the modules, ranks and scales ``cfg``
    describes, so the written ``adapter_config.json`` cannot misdescribe the tensors.
    """
    from jaxlora import lora_init

    flat = flatten(params)
    lora = {k.rsplit(".", 1)[0]: v for k, v in flat.items() if isinstance(v, LoRAWeight)}
    if not lora:
        raise ValueError("save_adapter: the parameters hold no LoRA weights")
    base_params = {k: (v.base if isinstance(v, LoRAWeight) else v) for k, v in flat.items()}
    targets = lora_init.resolve_targets(unflatten(base_params), cfg, strict=False)
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
    saved = lora_init.modules_to_save_paths(params, cfg)
    for key, leaf in flat.items():
        module, name = key.rsplit(".", 1)
        if any(module == m or module.startswith(m + ".") for m in saved):
            out[f"{PREFIX}{key}"] = leaf
        elif name == "bias" and (cfg.bias == "all" or (cfg.bias == "lora_only" and module in lora)):
            wrapped = module in lora
            out[f"{PREFIX}{module}.base_layer.bias" if wrapped else f"{PREFIX}{key}"] = leaf
    return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}


def save_adapter(
    model_or_params: Any,
    cfg: LoraConfig | str | Path | None,
    directory: str | Path | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a PEFT adapter directory that ``PeftModel.from_pretrained`` loads with no missing or
    unexpected keys. ``model_or_params``: a :class:`jaxlora.Model` (``cfg=None`` takes
    ``model.lora``, the base name defaults to ``model.source``) or a parameter dict.
    ``save_adapter(model, directory)`` is short for ``save_adapter(model, None, directory)``.

    ``init_lora_weights`` is written as PEFT would, so PEFT re-derives the same base on load:
    ``"pissa"`` makes PEFT recompute the (deterministic) residual from the original base. A
    randomized PiSSA (``pissa_niter_K``) or LoftQ base cannot be re-derived; those adapters are
    written with ``init_lora_weights: true`` and belong with the modified base (export it).
    """
    if isinstance(cfg, str | Path):
        if directory is not None:
            raise TypeError("save_adapter: cfg is a path and a directory was given too")
        cfg, directory = None, cfg
    if directory is None:
        raise TypeError("save_adapter: no directory given")
    params, cfg = _params_and_cfg(model_or_params, cfg)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model_or_params, "source", None)
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


# ---- load ------------------------------------------------------------------------------------------


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
    f = SafetensorsFile(weights)
    tensors = {}
    for key in f.keys():
        if not key.startswith(PREFIX):
            raise UnsupportedAdapterError(f"{weights}: key {key!r} lacks the {PREFIX!r} prefix")
        tensors[key[len(PREFIX) :]] = np.array(f.get(key))
    return cfg, tensors


def _refuse(directory: Any, msg: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"{directory}: {msg}")


def load_adapter(model: Any, directory: str | Path) -> Any:
    """Apply a PEFT LoRA adapter directory to a :class:`jaxlora.Model`; returns a new Model.

    The adapter's tensors decide which modules get LoRA; they must be exactly the modules its
    config targets on this model, with the config's ranks. Scales come from the config
    (``lora_alpha``, ``alpha_pattern``, ``use_rslora``). Adapters saved with
    ``init_lora_weights="pissa"`` get the base residual ``W − top_r(W)`` recomputed, as PEFT
    does when it loads one; randomized PiSSA and LoftQ bases cannot be re-derived and are refused.
    """
    from jaxlora import lora_init

    cfg, tensors = read_adapter(directory)
    if model.lora is not None:
        raise _refuse(directory, "the model already has a LoRA adapter; merge it first")
    if cfg.init == "loftq" or cfg.init.startswith("pissa_niter_"):
        raise _refuse(
            directory,
            f"init_lora_weights={cfg.init!r}: the adapter belongs to a base PEFT modified at init "
            "and that cannot be re-derived here; load the modified base and an adapter saved "
            "with init_lora_weights=true",
        )
    flat = flatten(model.params)
    lora: dict[str, dict[str, np.ndarray]] = {}
    replaced: dict[str, np.ndarray] = {}
    saved = lora_init.modules_to_save_paths(model.params, cfg)
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
        in_saved = any(module == m or module.startswith(m + ".") for m in saved)
        # PEFT also saves the embedding layers (save_embedding_layers) and loads them over the
        # base's; a resized vocabulary then fails the shape check below.
        embedding = module.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head") and name == "weight"
        if not (in_saved or embedding or (name == "bias" and cfg.bias != "none")):
            raise _refuse(directory, f"unexpected tensor {key!r} (not a LoRA weight, not a bias "
                                     "for this bias mode, not in modules_to_save)")  # fmt: skip
        replaced[key] = arr
    try:
        targets = lora_init.resolve_targets(model.params, cfg, strict=False)
        lora_init.check_modules_to_save(model.params, cfg)
    except LoraConfigError as e:
        raise _refuse(directory, f"does not fit this model: {e}") from None
    if set(targets) != set(lora):
        raise _refuse(
            directory,
            "its tensors and its config disagree on the LoRA modules: config only "
            f"{sorted(set(targets) - set(lora))[:6]}, tensors only {sorted(set(lora) - set(targets))[:6]}",
        )
    dtype = DTYPES[cfg.dtype]
    new = dict(flat)
    for path, parts in lora.items():
        new[f"{path}.weight"] = _lora_weight(
            directory, cfg, path, parts, flat[f"{path}.weight"], dtype
        )
    for key, arr in replaced.items():
        old = flat[key]
        if not isinstance(old, jax.Array | np.ndarray):
            raise _refuse(directory, f"{key}: cannot replace a {type(old).__name__} in full")
        if tuple(arr.shape) != tuple(old.shape):
            raise _refuse(
                directory,
                f"{key} has shape {arr.shape}, the model {tuple(old.shape)}"
                + (" (resized vocabulary?)" if "embed" in key or "lm_head" in key else ""),
            )
        new[key] = jnp.asarray(arr).astype(old.dtype)
    return dataclasses.replace(model, params=unflatten(new), lora=cfg)


def _lora_weight(
    directory, cfg: LoraConfig, path: str, parts: dict, base: Any, dtype
) -> LoRAWeight:
    from jaxlora import lora_init

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
    return LoRAWeight(base, jnp.asarray(a).astype(dtype), jnp.asarray(b).astype(dtype), magnitude,
                      scale=scale, dropout=cfg.dropout, use_dora=cfg.use_dora)  # fmt: skip
