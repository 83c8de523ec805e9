"""Hardware targets: compile jaxlora for TPU and GPU machines from a CPU-only one.

>>> from jaxlora import targets
>>> t = targets.get_target("tpu-v5e-8")
>>> mesh = targets.compile_mesh(t, data=2, fsdp=2, tensor=2)   # compile-only devices
>>> jax.jit(step).lower(*abstract_args_on(mesh)).compile().memory_analysis()

* :mod:`~jaxlora.targets.registry`: named targets (platform, device count, memory per
  device, compute capability, which NF4 matmul runs there).
* :mod:`~jaxlora.targets.toolchain`: compile-only devices from libtpu / the CUDA PJRT plugin
  (the one module on JAX's experimental and private APIs, pinned to the JAX it was written for).
* :mod:`~jaxlora.targets.hlo`: computations, kernels and collectives in compiled HLO text.
* :mod:`~jaxlora.targets.flops`: a compiled step's matmul FLOPs per device, every loop body ×
  its trip count.

Depends only on jax and numpy.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxlora.config import MESH_AXES
from jaxlora.targets.registry import (
    DEQUANT,
    MOSAIC,
    TARGETS,
    TRITON,
    Target,
    get_target,
    nf4_kernel_for,
)
from jaxlora.targets.toolchain import (
    JAX_VERSION,
    ToolchainError,
    check_jax_version,
    compile_devices,
    missing_toolchains,
)

__all__ = [
    "DEQUANT",
    "JAX_VERSION",
    "MESH_AXES",
    "MOSAIC",
    "TARGETS",
    "TRITON",
    "Target",
    "ToolchainError",
    "check_jax_version",
    "compile_devices",
    "compile_mesh",
    "make_mesh",
    "get_target",
    "missing_toolchains",
    "nf4_kernel_for",
]


def make_mesh(devices, data: int = 1, fsdp: int = -1, tensor: int = 1) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (real or compile-only; one size may be
    -1: the rest) with Auto axes, so XLA's partitioner propagates shardings from a jitted
    step's explicit in/out shardings (``jax.make_mesh`` would otherwise default to explicit
    sharding-in-types). Laid out as ``jax.make_mesh`` lays out devices (the TPU torus order);
    libtpu's per-core v4 compile-only devices are refused by that layout and keep their
    topology order."""
    devices = list(devices)
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError("mesh: at most one of data/fsdp/tensor may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh: {n} devices do not divide into data×fsdp×tensor={sizes}")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(
            f"mesh: data×fsdp×tensor = {'×'.join(map(str, sizes))} = {int(np.prod(sizes))}, "
            f"but there are {n} devices"
        )
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if any(getattr(d, "core_on_chip", 0) for d in devices):  # one device per TensorCore
        return Mesh(np.array(devices, dtype=object).reshape(sizes), MESH_AXES, axis_types=auto)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def compile_mesh(target: Target | str, *, data: int = 1, fsdp: int = -1, tensor: int = 1) -> Mesh:
    """:func:`make_mesh` over ``target``'s compile-only devices."""
    return make_mesh(compile_devices(target), data, fsdp, tensor)
