"""Logical axes -> device mesh: shardings for any parameter, optimizer-state or batch tree.

The model declares logical axes per weight (``MODULE_AXES`` in ``models/registry.py``, by
Hugging Face module name, over every family); the recipe's ``mesh.rules`` map them to mesh axes
(``data``, ``fsdp``, ``tensor``). Model code never names a mesh axis. Inside weight types:

* ``NF4Tensor``: packed ``codes [out, in/2]`` and ``absmax [out, in/blocksize]`` shard like the
  weight, so every shard holds whole 64-blocks with their absmax beside them (a split of ``in``
  is only taken when it falls on block boundaries); the tiny ``nested_absmax``/``offset`` are
  replicated. Flat-layout tensors (``in`` not a multiple of the block) are replicated.
* ``LoRAWeight``: ``a [r, in]`` shards its ``in`` like the base, ``b [out, r]`` its ``out``;
  the rank axis follows the ``lora_rank`` rule (replicated by default: it is small). A factor
  (or DoRA magnitude) that no rule puts on ``fsdp`` is split over ``fsdp`` too, on its
  ``in`` / ``out`` (after ``tensor`` where that splits it already): under the default rules the
  ``b`` of every projection whose ``out`` is heads or MLP width, and the ``a`` of ``o_proj`` and
  ``down_proj``, would otherwise sit whole on every device of a pure FSDP mesh, with their
  gradients and optimizer state (at Llama-3.1-8B, rank 64, 8 chips: 0.43 GiB of adapter and
  0.87 of Adam state per chip instead of 0.08 and 0.16). FSDP gathers them before use like the
  base weights, and reduce-scatters their gradients.

A mesh axis is dropped from a spec where the dimension does not divide evenly, or where an
earlier dimension of the same array already uses it. A fused projection (Phi-3's ``qkv_proj``,
``gate_up_proj``: q | k | v, gate | up; Falcon's ``query_key_value``: ``[q.., k, v]`` per KV
group; ``jaxlora.models.registry.fused_layouts``) splits its ``out`` only where every shard is
whole units (heads, rows, KV groups) inside one of its parts, so slicing the output into its
parts moves no data — for the weight, its bias and LoRA ``b``; without its layout its ``out``
stays whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora import targets
from jaxlora.models.registry import EMBED_MODULES, FUSED_MODULES, MODULE_AXES
from jaxlora.models.stacking import run_of
from jaxlora.weights import NF4Tensor

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over all (global) devices, or ``devices``; one size may
    be -1 (the rest). See :func:`jaxlora.targets.make_mesh`."""
    return targets.make_mesh(jax.devices() if devices is None else devices, data, fsdp, tensor)


def _key_name(k) -> str | None:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    return None


def logical_axes_for(path, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of one leaf from its tree path (param tree or optimizer state alike). A
    leaf of stacked layers (under a ``start:stop`` key, :mod:`jaxlora.models.stacking`) has the
    layer axis first, never sharded: each scan step takes one layer whole."""
    names = [_key_name(k) for k in path]
    if ndim and run_of(names) is not None:
        return (None, *_axes_by_name(names, ndim - 1))
    return _axes_by_name(names, ndim)


def _module_part(names: list[str | None]) -> tuple[str | None, str | None]:
    """The innermost Hugging Face module a leaf's path names (``MODULE_AXES``) and the leaf's
    part of it (``a``, ``b``, ``codes``, ``bias``...; None for the weight itself)."""
    module_at = max((i for i, n in enumerate(names) if n in MODULE_AXES), default=None)
    if module_at is None:
        return None, None
    rest = [n for n in names[module_at + 1 :] if n not in ("weight", "base")]
    return names[module_at], rest[-1] if rest else None


def _axes_by_name(names: list[str | None], ndim: int) -> tuple[str | None, ...]:
    module, part = _module_part(names)
    if module is None or ndim == 0:
        return (None,) * ndim
    axes = MODULE_AXES[module]
    out_ax, in_ax = (axes + (None,))[:2]
    if part == "bias" or part == "magnitude" or part == "lora_magnitude_vector":
        return (out_ax,) if ndim == 1 else (None,) * ndim
    if part == "a":  # LoRA A [r, in] (an optimizer's factor of it: replicated)
        return ("lora_rank", in_ax) if ndim == 2 else (None,) * ndim
    if part == "b":  # LoRA B [out, r]
        return (out_ax, "lora_rank") if ndim == 2 else (None,) * ndim
    if part in ("nested_absmax", "offset"):
        return (None,) * ndim
    if part in ("codes", "absmax"):
        return (out_ax, in_ax) if ndim == 2 else (None,) * ndim  # flat layout: replicate
    if len(axes) == ndim:
        return axes
    return (None,) * ndim


def spec_for(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    rules: Mapping[str, str | None],
    mesh: Mesh,
) -> PartitionSpec:
    """Map logical axes to mesh axes, dropping any that don't divide or repeat."""
    used: set[str] = set()
    out = []
    for ax, dim in zip(axes, shape, strict=True):
        m = rules.get(ax) if ax is not None else None
        if m is not None and (m in used or dim % mesh.shape[m] or mesh.shape[m] == 1):
            m = None
        if m is not None:
            used.add(m)
        out.append(m)
    return PartitionSpec(*out)


def tree_shardings(
    tree: Any,
    mesh: Mesh,
    rules: Mapping[str, str | None],
    fused: Mapping[str, tuple[tuple[int, ...], int]] | None = None,
) -> Any:
    """A ``NamedSharding`` for every leaf of a params / opt-state tree (same structure);
    ``fused``: the model's ``fused_layouts``."""

    def one(path, leaf):
        return NamedSharding(mesh, leaf_spec(path, tuple(np.shape(leaf)), rules, mesh, fused))

    def node(path, leaf):
        if not isinstance(leaf, NF4Tensor):
            return one(path, leaf)
        sh = jax.tree_util.tree_map_with_path(lambda p, x: one(path + p, x), leaf)
        if leaf.is_2d:  # codes follow their absmax: a split of `in` on whole 64-blocks only
            sh = sh.replace_leaves(codes=sh.absmax)
        return sh

    return jax.tree_util.tree_map_with_path(node, tree, is_leaf=lambda x: isinstance(x, NF4Tensor))


def leaf_spec(path, shape: tuple[int, ...], rules, mesh: Mesh, fused=None) -> PartitionSpec:
    """The spec of one leaf at tree ``path``: its logical axes mapped by ``rules``, a fused
    projection's ``out`` split only on whole parts (``fused``: ``fused_layouts``)."""
    axes = logical_axes_for(path, len(shape))
    spec = spec_for(axes, shape, rules, mesh)
    module, part = _module_part([_key_name(k) for k in path])
    if part in _ADAPTER_PARTS:
        spec = _adapter_over_fsdp(axes, shape, spec, mesh)
    elif module in EMBED_MODULES and part is None and len(shape) == 2:
        spec = _rows_only(shape, spec, mesh)
    return _whole_parts(path, axes, spec, mesh, fused or {})


def _rows_only(shape: tuple[int, int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """An embedding table's ``spec`` with every mesh axis on its rows (``vocab``), when they
    divide it: a lookup takes whole rows, and a table split on its width (``embed`` ->
    ``fsdp``) has XLA look up width-split embeddings of the whole batch and move them to the
    batch's rows split (XLA:GPU with ``tensor`` > 1: "involuntary full rematerialization",
    every GPU receiving the whole batch's embeddings each step). Split on rows, FSDP gathers
    the table over ``fsdp``, as it gathers every weight, and the lookup's rows stay where the
    batch is."""
    entries = list(spec) + [None] * (2 - len(spec))
    axes = _mesh_axes(entries[0]) + _mesh_axes(entries[1])
    if not entries[1] or shape[0] % math.prod(mesh.shape[a] for a in axes):
        return spec
    return PartitionSpec(axes[0] if len(axes) == 1 else axes, None)


_ADAPTER_PARTS = ("a", "b", "magnitude", "lora_magnitude_vector")


def _mesh_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _adapter_over_fsdp(axes, shape, spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """``spec`` with ``fsdp`` added to the adapter leaf's model dimension (``in`` of ``a``,
    ``out`` of ``b`` and the magnitude; not the rank, not a stacked layer axis) when no
    dimension uses it yet and it divides (module docstring)."""
    n = mesh.shape.get("fsdp", 1)
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if n == 1 or any("fsdp" in _mesh_axes(e) for e in entries):
        return spec
    for i, (ax, dim) in enumerate(zip(axes, shape, strict=True)):
        if ax is None or ax == "lora_rank":
            continue
        have = _mesh_axes(entries[i])
        if dim % (math.prod(mesh.shape[m] for m in have) * n) == 0:
            entries[i] = (*have, "fsdp") if have else "fsdp"
            return PartitionSpec(*entries)
    return spec


def _whole_parts(path, axes, spec: PartitionSpec, mesh: Mesh, fused) -> PartitionSpec:
    """``spec`` with a fused projection's ``out`` split dropped unless each shard is whole
    units inside one part (see the module docstring)."""
    names = [_key_name(k) for k in path]
    module = next((n for n in reversed(names) if n in MODULE_AXES), None)
    if module not in FUSED_MODULES:
        return spec
    out_axis = MODULE_AXES[module][0]
    at = next((i for i, a in enumerate(axes) if a == out_axis), None)
    if at is None or spec[at] is None:
        return spec
    parts, unit = fused.get(module, ((), 0))
    split = math.prod(mesh.shape[m] for m in _mesh_axes(spec[at]))
    shard = sum(parts) // split if parts else 0
    if shard and shard % unit == 0 and all(p % shard == 0 for p in parts):
        return spec
    return PartitionSpec(*(None if i == at else m for i, m in enumerate(spec)))


def batch_sharding(mesh: Mesh, ndim: int = 2, leading: int = 0) -> NamedSharding:
    """Rows over ``data × fsdp``; ``leading`` unsharded axes first (e.g. grad-accum)."""
    spec = (None,) * leading + (BATCH_AXES,) + (None,) * (ndim - leading - 1)
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def place(tree: Any, shardings: Any) -> Any:
    """Put every leaf on its sharding (works for host numpy and device arrays)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays from each process's rows (``jax.make_array_from_process_local_data``)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }
