"""PEFT's ``adapter_config.json`` <-> :class:`~jaxlora.config.lora.LoraConfig`.

Field names and defaults are peft 0.21.2's (``LoraConfig.to_dict`` + ``save_pretrained``); every
field jaxlora cannot honour is refused by name unless it holds PEFT's default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxlora.config.lora import LoraConfig, LoraConfigError, LoraError
from jaxlora.lora.targets import DEFAULT_TARGETS

PEFT_VERSION = "0.21.2"


class UnsupportedAdapterError(LoraError):
    """An adapter uses something jaxlora does not implement, or does not fit the model."""


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
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "megatron_core",
    "qalora_group_size",
    "runtime_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "ensure_weight_tying",
}
_READ = {
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
    "loftq_config",
}
# init_lora_weights values whose adapter is plain LoRA on an unchanged base once loaded.
_BASE_PRESERVING = {
    True: "default",
    False: "random",
    "gaussian": "gaussian",
    "eva": "default",
    "orthogonal": "default",
}


def config_to_peft(cfg: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The dict ``peft.LoraConfig(...).to_dict()`` + ``save_pretrained`` write for ``cfg``."""
    tm = cfg.target_modules if cfg.target_modules is not None else DEFAULT_TARGETS
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
            cfg.exclude_modules
            if not isinstance(cfg.exclude_modules, tuple)
            else sorted(cfg.exclude_modules)
        ),
        "bias": cfg.bias,
        "modules_to_save": list(cfg.modules_to_save) or None,
        "layers_to_transform": (
            list(cfg.layers_to_transform)
            if isinstance(cfg.layers_to_transform, tuple)
            else cfg.layers_to_transform
        ),
        "layers_pattern": (
            list(cfg.layers_pattern)
            if isinstance(cfg.layers_pattern, tuple)
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
    }
    return d


def config_from_peft(d: Mapping[str, Any]) -> LoraConfig:
    """Parse an ``adapter_config.json`` dict into a :class:`LoraConfig`, refusing by name every
    PEFT feature jaxlora does not implement and every field it does not know."""
    where = "adapter_config.json"
    if not isinstance(d, Mapping):
        raise UnsupportedAdapterError(f"{where}: a JSON {type(d).__name__}, not an object")
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
