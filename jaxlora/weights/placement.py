"""Writing what a program is built for into its parameter tree: :func:`prepare`.

The choice of kernels (:class:`~jaxlora.weights.dispatch.Kernels`) and, for a sharded program,
the mesh and each 4-bit weight's ``PartitionSpec`` become static data of the weights, so a
jitted step is compiled for exactly what its arguments say, with no global switch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.weights.dispatch import Kernels, NF4Run
from jaxlora.weights.lora import LoRAWeight
from jaxlora.weights.nf4 import NF4Tensor


def _is_weight(x: Any) -> bool:
    return isinstance(x, NF4Tensor | LoRAWeight)


def prepare(
    params: Any,
    kernels: Kernels,
    *,
    shardings: Any = None,
    batch_axes: tuple[str, ...] = (),
) -> Any:
    """``params`` with every weight set to run as ``kernels`` says: 4-bit weights get an
    :class:`~jaxlora.weights.dispatch.NF4Run` (with the mesh and their codes' spec when
    ``shardings``, a tree of ``NamedSharding`` s like ``params``, is given; ``batch_axes`` are
    the mesh axes the batch rows are split over; without it a weight keeps the mesh it had),
    LoRA weights whether to fuse base and adapter.
    """

    def one(w: Any, sh: Any = None) -> Any:
        if isinstance(w, LoRAWeight):
            base = w.base if w.base is None else one(w.base, None if sh is None else sh.base)
            return w.replace(base=base, fuse=kernels.fuse_lora)
        if isinstance(w, NF4Tensor):
            codes_sh = None if sh is None else sh.codes
            if isinstance(codes_sh, NamedSharding) and isinstance(codes_sh.mesh, Mesh):
                # Stacked layers (a leading layer axis, unsharded) are multiplied one layer at
                # a time inside scan: the kernel sees the spec of one layer's codes.
                lead = np.ndim(w.codes) - (2 if w.is_2d else 1)
                spec = PartitionSpec(*tuple(codes_sh.spec)[lead:])
                run = NF4Run(kernels, codes_sh.mesh, spec, tuple(batch_axes))
            else:  # the weight keeps the mesh and spec it was prepared with, if any
                run = NF4Run(kernels, w.run.mesh, w.run.spec, w.run.batch_axes)
            return w.with_run(run)
        return w

    if shardings is None:
        return jax.tree.map(one, params, is_leaf=_is_weight)
    return jax.tree.map(one, params, shardings, is_leaf=_is_weight)
