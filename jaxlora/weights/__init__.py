"""Weights are values: a plain ``[out, in]`` array, an :class:`NF4Tensor` (bitsandbytes' packed
4-bit format) or a :class:`LoRAWeight` (base + low-rank update), each a registered pytree, all
consumed by one projection, :func:`dense`, whose dispatch (:mod:`jaxlora.weights.dispatch`)
is the one place that decides how a product is computed."""

from jaxlora.weights.dispatch import (
    Kernels,
    KernelUnavailableError,
    NF4Run,
    Quantized,
    Weight,
    dense,
    dense_weight,
    kernels_for,
)
from jaxlora.weights.lora import LoRAWeight
from jaxlora.weights.nf4 import NF4Tensor, quantize, storage_bits_per_param
from jaxlora.weights.placement import prepare

__all__ = [
    "KernelUnavailableError",
    "Kernels",
    "LoRAWeight",
    "NF4Run",
    "NF4Tensor",
    "Quantized",
    "Weight",
    "dense",
    "dense_weight",
    "kernels_for",
    "prepare",
    "quantize",
    "storage_bits_per_param",
]
