"""A flash attention kernel on a device mesh: each device runs it on its own batch rows and
heads inside ``shard_map``.

XLA cannot partition these calls. On TPU it refuses a Pallas call ("Mosaic kernels cannot be
automatically partitioned"); on GPU it replicates a Triton or cuDNN custom call, every device
gathering the whole batch and computing all of it. Attention needs no communication to be
split, as long as each device holds whole sequences: rows are independent, and so are heads.
So the partitioning is written out here (as ``jaxlora.kernels.nf4_sharded`` does for the NF4
matmul), from the mesh and the roles of its axes (static data, :class:`AttentionMesh`):

* batch rows over the batch axes (``data``, ``fsdp``), as the activations already lie, when
  the rows divide their size; otherwise every device takes every row (a tiny eval batch);
* heads over the head axis (``tensor``), in the model's grouped layout ``q (B, KV, G, S, D)``,
  ``k, v (B, KV, S, D)``, query head ``kv·G + g`` reading kv head ``kv``:

  - ``KV`` divisible by the axis size: the **kv heads** are split, each device taking its kv
    heads with their ``G`` query heads. This is how a column-parallel ``q_proj`` / ``k_proj`` /
    ``v_proj`` output already lies (contiguous blocks of heads), so nothing moves.
  - otherwise, ``G`` divisible by it: **k and v are replicated** over the axis (every device
    holds all kv heads, as ``k_proj``/``v_proj`` are when their ``kv_heads`` do not divide) and
    the query groups are split; XLA moves ``q`` into that layout and back, and the ``dk, dv``
    partial sums are added over the axis by ``shard_map``'s transpose.
  - neither: refused with an error naming the sizes (no layout keeps whole heads per device);
* the sequence whole on every device (no ring attention here).

Inside, nothing is communicated; the kernel's own VJP (splash's dq/dkv kernels, Pallas flash's,
cuDNN's) runs per device in the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

Axes = tuple[str, ...]
KERNELS = ("splash", "cudnn", "pallas_gpu")  # the attention custom calls XLA cannot partition


@dataclass(frozen=True)
class AttentionMesh:
    """Where a sharded program's attention runs: the mesh, the axes its batch rows are split
    over, and the axis its heads are split over (``None``: heads whole on every device)."""

    mesh: Mesh | AbstractMesh
    batch_axes: Axes = ()
    head_axis: str | None = None

    def __post_init__(self):
        for a in self.batch_axes + (() if self.head_axis is None else (self.head_axis,)):
            if a not in self.mesh.shape:
                raise ValueError(f"attention mesh {dict(self.mesh.shape)} has no axis {a!r}")
        if self.head_axis in self.batch_axes:
            raise ValueError(f"axis {self.head_axis!r} cannot split both the batch and the heads")


@dataclass(frozen=True)
class Layout:
    """The ``PartitionSpec`` s of one sharded attention call; ``heads`` says how heads split:
    ``"kv"`` (kv heads), ``"groups"`` (query groups; k and v replicated) or ``"whole"``."""

    q: PartitionSpec  # q and the output (B, KV, G, S, D)
    kv: PartitionSpec  # k, v (B, KV, S, D)
    segments: PartitionSpec  # segment ids (B, S)
    heads: str


def head_split(am: AttentionMesh, kv_heads: int, groups: int) -> str:
    """How ``kv_heads × groups`` query heads split over ``am``'s head axis: ``"kv"``,
    ``"groups"`` or ``"whole"`` (module doc); ``ValueError`` naming the sizes when neither
    divides."""
    t = am.mesh.shape[am.head_axis] if am.head_axis is not None else 1
    if t == 1:
        return "whole"
    if kv_heads % t == 0:
        return "kv"
    if groups % t == 0:
        return "groups"
    raise ValueError(
        f"sharded attention: {kv_heads} kv heads × {groups} query heads each cannot be split "
        f"over {am.head_axis!r} (size {t}): neither the kv heads nor the query heads per kv "
        f"head divide by it. Use a mesh.tensor that divides {kv_heads} or {groups}, or 1"
    )


def layout(am: AttentionMesh, batch: int, kv_heads: int, groups: int) -> Layout:
    """The specs for ``batch`` rows of ``kv_heads × groups`` query heads on ``am``."""
    shape = am.mesh.shape
    rows = tuple(a for a in am.batch_axes if shape[a] > 1)
    if batch % math.prod(shape[a] for a in rows):
        rows = ()  # every device takes every row
    b = None if not rows else rows[0] if len(rows) == 1 else rows
    heads = head_split(am, kv_heads, groups)
    h = am.head_axis
    q = {"whole": PartitionSpec(b), "kv": PartitionSpec(b, h), "groups": PartitionSpec(b, None, h)}
    kv = PartitionSpec(b, h) if heads == "kv" else PartitionSpec(b)
    return Layout(q[heads], kv, PartitionSpec(b), heads)


def sharded(
    kernel: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    am: AttentionMesh,
) -> jax.Array:
    """``kernel(q, k, v, segment_ids)`` (self-attention on ``q (B, KV, G, S, D)``,
    ``k, v (B, KV, S, D)``, ``segment_ids (B, S)``) run on each device's rows and heads of
    ``am.mesh``; the result lies as ``q`` does (:func:`layout`)."""
    B, KV, G = q.shape[:3]
    lay = layout(am, B, KV, G)
    return jax.shard_map(
        kernel,
        mesh=am.mesh,
        in_specs=(lay.q, lay.kv, lay.kv, lay.segments),
        out_specs=lay.q,
        check_vma=False,  # Pallas and cuDNN calls carry no varying-axes types
    )(q, k, v, segment_ids)
