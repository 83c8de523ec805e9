"""The NF4 matmul ``y = x @ dequant(W)ᵀ`` on a device mesh: each device runs the kernel on
its own rows inside ``shard_map``.

XLA cannot partition a Pallas call: on TPU it refuses ("Mosaic kernels cannot be
automatically partitioned"), on GPU it replicates the Triton call (every device gathers the
whole batch and computes all of it). So the partitioning is written out here, in terms of
the two ``PartitionSpec`` s that the logical-axis rules give (``jaxlora.sharding``):

* ``x [M, K]``: rows over the batch axes, e.g. ``P(("data", "fsdp"), None)``; ``K`` split
  only where the weight's ``K`` is split the same way (the input of a row-parallel layer).
* ``W [N, K]`` as ``codes [N, K/2]`` (uint8) and ``absmax [N, K/blocksize]`` (float32, or
  the uint8 codes of a double-quantized absmax with its replicated ``nested_absmax`` and
  ``offset``), both with the same spec, e.g. ``P("tensor", "fsdp")`` for q/k/v/gate/up
  (out = heads/mlp, in = embed) and ``P("fsdp", "tensor")`` for o/down (out = embed,
  in = heads/mlp).

From these, per mesh axis of the weight (worked out once, in :func:`plan`):

* FSDP: an axis that splits ``W`` but also splits ``x``'s rows (or is not used by ``x``'s
  ``K``) is **gathered**: ``all_gather`` of the uint8 codes and the absmax, never of a bf16
  weight. A double-quantized absmax is gathered as its 8-bit codes and dequantized on each
  device after the gather (4 + 8/64 = 4.125 bits per weight at blocksize 64, 3.88× fewer
  bytes than bf16; a float32 absmax would make it 4.5 bits, 3.56×).
* Column parallel: a leading axis of ``N`` that ``x`` does not use stays split; the output
  ``y [M, N]`` comes out split on it (``P(rows, "tensor")``).
* Row parallel: an axis that splits ``K`` of both ``x`` and ``W`` stays split; each device
  contracts its ``K`` slice and the partial products are ``psum`` ed (in ``x.dtype``, as
  Megatron-LM's row-parallel all-reduce does).

Backward (``x`` only; the 4-bit weight is frozen): ``dx = dy @ dequant(W)`` with the same
gathers (re-done in the backward pass, so the gathered weight is not kept alive between the
two, which is the point of FSDP) and a ``psum`` over the column-parallel axes, whose devices
each hold a partial ``dx`` from their slice of ``N``. The VJP is written at this level, not
left to autodiff through ``shard_map``, so these collectives are explicit.

``kernel`` picks what runs on each device's block, with no look at the process's default
backend: ``"mosaic"`` (``nf4_tpu``), ``"triton"`` (``nf4_triton``) or ``"dequant"``
(dequantize to ``x.dtype`` then a float32-accumulated dot, ``nf4_matmul.reference_*``; any
platform). ``jaxlora.targets.nf4_kernel_for(platform, compute_capability)`` maps a device to
it. ``interpret=True`` runs the Pallas kernels in interpret mode (CPU tests).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from jaxlora.kernels import nf4_matmul, nf4_tpu, nf4_triton

KERNELS = ("mosaic", "triton", "dequant")

Axes = tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """How one sharded NF4 matmul runs: specs, and which mesh axes are gathered or summed.

    ``gather_n`` / ``gather_k``: axes whose weight shards are all-gathered along N / K.
    ``keep_n``: axes that stay split along N (column parallel; ``dx`` is psum'd over them).
    ``keep_k``: axes that split K of both x and W (row parallel; ``y`` is psum'd over them).
    """

    mesh: Mesh | AbstractMesh
    x_spec: PartitionSpec  # x [M, K]
    w_spec: PartitionSpec  # codes [N, K/2], absmax [N, K/blocksize]
    out_spec: PartitionSpec  # y [M, N]
    gather_n: Axes
    gather_k: Axes
    keep_n: Axes
    keep_k: Axes
    code: tuple[float, ...]
    blocksize: int
    kernel: str
    interpret: bool
    absmax_table: tuple[float, ...] | None = None  # double-quantized absmax: its 256 values
    nested_blocksize: int | None = None


def _axes(entry) -> Axes:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _pair(spec: PartitionSpec, what: str) -> tuple[Axes, Axes]:
    if len(spec) > 2:
        raise ValueError(f"nf4 sharded matmul: {what} spec {spec} has more than 2 entries")
    entries = tuple(spec) + (None,) * (2 - len(spec))
    return _axes(entries[0]), _axes(entries[1])


def _entry(axes: Axes):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def plan(
    mesh: Mesh | AbstractMesh,
    x_spec: PartitionSpec,
    w_spec: PartitionSpec,
    shapes: tuple[tuple[int, int], tuple[int, int]],
    *,
    code: tuple[float, ...],
    blocksize: int,
    kernel: str,
    interpret: bool = False,
    absmax_table: tuple[float, ...] | None = None,
    nested_blocksize: int | None = None,
) -> Plan:
    """Check the specs against the shapes (``x [M, K]``, ``W [N, K]``) and derive the plan.

    Raises ``ValueError`` naming the dimension and mesh axes when a split does not divide,
    when ``x``'s K split is not the leading part of ``W``'s K split (their K slices would not
    line up), or when the same axis would split both the rows and the columns of ``y``.
    """
    if kernel not in KERNELS:
        raise ValueError(f"nf4 sharded matmul: kernel must be one of {KERNELS}, got {kernel!r}")
    (m, k), (n, wk) = shapes
    if k != wk or k % blocksize:
        raise ValueError(
            f"nf4 sharded matmul: x [{m}, {k}] and W [{n}, {wk}] need equal K, a multiple of "
            f"blocksize {blocksize}"
        )
    m_axes, xk_axes = _pair(x_spec, "x")
    n_axes, k_axes = _pair(w_spec, "weight")
    for a in m_axes + xk_axes + n_axes + k_axes:
        if a not in mesh.shape:
            raise ValueError(f"nf4 sharded matmul: mesh {dict(mesh.shape)} has no axis {a!r}")
    if k_axes[: len(xk_axes)] != xk_axes:
        raise ValueError(
            f"nf4 sharded matmul: x splits K over {xk_axes}, the weight over {k_axes}; x's K "
            "split must be the leading part of the weight's (x is never gathered here)"
        )
    x_used = set(m_axes) | set(xk_axes)
    n_keep = 0
    while n_keep < len(n_axes) and n_axes[n_keep] not in x_used:
        n_keep += 1
    keep_n, gather_n = n_axes[:n_keep], n_axes[n_keep:]
    keep_k, gather_k = xk_axes, k_axes[len(xk_axes) :]

    def size(axes: Axes) -> int:
        return math.prod(mesh.shape[a] for a in axes)

    for dim, what, axes in (
        (m, "M (rows of x)", m_axes),
        (n, "N (rows of W)", n_axes),
        (k // blocksize, f"K/{blocksize} (absmax blocks)", k_axes),
    ):
        if dim % size(axes):
            raise ValueError(
                f"nf4 sharded matmul: {what} = {dim} does not split evenly over {axes} "
                f"(size {size(axes)})"
            )
    return Plan(
        mesh=mesh,
        x_spec=PartitionSpec(_entry(m_axes), _entry(xk_axes)),
        w_spec=PartitionSpec(_entry(n_axes), _entry(k_axes)),
        out_spec=PartitionSpec(_entry(m_axes), _entry(keep_n)),
        gather_n=gather_n,
        gather_k=gather_k,
        keep_n=keep_n,
        keep_k=keep_k,
        code=tuple(float(c) for c in code),
        blocksize=blocksize,
        kernel=kernel,
        interpret=interpret,
        absmax_table=absmax_table,
        nested_blocksize=nested_blocksize,
    )


def _gather(a: jax.Array, axes: Axes, dim: int) -> jax.Array:
    """All-gather ``a``'s shards along ``dim`` over ``axes`` (major to minor, as in a spec)."""
    if not axes:
        return a
    return jax.lax.all_gather(a, axes[0] if len(axes) == 1 else axes, axis=dim, tiled=True)


def _first(axes: Axes, local: int) -> jax.Array | int:
    """Where this device's block starts along a dimension split over ``axes`` (kept split)."""
    return jax.lax.axis_index(axes[0] if len(axes) == 1 else axes) * local if axes else 0


def _local_weight(p: Plan, codes, absmax, nested, offset) -> tuple[jax.Array, jax.Array]:
    """This device's ``codes [n, k/2]`` and float32 ``absmax [n, k/bs]`` after the FSDP
    gathers; a double-quantized absmax is gathered as codes and dequantized here, each entry
    with the nested scale of its place in the whole weight."""
    codes = _gather(_gather(codes, p.gather_n, 0), p.gather_k, 1)
    absmax = _gather(_gather(absmax, p.gather_n, 0), p.gather_k, 1)
    if p.nested_blocksize is None:
        return codes, absmax
    n, kb = absmax.shape
    whole_kb = kb * math.prod(p.mesh.shape[a] for a in p.keep_k)
    absmax = nf4_matmul.dequantize_absmax(
        absmax,
        nested,
        offset,
        table=p.absmax_table,
        nested_blocksize=p.nested_blocksize,
        first_row=_first(p.keep_n, n),
        first_col=_first(p.keep_k, kb),
        cols=whole_kb,
    )
    return codes, absmax


def _local_forward(p: Plan, x, codes, absmax):
    """``x [m, k] -> x @ dequant(W)ᵀ [m, n]`` on one device's blocks."""
    kw = dict(code=p.code, blocksize=p.blocksize)
    if p.kernel == "mosaic":
        return nf4_tpu.forward(x, codes, absmax, interpret=p.interpret, **kw)
    if p.kernel == "triton":
        return nf4_triton.forward(x, codes, absmax, interpret=p.interpret, **kw)
    return nf4_matmul.reference_forward(x, codes, absmax, **kw)


def _local_input_grad(p: Plan, dy, codes, absmax):
    """``dy [m, n] -> dy @ dequant(W) [m, k]`` on one device's blocks."""
    kw = dict(code=p.code, blocksize=p.blocksize)
    if p.kernel == "mosaic":
        return nf4_tpu.input_grad(dy, codes, absmax, interpret=p.interpret, **kw)
    if p.kernel == "triton":
        return nf4_triton.input_grad(dy, codes, absmax, interpret=p.interpret, **kw)
    return nf4_matmul.reference_input_grad(dy, codes, absmax, **kw)


def _forward(p: Plan, x, w):
    def body(x, *w):
        y = _local_forward(p, x, *_local_weight(p, *w))
        return jax.lax.psum(y, p.keep_k) if p.keep_k else y  # row parallel: partial sums

    return jax.shard_map(
        body,
        mesh=p.mesh,
        in_specs=(p.x_spec, *_weight_specs(p)),
        out_specs=p.out_spec,
        check_vma=False,
    )(x, *w)


def _input_grad(p: Plan, dy, w):
    def body(dy, *w):
        # Tie the shards to dy, so XLA re-gathers here instead of reusing (CSE) the forward
        # pass's gathered weight and keeping it alive until the backward pass.
        dy, *w = jax.lax.optimization_barrier((dy, *w))
        dx = _local_input_grad(p, dy, *_local_weight(p, *w))
        return jax.lax.psum(dx, p.keep_n) if p.keep_n else dx  # column parallel: partial dx

    return jax.shard_map(
        body,
        mesh=p.mesh,
        in_specs=(p.out_spec, *_weight_specs(p)),
        out_specs=p.x_spec,
        check_vma=False,
    )(dy, *w)


def _weight_specs(p: Plan) -> tuple[PartitionSpec, ...]:
    """codes and absmax split like the weight; the tiny nested absmax and offset replicated."""
    return p.w_spec, p.w_spec, PartitionSpec(), PartitionSpec()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, p: Plan):
    return _forward(p, x, w)


def _matmul_fwd(x, w, p: Plan):
    return _forward(p, x, w), w  # sharded: re-gathered in bwd


def _matmul_bwd(p: Plan, w, dy):
    return _input_grad(p, dy, w), None  # the frozen weight gets no cotangent


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def nf4_matmul_sharded(
    x: jax.Array,
    codes: jax.Array,
    absmax: jax.Array,
    *,
    mesh: Mesh,
    x_spec: PartitionSpec,
    w_spec: PartitionSpec,
    code: tuple[float, ...],
    blocksize: int,
    kernel: str,
    interpret: bool = False,
    nested: tuple[jax.Array, jax.Array, tuple[float, ...], int] | None = None,
) -> jax.Array:
    """``x [M, K] -> x @ dequant(W)ᵀ [M, N]`` in ``x.dtype`` on ``mesh``, differentiable in
    ``x`` only; the result is sharded as ``P(rows of x, kept N axes)`` (see module doc).

    ``codes [N, K/2]`` uint8 and ``absmax [N, K/blocksize]`` share ``w_spec``; ``absmax`` is
    float32, or with ``nested = (nested_absmax, offset, table, nested_blocksize)`` the uint8
    codes of a double-quantized absmax (``table``: their 256 values; see
    ``nf4_matmul.dequantize_absmax``). ``code`` is the 16-value table (NF4 or FP4);
    ``kernel`` is ``"mosaic"``, ``"triton"`` or ``"dequant"``.
    """
    want = jnp.float32 if nested is None else jnp.uint8
    if codes.dtype != jnp.uint8 or absmax.dtype != want or x.ndim != 2:
        raise ValueError(
            f"nf4 sharded matmul: want x [M, K], uint8 codes, {jnp.dtype(want).name} absmax "
            f"({'with' if nested else 'without'} double quantization); got x{x.shape}, "
            f"{codes.dtype} codes, {absmax.dtype} absmax"
        )
    n, k = codes.shape[0], codes.shape[1] * 2
    if absmax.shape != (n, k // blocksize):
        raise ValueError(
            f"nf4 sharded matmul: absmax {absmax.shape} does not match codes {codes.shape} "
            f"at blocksize {blocksize}"
        )
    nested_absmax, offset, table, nested_blocksize = nested or (
        jnp.zeros((), jnp.float32),
        jnp.zeros((), jnp.float32),
        None,
        None,
    )
    p = plan(
        mesh,
        x_spec,
        w_spec,
        (x.shape, (n, k)),
        code=code,
        blocksize=blocksize,
        kernel=kernel,
        interpret=interpret,
        absmax_table=table,
        nested_blocksize=nested_blocksize,
    )
    return _matmul(x, (codes, absmax, nested_absmax, offset), p)


# ---- operands laid out once for several calls (the tiles of a tiled MLP) --------------------


def staged_spec(p: Plan) -> PartitionSpec:
    """The spec of :func:`stage`'s ``codes_t [Kp/2, N]`` and ``absmax_t [Kp/bs, N]``: ``K``
    split where it stays split (row parallel), ``N`` where it stays split (column parallel);
    replicated over the gathered axes."""
    return PartitionSpec(_entry(p.keep_k), _entry(p.keep_n))


def stage(p: Plan, codes, absmax, nested_absmax, offset) -> tuple[jax.Array, jax.Array]:
    """Each device's weight gathered as ``p`` says (4-bit codes and 8-bit absmax codes, as a
    call of :func:`nf4_matmul_sharded` gathers them) and laid out for the Mosaic kernel
    (``nf4_tpu.tile_layout``), once, for several calls of :func:`nf4_matmul_staged`."""
    if p.kernel != "mosaic":
        raise ValueError(
            f"nf4 sharded stage: only the Mosaic kernel reads staged operands, not {p.kernel!r}"
        )
    bk = nf4_tpu.k_tile(p.blocksize)
    spec = staged_spec(p)
    return jax.shard_map(
        lambda *w: nf4_tpu.tile_layout(*_local_weight(p, *w), bk),
        mesh=p.mesh,
        in_specs=_weight_specs(p),
        out_specs=(spec, spec),
        check_vma=False,
    )(codes, absmax, nested_absmax, offset)


def _staged_forward(p: Plan, x, codes_t, absmax_t):
    def body(x, c, a):
        y = nf4_tpu.forward_tiled(
            x, c, a, code=p.code, blocksize=p.blocksize, interpret=p.interpret
        )
        return jax.lax.psum(y, p.keep_k) if p.keep_k else y

    spec = staged_spec(p)
    return jax.shard_map(
        body, mesh=p.mesh, in_specs=(p.x_spec, spec, spec), out_specs=p.out_spec, check_vma=False
    )(x, codes_t, absmax_t)


def _staged_input_grad(p: Plan, k: int, dy, codes_t, absmax_t):
    def body(dy, c, a):
        dx = nf4_tpu.input_grad_tiled(
            dy, c, a, code=p.code, blocksize=p.blocksize, interpret=p.interpret
        )
        dx = dx[:, :k]  # this device's K, without the padding to whole tiles
        return jax.lax.psum(dx, p.keep_n) if p.keep_n else dx

    spec = staged_spec(p)
    return jax.shard_map(
        body, mesh=p.mesh, in_specs=(p.out_spec, spec, spec), out_specs=p.x_spec, check_vma=False
    )(dy, codes_t, absmax_t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _matmul_staged(x, codes_t, absmax_t, p: Plan, k: int):
    return _staged_forward(p, x, codes_t, absmax_t)


def _matmul_staged_fwd(x, codes_t, absmax_t, p: Plan, k: int):
    return _staged_forward(p, x, codes_t, absmax_t), (codes_t, absmax_t)


def _matmul_staged_bwd(p: Plan, k: int, res, dy):
    return _staged_input_grad(p, k, dy, *res), None, None


_matmul_staged.defvjp(_matmul_staged_fwd, _matmul_staged_bwd)


def nf4_matmul_staged(x: jax.Array, codes_t: jax.Array, absmax_t: jax.Array, p: Plan) -> jax.Array:
    """:func:`nf4_matmul_sharded` on operands from :func:`stage` (``p`` as it was staged with;
    ``x`` split as ``p.x_spec``): no gathers here, each device multiplies its rows."""
    k_local = x.shape[1] // math.prod(p.mesh.shape[a] for a in p.keep_k)
    return _matmul_staged(x, codes_t, absmax_t, p, k_local)
