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
from jaxlora.weights.lora import FactorUse, LoRAWeight
from jaxlora.weights.nf4 import NF4Tensor


def _is_weight(x: Any) -> bool:
    return isinstance(x, NF4Tensor | LoRAWeight)


def prepare(
    params: Any,
    kernels: Kernels,
    *,
    shardings: Any = None,
    batch_axes: tuple[str, ...] = (),
    adapters: Any = None,
) -> Any:
    """``params`` with every weight set to run as ``kernels`` says: 4-bit weights get an
    :class:`~jaxlora.weights.dispatch.NF4Run` (with the mesh and their codes' spec when
    ``shardings``, a tree of ``NamedSharding`` s like ``params``, is given; ``batch_axes`` are
    the mesh axes the batch rows are split over; without it a weight keeps the mesh it had),
    LoRA weights whether to fuse base and adapter and, given ``adapters`` (the trainable
    tree's ``NamedSharding`` s, over more than one device), where their factors lie while
    multiplied (:class:`~jaxlora.weights.lora.FactorUse`: their specs without ``fsdp``).
    """

    def one(w: Any, sh: Any = None, ad: Any = None) -> Any:
        if isinstance(w, LoRAWeight):
            base = w.base if w.base is None else one(w.base, None if sh is None else sh.base)
            use = _factor_use(ad) if isinstance(ad, LoRAWeight) else w.use
            return w.replace(base=base, fuse=kernels.fuse_lora, use=use)
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

    if shardings is None and adapters is None:
        return jax.tree.map(one, params, is_leaf=_is_weight)
    nothing = lambda tree: (
        jax.tree.map(lambda _: None, params, is_leaf=_is_weight) if tree is None else tree
    )
    # a trainable-only leaf is None in `params`: a leaf here, whatever `adapters` holds there
    hole = lambda x: x is None or _is_weight(x)
    return jax.tree.map(one, params, nothing(shardings), nothing(adapters), is_leaf=hole)


def _without_fsdp(spec: PartitionSpec, lead: int) -> PartitionSpec:
    """One layer's spec (``lead`` stacked-layer axes dropped) with ``fsdp`` taken out."""

    def entry(e):
        if e is None or isinstance(e, str):
            return None if e == "fsdp" else e
        kept = tuple(m for m in e if m != "fsdp")
        return kept[0] if len(kept) == 1 else (kept or None)

    return PartitionSpec(*(entry(e) for e in tuple(spec)[lead:]))


def _factor_use(ad: LoRAWeight) -> FactorUse | None:
    """The :class:`FactorUse` of a trainable half whose leaves are ``NamedSharding`` s; None on
    one device (nothing to gather)."""
    a_sh, b_sh, m_sh = ad.a, ad.b, ad.magnitude
    if not isinstance(a_sh, NamedSharding) or a_sh.mesh.size == 1:
        return None
    lead = max(0, len(a_sh.spec) - 2)  # a stacked leaf's layer axes

    def spec(sh, ndim: int) -> PartitionSpec | None:
        if not isinstance(sh, NamedSharding):
            return None
        full = tuple(sh.spec) + (None,) * (lead + ndim - len(sh.spec))
        return _without_fsdp(PartitionSpec(*full), lead)

    return FactorUse(a_sh.mesh, spec(a_sh, 2), spec(b_sh, 2), spec(m_sh, 1))
