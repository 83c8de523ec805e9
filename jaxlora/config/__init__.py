"""Configuration: typed, frozen sections for a whole run, recipes, and the one CLI grammar.

The bottom of the package graph (it imports nothing else from jaxlora but the dtype table):
every stage reads its own section (``lora``, ``data``, ``train``, ``mesh``, ...) from the
:class:`Config` built here. ``typed`` holds the machinery (coercion, checks, nearest-key errors,
``key.sub=value`` overrides), ``recipe`` the run's schema and recipe loading, ``lora`` LoRA's
section with PEFT's names.
"""

from jaxlora.config.lora import LoraConfig, LoraConfigError, LoraError
from jaxlora.config.recipe import (
    LOGICAL_AXES,
    MESH_AXES,
    RECIPES_DIR,
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    QuantConfig,
    SourceConfig,
    TrainConfig,
    available_recipes,
    config_from_argv,
    load_config,
    print_config,
    save_config,
    to_yaml,
)
from jaxlora.config.typed import ConfigError, Section, from_argv

__all__ = [
    "RECIPES_DIR",
    "LOGICAL_AXES",
    "MESH_AXES",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoraConfig",
    "LoraConfigError",
    "LoraError",
    "MeshConfig",
    "ModelConfig",
    "QuantConfig",
    "Section",
    "SourceConfig",
    "TrainConfig",
    "available_recipes",
    "config_from_argv",
    "from_argv",
    "load_config",
    "print_config",
    "save_config",
    "to_yaml",
]
