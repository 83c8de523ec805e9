"""The one projection every model layer calls, ``dense(x, w)``, and every decision about how a
weight is multiplied.

Model code never asks what kind of weight it holds. Weights are values:

* a ``jax.Array`` in torch orientation ``[out, in]``  -> ``x @ wᵀ``
* any other weight type (``NF4Tensor``, ``LoRAWeight``) implements ``matmul(x, *, rng)``
  returning ``x @ Wᵀ`` for the ``[out, in]`` matrix it stands for.

Keeping torch orientation everywhere makes the Hugging Face key table the identity (no
transposes on load or export) and keeps NF4's 64-element blocks running along the contracted
``in`` axis, which is what the dequant-matmul kernels want.

Which path a product takes is decided here and nowhere else, from what the program is built
for (:class:`Kernels`, chosen from the devices by :func:`kernels_for`) and what the weight is:
whether a 4-bit weight goes through a Pallas kernel, on each device's rows inside
``shard_map`` when the program is sharded, or is dequantized for a plain dot (:func:`nf4_path`),
and whether a LoRA weight runs base and adapter as one matmul (:func:`fusable_base`).
:func:`prepare` writes that choice into a parameter tree, as static data of its weights, so a
compiled step contains what its arguments say. The weight types state facts (layout, block
size, dtype) and own their matmul.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxlora import kernels
from jaxlora.kernels.attention_sharded import KERNELS as ATTENTION_KERNELS
from jaxlora.kernels.attention_sharded import AttentionMesh, head_split
from jaxlora.targets import DEQUANT, TRITON, nf4_kernel_for

log = logging.getLogger(__name__)


@runtime_checkable
class Weight(Protocol):
    """A weight that is not a plain array: it knows how to multiply an input by itself."""

    shape: tuple[int, ...]

    def matmul(self, x: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """``x [..., in] -> x @ Wᵀ [..., out]`` in ``x.dtype``."""
        ...


@runtime_checkable
class Quantized(Protocol):
    """A packed weight (``NF4Tensor``): what the dispatch needs to know about it."""

    shape: tuple[int, ...]
    blocksize: int
    run: NF4Run  # how it is multiplied in the program being built

    @property
    def is_2d(self) -> bool: ...

    def dequantize(self, dtype: Any = None) -> jax.Array: ...


def dense(
    x: jax.Array,
    w: jax.Array | Weight,
    bias: jax.Array | None = None,
    *,
    rng: jax.Array | None = None,
) -> jax.Array:
    """``x [..., in] ↦ x @ wᵀ + bias`` with ``w`` of shape ``[out, in]``, computed in ``x.dtype``.

    ``rng`` is only consumed by weights with randomness in their forward pass (LoRA dropout);
    ``None`` means deterministic.
    """
    if isinstance(w, jax.Array | np.ndarray):
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    else:
        y = w.matmul(x, rng=rng)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def staged(tree: Any) -> Any:
    """``tree`` with every weight ready for several products in a row (``w.staged()``: a 4-bit
    weight on the Mosaic path lays its codes out for the kernel once; every other weight is
    itself). For the tiles of a tiled MLP (``jaxlora.models.llama.tiled_mlp``), which multiply
    the same weights once a tile."""
    ready = lambda w: callable(getattr(w, "staged", None))
    return jax.tree.map(lambda w: w.staged() if ready(w) else w, tree, is_leaf=ready)


def dense_weight(w: Any, dtype: Any) -> jax.Array:
    """The ``[out, in]`` matrix a weight stands for: an array cast, a packed weight dequantized."""
    if isinstance(w, jax.Array | np.ndarray):
        return jnp.asarray(w).astype(dtype)
    if isinstance(w, Quantized):
        return w.dequantize(dtype)
    raise TypeError(f"cannot materialize a {type(w).__name__} weight as a dense matrix")


# ---- what a compiled program contains ----------------------------------------------------------

KERNEL_MODES = ("auto", "fused", "dequant", "interpret")


class KernelUnavailableError(ValueError):
    """A kernel was asked for (``quant.kernel=fused``) on devices it does not compile for."""


# What ``auto`` multiplies a 4-bit weight with on a GPU: dequantize-then-dot. On an H200
# (tools/bench_kernels.py, docs/kernels.md) the fused Triton kernel took 3.3-6.0x the time of
# dequantizing to bf16 and calling XLA's dot at the row counts of training (4,096-16,384, an
# 8B model's projections), 4.2-7.5x a bf16 input gradient, and was ahead at one decoding shape
# only: it rebuilds each weight tile with a select tree per element, once per tile of rows,
# while the dot runs on the tensor cores. The 4-bit weight stays 4-bit in memory and in FSDP's
# gathers (each layer dequantizes its weight when it runs; a sharded program does it on each
# device, inside shard_map). ``quant.kernel=fused`` runs the kernel. TPU: the Mosaic kernel
# (not yet measured against dequantize-then-dot on a chip).
GPU_AUTO_NF4 = DEQUANT


@dataclass(frozen=True)
class Kernels:
    """The kernels a compiled program contains, decided once from the devices it runs on by
    :func:`kernels_for` (never from the process's default backend at trace time).

    ``platform`` is the devices' (``"cpu"``, ``"gpu"``, ``"tpu"``); ``nf4`` the 4-bit matmul
    (``"mosaic"``, ``"triton"`` or ``"dequant"``: dequantize-then-dot); ``interpret`` runs Pallas
    kernels in interpret mode (CPU tests, debugging); ``nf4_dtype`` the dtype a 4-bit weight is
    multiplied in (bitsandbytes' ``bnb_4bit_compute_dtype``: the input is cast to it and the
    product back to the input's dtype, as ``bnb.nn.Linear4bit`` does), ``None`` = the input's.
    """

    platform: str = "cpu"
    nf4: str = "dequant"
    interpret: bool = False
    attention: str = "eager"
    attention_mesh: AttentionMesh | None = None
    nf4_dtype: str | None = None

    @property
    def fuse_lora(self) -> bool:
        """Base and adapter as one matmul: measured faster on CPU only (docs/benchmarks.md)."""
        return self.platform == "cpu"

    def describe(self) -> str:
        how = " (Pallas interpret mode)" if self.interpret else ""
        where = ""
        if self.attention_mesh is not None and self.attention in ATTENTION_KERNELS:
            where = f" under shard_map over {dict(self.attention_mesh.mesh.shape)}"
        dtype = "" if self.nf4_dtype is None else f" in {self.nf4_dtype}"
        return (
            f"{self.platform}: NF4 matmul {self.nf4}{how}{dtype}, attention {self.attention}{where}"
        )

    def nf4_compute_dtype(self, x_dtype: Any) -> np.dtype:
        """The dtype a 4-bit weight multiplies an ``x_dtype`` input in (:attr:`nf4_dtype`)."""
        return jnp.dtype(x_dtype if self.nf4_dtype is None else self.nf4_dtype)


def _compute_capability(device: jax.Device) -> tuple[int, int] | None:
    cc = getattr(device, "compute_capability", None)
    if cc is None:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


# cuDNN's fused attention and the Triton flash kernel both need Ampere (sm_80) or newer.
FLASH_MIN_COMPUTE_CAPABILITY = (8, 0)


def attention_for(
    platform: str,
    seq_len: int,
    *,
    packed: bool = True,
    compute_capability: tuple[int, int] | None = None,
    softcap: bool = False,
) -> str:
    """The attention implementation for a program on ``platform``, from what was measured
    (docs/attention.md). TPU: splash. GPU: cuDNN for unpacked rows without soft-capped scores;
    jaxlora's Pallas flash kernel for packed rows and for soft-capped scores (``softcap``, Gemma
    2: cuDNN cannot cap them), windows or not; a GPU older than sm_80 (T4, V100) has neither
    flash kernel and takes chunked. CPU: chunked from 1024 tokens (less CPU time than eager,
    equal or faster wall time, linear memory), eager below (a tie at 256 tokens; eager is the
    reference)."""
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda"):
        if compute_capability is not None and compute_capability < FLASH_MIN_COMPUTE_CAPABILITY:
            return "chunked"
        return "pallas_gpu" if packed or softcap else "cudnn"
    return "chunked" if seq_len >= 1024 else "eager"


def kernels_for(
    devices: Sequence[jax.Device],
    mode: str = "auto",
    *,
    seq_len: int = 0,
    packed: bool = True,
    mesh: AttentionMesh | None = None,
    heads: tuple[int, int] | None = None,
    softcap: bool = False,
    nf4_dtype: str | None = None,
) -> Kernels:
    """The :class:`Kernels` for programs on ``devices`` (a mesh's, or where the weights live),
    logged once per choice with the reason for the attention. ``mode``: ``"auto"`` (the Mosaic
    kernel on TPU, dequantize-then-dot elsewhere: on a GPU measured faster than the Triton
    kernel, :data:`GPU_AUTO_NF4`), ``"fused"`` (the platform's Pallas kernel: Mosaic on TPU,
    Triton on sm_80+ GPUs; an error where none compiles), ``"dequant"`` (never a kernel),
    ``"interpret"`` (the GPU kernels in Pallas interpret mode on any platform: slow; tests and
    debugging). ``nf4_dtype``: the dtype 4-bit weights multiply in (``quant.compute_dtype``;
    ``None`` = the input's).

    Attention (:func:`attention_for`, for rows of ``seq_len`` tokens, ``packed`` or not,
    soft-capped scores or not: ``softcap``) on several devices: the
    platform's kernel inside ``shard_map`` (``jaxlora.kernels.attention_sharded``) when
    ``mesh`` says which axes split the batch and the heads and ``heads = (kv_heads, query
    heads per kv head)`` split whole over its head axis; otherwise ``"chunked"`` (flash
    attention in plain JAX, which XLA partitions; memory linear in S)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(KERNEL_MODES)}; got {mode!r}")
    device = devices[0]
    platform = "gpu" if device.platform == "cuda" else device.platform
    cc = _compute_capability(device)
    fused = nf4_kernel_for(platform, cc)  # the Pallas kernel that compiles here (T4: none)
    if mode == "interpret":
        nf4 = TRITON
    elif mode == "dequant":
        nf4 = DEQUANT
    elif mode == "fused":
        if fused == DEQUANT:
            where = platform if cc is None else f"{platform} sm_{cc[0]}{cc[1]}"
            raise KernelUnavailableError(
                f"quant.kernel=fused: no compiled 4-bit matmul kernel for {where} (Mosaic needs a "
                "TPU, Triton a GPU of compute capability 8.0+); use quant.kernel=auto or dequant "
                "(interpret runs the kernels in Pallas interpret mode, for debugging)"
            )
        nf4 = fused
    else:
        nf4 = GPU_AUTO_NF4 if platform == "gpu" else fused
    interpret = mode == "interpret"
    attention = attention_for(
        platform,
        seq_len,
        packed=packed,
        compute_capability=cc,
        softcap=softcap,
    )
    attention, reason = _attention_on(attention, len(devices), mesh, heads, interpret)
    if platform == "gpu" and cc is not None and cc < FLASH_MIN_COMPUTE_CAPABILITY:
        reason = f"sm_{cc[0]}{cc[1]}: the flash kernels (cuDNN, Triton) need sm_80 or newer"
    elif platform == "gpu" and softcap and not packed and attention == "pallas_gpu":
        reason = "attention logit soft-capping: cuDNN has none, Pallas GPU flash attention has"
    on_mesh = mesh if attention in ATTENTION_KERNELS and len(devices) > 1 else None
    chosen = Kernels(platform, nf4, interpret, attention, on_mesh, nf4_dtype)
    if (chosen, reason) not in _LOGGED:  # the same kernels for another reason: said too
        _LOGGED.add((chosen, reason))
        log.info(
            "kernels for %d %s device(s): %s (%s)",
            len(devices),
            platform,
            chosen.describe(),
            reason,
        )
    return chosen


def _attention_on(
    attention: str,
    n_devices: int,
    mesh: AttentionMesh | None,
    heads: tuple[int, int] | None,
    interpret: bool,
) -> tuple[str, str]:
    """``(attention, reason)``: the platform's choice, or ``"chunked"`` where its kernel cannot
    run (interpret mode; a mesh without the roles of its axes, or whose head axis does not
    split the heads whole)."""
    if attention not in ATTENTION_KERNELS:
        return attention, "no attention kernel for this platform and batch"
    if interpret:  # interpreting a Pallas attention kernel per step is too slow
        return "chunked", "Pallas interpret mode"
    if n_devices == 1:
        return attention, "one device"
    if mesh is None or heads is None:
        return "chunked", "several devices but no mesh axes for the batch and heads given"
    try:
        split = head_split(mesh, *heads)
    except ValueError as e:
        return "chunked", str(e)
    return attention, f"each device's batch rows and heads ({split}) inside shard_map"


_LOGGED: set = set()


@dataclass(frozen=True)
class NF4Run:
    """How one 4-bit weight is multiplied in the program being built: the kernel, and the
    mesh and ``PartitionSpec`` of its codes when the program is sharded (static data of the
    weight's pytree, so it is part of what a jitted step is compiled for)."""

    kernels: Kernels = Kernels()
    mesh: Mesh | None = None
    spec: PartitionSpec | None = None
    batch_axes: tuple[str, ...] = ()


def nf4_path(w: Quantized, run: NF4Run) -> tuple[str, str]:
    """``(path, reason)``: ``"kernel"``, ``"sharded"`` (the kernel, or dequantize-then-dot,
    inside ``shard_map`` on each device's rows) or ``"dequant"`` (a plain dot, XLA partitions
    it), with why for the log."""
    k = run.kernels
    sharded = run.mesh is not None and run.mesh.size > 1
    if not w.is_2d:
        return "dequant", "in_features not a multiple of blocksize (flat layout)"
    if k.nf4 != DEQUANT and w.blocksize not in kernels.KERNEL_BLOCKSIZES:
        return "dequant", f"blocksize {w.blocksize} not in {kernels.KERNEL_BLOCKSIZES}"
    if sharded and (k.nf4 != DEQUANT or k.platform != "cpu"):
        return "sharded", f"{k.nf4} on each device's rows (shard_map over {dict(run.mesh.shape)})"
    if k.nf4 == DEQUANT:
        return "dequant", f"no Pallas kernel for {k.platform}"
    return "kernel", k.nf4


def rows_spec(run: NF4Run, rows: int) -> PartitionSpec:
    """The spec of ``x [rows, K]`` for a sharded 4-bit matmul: rows over the batch axes when
    they divide them (else every device takes every row: decoding, tiny eval batches); ``K``
    split where the weight's ``K`` is split over a non-batch axis (a row-parallel layer's input,
    e.g. ``o_proj`` after heads split over ``tensor``)."""
    mesh, spec = run.mesh, run.spec
    batch = tuple(a for a in run.batch_axes if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in batch)
    row_axes = batch if batch and rows % size == 0 else ()
    k_entry = spec[1] if len(spec) > 1 else None
    k_axes = (k_entry,) if isinstance(k_entry, str) else tuple(k_entry or ())
    x_k = tuple(a for a in k_axes if a not in run.batch_axes)
    entry = lambda axes: None if not axes else axes[0] if len(axes) == 1 else axes
    return PartitionSpec(entry(row_axes), entry(x_k))


_FALLBACK_LOGGED: set[tuple] = set()


def log_path_once(shape: tuple, x_shape: tuple, path: str, reason: str) -> None:
    key = (tuple(shape), tuple(x_shape), path, reason)
    if key not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add(key)
        what = "dequantize-then-dot" if path == "dequant" else path
        log.info("NF4 %s x %s: %s (%s)", x_shape, shape, what, reason)


def dequantized_operand(w: Any, dtype: Any, x_shape: tuple[int, ...]) -> jax.Array | None:
    """``None`` when a kernel computes ``x @ Wᵀ`` for this packed weight; otherwise the
    dequantized ``[out, in]`` weight in ``dtype`` (no gradient) for a plain dot, logged once
    per shape."""
    path, reason = nf4_path(w, w.run)
    if path != "dequant":
        return None
    log_path_once(w.shape, x_shape, path, reason)
    return jax.lax.stop_gradient(w.dequantize(dtype))


# ---- LoRA: base and adapter as one matmul, or side by side --------------------------------------


def fusable_base(
    base: Any, x: jax.Array, a: jax.Array, b: jax.Array, fuse: bool
) -> jax.Array | None:
    """The dense ``[out, in]`` base to run with the adapter as one matmul
    (``[x | s·xAᵀ]·[W | B]ᵀ``), or ``None`` to run the rank-r branch beside the base.

    It applies when ``fuse`` (the weight's :class:`Kernels` say so: on CPU, where it was
    measured, docs/benchmarks.md), when input, base and adapter
    share one dtype, the base is an array or a packed weight on its dequantize-then-dot path,
    and there are at least as many tokens as input features (the concatenation copies ``W``
    each call: worth it only then). Elsewhere the branch runs beside the base: on GPU and TPU
    (not measured there), with a packed base that has a fused kernel or multiplies in another
    dtype than the input's (``Kernels.nf4_dtype``), and for a float32 adapter on a bf16 base
    (PEFT's mixed-precision sum).
    """
    if not fuse:
        return None
    if not x.dtype == a.dtype == b.dtype:
        return None
    if x.size // x.shape[-1] < x.shape[-1]:  # few tokens (decoding): copying W costs more
        return None
    if isinstance(base, jax.Array):
        return base if base.dtype == x.dtype else None
    if isinstance(base, Quantized):
        if base.run.kernels.nf4_compute_dtype(x.dtype) != x.dtype:
            return None
        return dequantized_operand(base, x.dtype, x.shape)
    return None
