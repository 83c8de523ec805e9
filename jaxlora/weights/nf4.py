"""NF4 / FP4 4-bit weights, stored bit for bit as bitsandbytes stores them.

Format (bitsandbytes 0.50.2, ``functional.quantize_4bit`` and ``backends/default/ops.py``;
QLoRA, Dettmers et al. 2023, arXiv:2305.14314):

* The ``[out, in]`` weight is flattened row-major and cut into blocks of ``blocksize``
  (64) consecutive elements; ``absmax`` is the float32 max-abs of each block.
* Each element is scaled by ``1/absmax`` in float32 (the last, partial block divides by
  its absmax instead, and its absmax is clamped to 1e-38, as bnb does), clipped to [-1, 1]
  and rounded to the nearest of 16 code values; a value exactly on a midpoint takes the
  lower code (``torch.bucketize``).
* Two codes per byte, the first in the HIGH nibble; an odd count is padded with the code
  of 0.0 (7 for NF4, 0 for FP4).
* Double quantization: ``offset = mean(absmax)``; ``absmax - offset`` is quantized in blocks
  of 256 with bnb's signed 8-bit dynamic map, rounded with bnb's CUDA rule (binary search
  + midpoint test, ``dQuantize`` in csrc/kernels.cu), one float32 ``nested_absmax`` per block.
  bnb's CPU build uses a lookup table instead and picks a neighbouring code for a few
  absmax values (measured in tests/test_nf4.py); the 4-bit codes are identical.

Layout in jaxlora: bnb keeps codes flat ``[numel/2, 1]``. When ``in % blocksize == 0`` (every
real Llama projection) we hold the same bytes as ``codes [out, in/2]`` and
``absmax [out, in/blocksize]``: a pure reshape, exact and reversible, that keeps blocks
inside rows so kernels can tile along ``in`` and shard along ``out``. Otherwise the flat
layout is kept and only the dequantize-then-dot path applies. ``nested_absmax`` stays flat
(one value per 256 absmax codes, tiny).

bnb / Hugging Face interop (:func:`from_bnb`, :func:`to_bnb`, :func:`quantization_config`)
follows ``QuantState.as_dict(packed=True)`` and transformers' ``BitsAndBytesConfig.to_dict``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.dtypes import FLOAT_DTYPE_NAMES
from jaxlora.kernels import nf4_matmul, nf4_sharded
from jaxlora.weights import dispatch
from jaxlora.weights.nf4_format import (
    BLOCKSIZES,
    CODES,
    DYNAMIC_MAP,
    double_quantize,
    pack,
    quantize_4bit_flat,
    unpack,
)

logger = logging.getLogger(__name__)
DQ_TABLE = tuple(float(c) for c in DYNAMIC_MAP)  # the 8-bit absmax codes' values


def quantize(
    w: Any,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    nested_blocksize: int = 256,
) -> NF4Tensor:
    """Quantize a 2-D ``[out, in]`` weight (float32 / bfloat16 / float16) to NF4 or FP4.

    A ``numpy`` input stays on the host in numpy (the streaming loader's path); a
    ``jax.Array`` input is quantized with ``jax.numpy`` and works under ``jit`` (LoftQ).
    Both run the same code. The result dequantizes to ``w.dtype``.
    """
    if quant_type not in CODES:
        raise ValueError(f"quantize: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if nested_blocksize <= 0:
        raise ValueError(f"quantize: nested_blocksize must be positive, got {nested_blocksize}")
    xp = np if isinstance(w, np.ndarray) else jnp
    if w.ndim != 2:
        raise ValueError(f"quantize: expected a 2-D [out, in] weight, got shape {w.shape}")
    dtype = np.dtype(w.dtype)
    if dtype.name not in FLOAT_DTYPE_NAMES:
        raise ValueError(f"quantize: weight dtype must be one of {FLOAT_DTYPE_NAMES}, got {dtype}")
    flat = w.reshape(-1).astype(np.float32)
    codes, absmax = quantize_4bit_flat(xp, flat, blocksize, quant_type)
    packed = pack(xp, codes)
    nested = offset = None
    if double_quant:
        absmax, nested, offset = double_quantize(xp, absmax, nested_blocksize)
    return NF4Tensor.from_flat(
        packed,
        absmax,
        nested,
        offset,
        shape=tuple(w.shape),
        dtype=dtype.name,
        blocksize=blocksize,
        quant_type=quant_type,
        nested_blocksize=nested_blocksize if double_quant else None,
    )


@jax.tree_util.register_pytree_with_keys_class
class NF4Tensor:
    """A frozen 4-bit ``[out, in]`` weight: packed codes + (double-quantized) absmax.

    Leaves (arrays): ``codes`` uint8 ``[out, in/2]`` (2-D layout) or ``[ceil(numel/2)]``
    (flat layout); ``absmax`` ``[out, in/blocksize]`` or ``[blocks]``: uint8 codes with
    double quantization, float32 without; ``nested_absmax`` float32 ``[ceil(blocks/nbs)]``
    and ``offset`` float32 ``[]`` (both ``None`` without double quantization).
    Static aux data: ``shape``, ``dtype`` (name, what :meth:`dequantize` returns),
    ``blocksize``, ``quant_type``, ``nested_blocksize`` (``None`` without DQ), and ``run``
    (:class:`~jaxlora.weights.dispatch.NF4Run`: the kernel and, in a sharded program, the mesh
    and spec; set by :func:`jaxlora.weights.prepare`, dequantize-then-dot until then).
    """

    _LEAVES = ("codes", "absmax", "nested_absmax", "offset")

    def __init__(
        self,
        codes,
        absmax,
        nested_absmax,
        offset,
        *,
        shape,
        dtype,
        blocksize,
        quant_type,
        nested_blocksize,
        run: dispatch.NF4Run = dispatch.NF4Run(),
    ):
        self.codes, self.absmax = codes, absmax
        self.nested_absmax, self.offset = nested_absmax, offset
        self.shape: tuple[int, int] = tuple(shape)
        self.dtype_name: str = dtype
        self.blocksize: int = blocksize
        self.quant_type: str = quant_type
        self.nested_blocksize: int | None = nested_blocksize
        self.run = run

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_flat(
        cls,
        packed,
        absmax,
        nested_absmax,
        offset,
        *,
        shape,
        dtype,
        blocksize,
        quant_type,
        nested_blocksize,
    ) -> NF4Tensor:
        """Build from bnb's flat arrays (``packed [ceil(numel/2)]``, ``absmax [blocks]``),
        checking every size, and reshape to the 2-D layout when ``in % blocksize == 0``."""
        out, inn = shape
        numel, blocks = out * inn, math.ceil(out * inn / blocksize)
        where = f"NF4Tensor{tuple(shape)}"
        if packed.shape != ((numel + 1) // 2,):
            raise ValueError(
                f"{where}: packed codes have {packed.shape}, want ({(numel + 1) // 2},)"
            )
        if absmax.shape != (blocks,):
            raise ValueError(f"{where}: absmax has shape {absmax.shape}, want ({blocks},)")
        if (nested_absmax is None) != (nested_blocksize is None) or (offset is None) != (
            nested_blocksize is None
        ):
            raise ValueError(f"{where}: nested_absmax, offset and nested_blocksize go together")
        if nested_blocksize is not None:
            want = (math.ceil(blocks / nested_blocksize),)
            if nested_absmax.shape != want:
                raise ValueError(f"{where}: nested_absmax has {nested_absmax.shape}, want {want}")
            if np.dtype(absmax.dtype) != np.uint8:
                raise ValueError(
                    f"{where}: double-quantized absmax must be uint8, got {absmax.dtype}"
                )
        elif np.dtype(absmax.dtype) != np.float32:
            raise ValueError(
                f"{where}: absmax without double quant must be float32, got {absmax.dtype}"
            )
        if inn % blocksize == 0:
            packed = packed.reshape(out, inn // 2)
            absmax = absmax.reshape(out, inn // blocksize)
        return cls(
            packed,
            absmax,
            nested_absmax,
            offset,
            shape=shape,
            dtype=dtype,
            blocksize=blocksize,
            quant_type=quant_type,
            nested_blocksize=nested_blocksize,
        )

    # ---- pytree -------------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.GetAttrKey(k) for k in self._LEAVES]
        return list(zip(keys, self.tree_flatten()[0], strict=True)), self._aux()

    def tree_flatten(self):
        return tuple(getattr(self, k) for k in self._LEAVES), self._aux()

    def _aux(self) -> tuple:
        return (
            self.shape,
            self.dtype_name,
            self.blocksize,
            self.quant_type,
            self.nested_blocksize,
            self.run,
        )

    @classmethod
    def tree_unflatten(cls, aux, children):
        shape, dtype, blocksize, quant_type, nested_blocksize, run = aux
        return cls(
            *children,
            shape=shape,
            dtype=dtype,
            blocksize=blocksize,
            quant_type=quant_type,
            nested_blocksize=nested_blocksize,
            run=run,
        )

    def replace_leaves(self, **leaves: Any) -> NF4Tensor:
        """The same weight with some of its leaves (``codes``, ``absmax``, ...) replaced."""
        kids = {k: getattr(self, k) for k in self._LEAVES} | leaves
        return NF4Tensor(*(kids[k] for k in self._LEAVES), **self._kw(self.run))

    def with_run(self, run: dispatch.NF4Run) -> NF4Tensor:
        """The same weight, multiplied as ``run`` says (see :func:`jaxlora.weights.prepare`)."""
        return NF4Tensor(*self.tree_flatten()[0], **self._kw(run))

    def _kw(self, run: dispatch.NF4Run) -> dict:
        return dict(
            shape=self.shape,
            dtype=self.dtype_name,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            nested_blocksize=self.nested_blocksize,
            run=run,
        )

    # ---- properties ---------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def double_quant(self) -> bool:
        return self.nested_blocksize is not None

    @property
    def is_2d(self) -> bool:
        """True in the kernel layout (codes ``[out, in/2]``), False in the flat fallback one."""
        return self.shape[1] % self.blocksize == 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the array leaves (codes, absmax, nested_absmax, offset)."""
        leaves = (getattr(self, k) for k in self._LEAVES)
        return sum(
            int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in leaves if a is not None
        )

    def __repr__(self) -> str:
        dq = f", nested_blocksize={self.nested_blocksize}" if self.double_quant else ""
        return (
            f"NF4Tensor(shape={self.shape}, dtype={self.dtype_name}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}{dq})"
        )

    # ---- math ---------------------------------------------------------------------------
    def absmax_f32(self) -> jax.Array:
        """Per-block absmax as float32, same shape as ``self.absmax``.

        With DQ: ``DYNAMIC_MAP[code] * nested_absmax[i // nbs]`` then ``+ offset``, two
        float32 roundings as in bnb's ``dequantize_blockwise`` followed by ``absmax += offset``.
        """
        if not self.double_quant:
            return jnp.asarray(self.absmax, jnp.float32)
        flat = jnp.asarray(self.absmax).reshape(1, -1)
        return nf4_matmul.dequantize_absmax(
            flat,
            self.nested_absmax,
            self.offset,
            table=DQ_TABLE,
            nested_blocksize=self.nested_blocksize,
        ).reshape(self.absmax.shape)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """``[out, in]`` weight: ``code[nibble] * absmax`` in float32, then cast to ``dtype``
        (default: the original dtype). Bit-identical to bnb's ``dequantize_4bit``."""
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        code = jnp.asarray(CODES[self.quant_type])
        vals = code[unpack(jnp, jnp.asarray(self.codes))]
        absmax = self.absmax_f32()
        out, inn = self.shape
        bs = self.blocksize
        if self.is_2d:
            w = (vals.reshape(out, inn // bs, bs) * absmax[:, :, None]).reshape(out, inn)
        else:
            numel = out * inn
            pad = (-numel) % bs  # the tail block: as many codes as remain
            vals = jnp.pad(vals[:numel], (0, pad)).reshape(-1, bs)
            w = (vals * absmax[:, None]).reshape(-1)[:numel].reshape(out, inn)
        return w.astype(dtype)

    def matmul(self, x: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """``x [..., in] -> x @ Wᵀ [..., out]`` in ``x.dtype``; no gradient for ``W``.

        Multiplied in ``self.run.kernels.nf4_dtype`` when set (``quant.compute_dtype``), as
        ``bnb.nn.Linear4bit`` with its ``compute_dtype``: ``x`` is cast to it, the product
        rounded to it and cast back to ``x.dtype``. The path is
        :func:`jaxlora.weights.dispatch.nf4_path`'s for ``self.run``: the Pallas
        dequant-matmul (``jaxlora.kernels.nf4_matmul``), the same on each device's rows inside
        ``shard_map`` in a sharded program (``jaxlora.kernels.nf4_sharded``: FSDP gathers the
        4-bit codes and 8-bit absmax codes), or dequantize to the compute dtype and dot; logged
        once per shape. ``rng`` is unused (no randomness).
        """
        del rng
        if x.shape[-1] != self.shape[1]:
            raise ValueError(f"NF4Tensor.matmul: x has {x.shape[-1]} features, weight {self.shape}")
        lead, out_dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.shape[1]).astype(self.run.kernels.nf4_compute_dtype(x.dtype))
        path, reason = dispatch.nf4_path(self, self.run)
        dispatch.log_path_once(self.shape, x.shape, path, reason)
        code = tuple(float(c) for c in CODES[self.quant_type])
        k = self.run.kernels
        if path == "sharded":
            nested = None  # FSDP gathers 8-bit absmax codes, dequantized on each device
            if self.double_quant:
                nested = (self.nested_absmax, self.offset, DQ_TABLE, self.nested_blocksize)
            y = nf4_sharded.nf4_matmul_sharded(
                x2,
                jnp.asarray(self.codes),
                jnp.asarray(self.absmax),
                nested=nested,
                mesh=self.run.mesh,
                x_spec=dispatch.rows_spec(self.run, x2.shape[0]),
                w_spec=self.run.spec,
                code=code,
                blocksize=self.blocksize,
                kernel=k.nf4,
                interpret=k.interpret,
            )
        elif path == "kernel":
            y = nf4_matmul.nf4_matmul(
                x2,
                jnp.asarray(self.codes),
                jax.lax.stop_gradient(self.absmax_f32()),
                code=code,
                blocksize=self.blocksize,
                interpret=k.interpret,
                platform="tpu" if k.nf4 == "mosaic" else "gpu",
            )
        else:
            w = jax.lax.stop_gradient(self.dequantize(x2.dtype))
            y = jnp.einsum("mi,oi->mo", x2, w, preferred_element_type=jnp.float32).astype(x2.dtype)
        return y.astype(out_dtype).reshape(*lead, self.shape[0])

    def staged(self) -> NF4Tensor | StagedNF4:
        """This weight ready for several products in a row (the tiles of a tiled MLP,
        ``train.mlp_chunk``): on the Mosaic kernel's paths, a :class:`StagedNF4` whose codes
        are laid out for the kernel once, here (in a sharded program: gathered, then laid
        out), instead of once a call; the weight itself on every other path, where a call
        reads the codes as stored (Triton) or has nothing to lay out.

        Why it matters on the TPU: the tiles run in a loop, and a relayout inside it is one XLA
        may hoist out of the layers' loop too, as a copy of every layer's codes (the reason
        ``nf4_tpu.tile_layout`` bars its operands; docs/memory.md).
        """
        path, _ = dispatch.nf4_path(self, self.run)
        if self.run.kernels.nf4 != "mosaic" or path not in ("kernel", "sharded"):
            return self
        if path == "kernel":
            codes_t, absmax_t = nf4_matmul.tile_operands(
                jnp.asarray(self.codes),
                jax.lax.stop_gradient(self.absmax_f32()),
                blocksize=self.blocksize,
            )
            return StagedNF4(self, codes_t, absmax_t)
        # the rows a tile brings: split over the batch axes (a tile holds whole micro-batch rows)
        rows = math.prod(self.run.mesh.shape[a] for a in self.run.batch_axes)
        p = self._sharded_plan(rows)
        nested, offset = self.nested_absmax, self.offset
        if not self.double_quant:
            nested = offset = jnp.zeros((), jnp.float32)
        w = (jnp.asarray(self.codes), jnp.asarray(self.absmax), nested, offset)
        return StagedNF4(self, *nf4_sharded.stage(p, *w), plan=p)

    def _sharded_plan(self, rows: int) -> nf4_sharded.Plan:
        """The sharded matmul's plan for ``x [rows, in]`` (``nf4_sharded.plan``)."""
        return nf4_sharded.plan(
            self.run.mesh,
            dispatch.rows_spec(self.run, rows),
            self.run.spec,
            ((rows, self.shape[1]), tuple(self.shape)),
            code=tuple(float(c) for c in CODES[self.quant_type]),
            blocksize=self.blocksize,
            kernel=self.run.kernels.nf4,
            interpret=self.run.kernels.interpret,
            absmax_table=DQ_TABLE if self.double_quant else None,
            nested_blocksize=self.nested_blocksize,
        )


@jax.tree_util.register_pytree_with_keys_class
class StagedNF4:
    """An :class:`NF4Tensor` with its Mosaic kernel operands made once for several products
    (:meth:`NF4Tensor.staged`, inside a step, never stored): ``codes_t [Kp/2, N]``
    tile-reordered and float32 ``absmax_t [Kp/bs, N]`` (``nf4_tpu.tile_layout``), gathered
    over the mesh first when ``plan`` (static: ``nf4_sharded.Plan``) is set. Leaves:
    ``weight`` (the tensor, for what is not a product: its shape, ``dequantize``),
    ``codes_t``, ``absmax_t``."""

    def __init__(self, weight: NF4Tensor, codes_t, absmax_t, *, plan=None):
        self.weight, self.codes_t, self.absmax_t = weight, codes_t, absmax_t
        self.plan: nf4_sharded.Plan | None = plan

    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.GetAttrKey(k) for k in ("weight", "codes_t", "absmax_t")]
        return list(zip(keys, self.tree_flatten()[0], strict=True)), self.plan

    def tree_flatten(self):
        return (self.weight, self.codes_t, self.absmax_t), self.plan

    @classmethod
    def tree_unflatten(cls, plan, children):
        return cls(*children, plan=plan)

    shape = property(lambda self: self.weight.shape)
    blocksize = property(lambda self: self.weight.blocksize)
    run = property(lambda self: self.weight.run)
    is_2d = property(lambda self: self.weight.is_2d)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        return self.weight.dequantize(dtype)

    def staged(self) -> StagedNF4:
        return self

    def matmul(self, x: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """:meth:`NF4Tensor.matmul` on the staged operands (the same kernels and dtypes). In a
        sharded program, rows that do not split as the staging assumed (fewer than the batch
        axes' devices) go through the weight's own path, which gathers per call."""
        w, k = self.weight, self.weight.run.kernels
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"StagedNF4.matmul: x has {x.shape[-1]} features, weight {w.shape}")
        lead, out_dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, w.shape[1]).astype(k.nf4_compute_dtype(x.dtype))
        if self.plan is None:
            dispatch.log_path_once(w.shape, x.shape, "kernel", "mosaic, codes laid out once")
            y = nf4_matmul.nf4_matmul_tiled(
                x2,
                self.codes_t,
                self.absmax_t,
                code=self._code(),
                blocksize=w.blocksize,
                interpret=k.interpret,
            )
        elif dispatch.rows_spec(w.run, x2.shape[0]) != self.plan.x_spec:
            return w.matmul(x, rng=rng)
        else:
            dispatch.log_path_once(
                w.shape, x.shape, "sharded", "mosaic, gathered and laid out once"
            )
            y = nf4_sharded.nf4_matmul_staged(x2, self.codes_t, self.absmax_t, self.plan)
        return y.astype(out_dtype).reshape(*lead, w.shape[0])

    def _code(self) -> tuple[float, ...]:
        return tuple(float(c) for c in CODES[self.weight.quant_type])


def storage_bits_per_param(t: NF4Tensor) -> float:
    """Bits of storage per weight element, counted from the pytree's leaves."""
    return 8.0 * t.nbytes / (t.shape[0] * t.shape[1])
