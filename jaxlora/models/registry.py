"""Model families by ``model_type``: the one place a ``config.json`` becomes its config class,
its Flax module and its Hugging Face parameter names.

Everything outside :mod:`jaxlora.models` that depends on the family asks here: loading
(:func:`config_from_hf`, :func:`param_shapes`), the module a :class:`jaxlora.Model` runs
(:func:`family` ``.module``), where the embedding and the layers sit in the tree, the logical
axes of each weight (:data:`MODULE_AXES`), PEFT's default ``target_modules``
(:func:`default_targets`) and the fused projections that shard on whole heads or groups
(:func:`fused_layouts`). A new family is one :class:`Family` entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora.models import falcon, gemma_config, llama, stacking
from jaxlora.models.config import ARCHITECTURES, LlamaConfig, UnsupportedConfigError
from jaxlora.models.falcon_config import FalconConfig

ModelConfig = LlamaConfig | FalconConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """What jaxlora needs to know about one architecture family.

    ``layers`` and ``embed`` are the tree paths of the decoder layers and the token embedding
    (Hugging Face's); ``default_targets`` is PEFT's ``target_modules`` default for the family
    (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``); ``layouts`` maps a config to
    ``{module name: (part rows, unit rows)}`` for projections that stack several outputs on
    ``out`` (:func:`jaxlora.training.sharding.leaf_spec` splits them only into whole units
    inside one part).
    """

    model_types: tuple[str, ...]
    config_cls: type
    module: type
    module_axes: dict[str, tuple[str, ...]]
    layers: tuple[str, str]
    embed: tuple[str, str]
    default_targets: tuple[str, ...]
    layouts: Callable[[Any], dict[str, tuple[tuple[int, ...], int]]] = lambda config: {}


FAMILIES: tuple[Family, ...] = (
    Family(
        # gemma3 (image-text) checkpoints are read as their language model (gemma3_text)
        model_types=(*ARCHITECTURES, gemma_config.MULTIMODAL),
        config_cls=LlamaConfig,
        module=llama.LlamaForCausalLM,
        module_axes=llama.MODULE_AXES,
        layers=("model", "layers"),
        embed=("model", "embed_tokens"),
        default_targets=("q_proj", "v_proj"),
        layouts=llama.fused_layouts,
    ),
    Family(
        model_types=("falcon",),
        config_cls=FalconConfig,
        module=falcon.FalconForCausalLM,
        module_axes=falcon.MODULE_AXES,
        layers=("transformer", "h"),
        embed=("transformer", "word_embeddings"),
        default_targets=("query_key_value",),
        layouts=falcon.fused_layouts,
    ),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
# Every projection some family stacks several outputs in (its ``layouts``): without the
# model's layout, sharding keeps their ``out`` whole.
FUSED_MODULES = ("qkv_proj", "gate_up_proj", "query_key_value")
# Every family's token embedding table (``embed``'s module), looked up by row
EMBED_MODULES = tuple(sorted({f.embed[-1] for f in FAMILIES}))
assert all(f.layers in stacking.LAYER_PATHS for f in FAMILIES)


def _merged_axes() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for f in FAMILIES:
        for name, axes in f.module_axes.items():
            if out.setdefault(name, axes) != axes:
                raise AssertionError(f"module {name!r} has different axes in two families")
    return out


# Logical axes by Hugging Face module name, across families (a name means one thing in all).
MODULE_AXES: dict[str, tuple[str, ...]] = _merged_axes()


def family(config: ModelConfig) -> Family:
    """The family of a parsed config."""
    return _BY_TYPE[config.model_type]


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Parse a ``config.json`` dict with its family's reader, refusing an unknown family."""
    model_type = raw.get("model_type")
    if model_type not in _BY_TYPE:
        raise UnsupportedConfigError(
            f"config.json: model_type={model_type!r} is not supported "
            f"(supported: {sorted(_BY_TYPE)})"
        )
    return _BY_TYPE[model_type].config_cls.from_hf(raw)


def init_params(config: ModelConfig, key: jax.Array, param_dtype=jnp.float32) -> dict:
    """Random parameters (normal(0, 0.02) weights, unit norms, zero biases) in the HF layout."""
    module = family(config).module(config, param_dtype=param_dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    return module.init({"params": key}, ids, ids, ids + 1)["params"]


def param_shapes(config: ModelConfig, param_dtype=jnp.float32) -> dict:
    """The expected parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    return jax.eval_shape(lambda k: init_params(config, k, param_dtype), jax.random.key(0))


def embedding(config: ModelConfig, params: dict) -> Any:
    """The ``[vocab, hidden]`` token embedding weight of a parameter tree."""
    first, second = family(config).embed
    return params[first][second]["weight"]


def default_targets(module_names: Iterable[str]) -> tuple[str, ...]:
    """PEFT's default ``target_modules`` for the family whose default modules a tree has
    (PEFT keys its table by model_type; the module names say the same here, where only the
    tree is at hand). Llama's ``q_proj, v_proj`` when none matches, so the error names them."""
    names = {m.rsplit(".", 1)[-1] for m in module_names}
    for f in FAMILIES:
        if set(f.default_targets) <= names:
            return f.default_targets
    return FAMILIES[0].default_targets


def fused_layouts(config: ModelConfig | None) -> dict[str, tuple[tuple[int, ...], int]]:
    """``{module: (part rows, unit rows)}`` of ``config``'s fused projections (none without one)."""
    return {} if config is None else family(config).layouts(config)
