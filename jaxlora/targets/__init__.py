"""Hardware targets: compile jaxlora for TPU and GPU machines from a CPU-only one.

>>> from jaxlora import targets
>>> t = targets.get_target("tpu-v5e-8")
>>> mesh = targets.compile_mesh(t, data=2, fsdp=2, tensor=2)   # compile-only devices
>>> jax.jit(step).lower(*abstract_args_on(mesh)).compile().memory_analysis()

* :mod:`~jaxlora.targets.registry`: named targets (platform, device count, memory per
  device, compute capability, which NF4 matmul runs there).
* :mod:`~jaxlora.targets.toolchain`: compile-only devices from libtpu / the CUDA PJRT plugin
  (the one module on JAX's experimental and private APIs, pinned to the JAX it was written for).
* :mod:`~jaxlora.targets.hlo`: kernels and collectives in compiled HLO text.

Depends only on jax and numpy.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

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

MESH_AXES = ("data", "fsdp", "tensor")

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
    "get_target",
    "missing_toolchains",
    "nf4_kernel_for",
]


def compile_mesh(target: Target | str, *, data: int = 1, fsdp: int = -1, tensor: int = 1) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh of ``target``'s compile-only devices (one size may be
    -1: the rest) with Auto axes, laid out as ``jax.make_mesh`` lays out real devices (the
    TPU torus order, as ``jaxlora.sharding.make_mesh`` gets at run time). libtpu's per-core
    v4 devices are refused by that layout and keep their topology order."""
    devices = compile_devices(target)
    sizes = [data, fsdp, tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1 or len(devices) % known:
        raise ValueError(f"mesh data×fsdp×tensor={sizes} does not fit {len(devices)} devices")
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data×fsdp×tensor={sizes} != {len(devices)} devices")
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if any(getattr(d, "core_on_chip", 0) for d in devices):  # one device per TensorCore
        return Mesh(np.array(devices, dtype=object).reshape(sizes), MESH_AXES, axis_types=auto)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
