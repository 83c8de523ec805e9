"""LoRA as pure functions of parameter trees, with PEFT's names and semantics.

``inject`` wraps the weights a :class:`LoraConfig` targets in :class:`LoRAWeight`;
``partition`` / ``combine`` split a tree into its frozen and trainable halves and back;
``merge`` / ``unmerge`` fold adapters into the base and out again. Matching is
:mod:`jaxlora.lora.targets`, initial values :mod:`jaxlora.lora.init`.
"""

from jaxlora.config.lora import BIAS_MODES, INITS, LoraConfig, LoraConfigError, LoraError, to_meta
from jaxlora.lora.transform import combine, inject, merge, partition, unmerge
from jaxlora.weights.lora import LoRAWeight

__all__ = [
    "BIAS_MODES",
    "INITS",
    "LoRAWeight",
    "LoraConfig",
    "LoraConfigError",
    "LoraError",
    "combine",
    "inject",
    "merge",
    "partition",
    "to_meta",
    "unmerge",
]
