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

from jaxlora import kernels
from jaxlora.kernels import nf4_matmul

logger = logging.getLogger(__name__)

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), index = 4-bit code.
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip
# get_4bit_type("fp4"): 1 sign, 2 exponent, 1 mantissa bits in bit-pattern order, / 12.
FP4_CODE = np.array(
    [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32
) / np.float32(12.0)

# create_dynamic_map(signed=True) as float32 bit patterns. bnb builds it with torch.linspace,
# whose float32 rounding numpy does not reproduce, so the 256 values are written out;
# tests/test_nf4.py checks them against bnb bit for bit.
_DYNAMIC_MAP_HEX = """
bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000 bf616666 bf5dcccd
bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333 bf44999a bf410000 bf3d6666 bf39cccd
bf363334 bf32999a bf2f0000 bf2b6666 bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd
bf123334 bf0e999a bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a
bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000 bea2cccc be9b999a
be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd be526666 be440000 be35999a be273333
be18cccd be0a6666 bdf80000 bddb3334 bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8
bda75c2a bda1999a bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d
bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148 bcfeb852 bce7ae15
bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148 bc1f3b64 bc160418 bc0ccccd bc039581
bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4 bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d
baf1a9fc baa7ef9d ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b
b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000 3513a3b7 365a1a94
370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b 398ce705 39c7e283 3a016f01 3a1eecc1
3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d 3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374
3bab020d 3bbd70a4 3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148
3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148 3d166667 3d21eb85
3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d 3d728f5d 3d7e147b 3d84cccd 3d8a8f5d
3d9051eb 3d96147b 3d9bd70a 3da1999a 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7
3dc9eb85 3ddb3334 3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd
3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000 3eb13333 3eb86666
3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a 3eeacccc 3ef20000 3ef93332 3f003333
3f03cccc 3f076666 3f0b0000 3f0e999a 3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334
3f27cccd 3f2b6666 3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333
3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000 3f68999a 3f6c3333
3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000
"""
DYNAMIC_MAP = np.array([int(h, 16) for h in _DYNAMIC_MAP_HEX.split()], np.uint32).view(np.float32)

CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bnb's quantize_4bit accepts
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_TINY = np.float32(1e-38)  # bnb clamps absmax to this before dividing


def _bounds(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints between the sorted codes (float32) and the sorted-to-code index map.

    Mirrors ``_get_4bit_quantize_bounds``: NF4 is already sorted; FP4 needs the remap.
    """
    code = CODES[quant_type]
    order = np.argsort(code, kind="stable")
    return (code[order[:-1]] + code[order[1:]]) / np.float32(2.0), order.astype(np.uint8)


def _quantize_4bit_flat(xp: Any, flat: Any, blocksize: int, quant_type: str) -> tuple[Any, Any]:
    """``flat [n] float32 -> (codes [n + n%2] uint8 unpacked, absmax [ceil(n/bs)] float32)``."""
    n = flat.shape[0]
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(full // blocksize, blocksize)
    absmax = xp.max(xp.abs(blocks), axis=1)
    recip = np.float32(1.0) / xp.maximum(absmax, _TINY)
    # x * 0 stays 0 even where a backend flushes 1e-38 to zero and recip becomes inf.
    scaled = xp.where(blocks == 0, np.float32(0), blocks * recip[:, None])
    scaled = xp.clip(scaled, -1.0, 1.0).reshape(full)
    parts, amaxes = [scaled], [absmax]
    if rem:
        # bnb's tail block divides (not multiplies) and stores the clamped absmax.
        tail = flat[full:]
        am = xp.maximum(xp.max(xp.abs(tail)), _TINY)
        parts.append(xp.clip(xp.where(tail == 0, np.float32(0), tail / am), -1.0, 1.0))
        amaxes.append(am[None])
    if n % 2:
        parts.append(xp.zeros((1,), np.float32))  # padded with the code of 0.0
    scaled = xp.concatenate(parts) if len(parts) > 1 else scaled
    bounds, order = _bounds(quant_type)
    idx = xp.searchsorted(xp.asarray(bounds), scaled, side="left")  # == torch.bucketize
    codes = xp.asarray(order)[idx] if quant_type == "fp4" else idx.astype(np.uint8)
    absmax = xp.concatenate(amaxes) if rem else absmax
    return codes.astype(np.uint8), absmax.astype(np.float32)


def _pack(xp: Any, codes: Any) -> Any:
    """``[2k] uint8 codes -> [k] bytes``, first of each pair in the high nibble."""
    return (codes[0::2] << 4) | codes[1::2]


def _unpack(xp: Any, packed: Any) -> Any:
    """``[..., k] bytes -> [..., 2k] codes`` (inverse of :func:`_pack`)."""
    pairs = xp.stack([packed >> 4, packed & 15], axis=-1)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _dynamic_quantize(xp: Any, v: Any) -> Any:
    """Float32 values in [-1, 1] -> nearest DYNAMIC_MAP index, bnb's CUDA ``dQuantize<0>``.

    A 7-step binary search from pivot 127, then a float32 midpoint test against the
    neighbour on the side ``v`` lies; a tie keeps the search's final pivot.
    """
    code = xp.asarray(DYNAMIC_MAP)
    pivot = xp.full(v.shape, 127, np.int32)
    lo_p, up_p = xp.zeros_like(pivot), xp.full_like(pivot, 255)
    lower, upper = xp.full(v.shape, -1.0, np.float32), xp.full(v.shape, 1.0, np.float32)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = v > val
        lo_p, lower = xp.where(gt, pivot, lo_p), xp.where(gt, val, lower)
        up_p, upper = xp.where(gt, up_p, pivot), xp.where(gt, upper, val)
        pivot = xp.where(gt, pivot + step, pivot - step)
        val = code[pivot]
    upper = xp.where(up_p == 255, code[255], upper)
    lower = xp.where(lo_p == 0, code[0], lower)
    half = np.float32(0.5)
    above = xp.where(v > (upper + val) * half, up_p, pivot)
    below = xp.where(v < (lower + val) * half, lo_p, pivot)
    return xp.where(v > val, above, below).astype(np.uint8)


def _mean_f32(xp: Any, a: Any) -> Any:
    """float32 mean of ``a [n]`` by a fixed pairwise tree of float32 adds.

    Elementwise adds round the same in numpy and XLA, so host and jit quantization give the
    same ``offset`` bits; torch's mean (bnb) sums in another order and may differ by an ulp.
    """
    n = a.shape[0]
    s = xp.concatenate([a, xp.zeros(((1 << max(0, (n - 1).bit_length())) - n,), np.float32)])
    while s.shape[0] > 1:
        half = s.shape[0] // 2
        s = s[:half] + s[half:]
    return (s[0] / np.float32(n)).astype(np.float32)


def _quantize_dynamic_blockwise(xp: Any, v: Any, blocksize: int) -> tuple[Any, Any]:
    """``v [b] f32 -> (codes [b] uint8, absmax [ceil(b/blocksize)] f32)``: bnb's
    ``quantize_blockwise`` with the dynamic map and the CUDA rounding rule."""
    b = v.shape[0]
    padded = xp.concatenate([v, xp.zeros(((-b) % blocksize,), np.float32)])
    blocks = padded.reshape(-1, blocksize)
    absmax = xp.max(xp.abs(blocks), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # An all-zero block gives 0*inf = NaN here as in CUDA, and NaN lands on code 0.
        scaled = blocks * (np.float32(1.0) / absmax)[:, None]
    return _dynamic_quantize(xp, scaled).reshape(-1)[:b], absmax.astype(np.float32)


def _double_quantize(xp: Any, absmax: Any, nested_blocksize: int) -> tuple[Any, Any, Any]:
    """``absmax [b] f32 -> (codes [b] uint8, nested_absmax [ceil(b/nbs)] f32, offset [] f32)``."""
    offset = _mean_f32(xp, absmax)
    codes, nested = _quantize_dynamic_blockwise(xp, absmax - offset, nested_blocksize)
    return codes, nested, xp.asarray(offset, np.float32)


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
    if dtype.name not in _FLOAT_DTYPES:
        raise ValueError(f"quantize: weight dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
    flat = w.reshape(-1).astype(np.float32)
    codes, absmax = _quantize_4bit_flat(xp, flat, blocksize, quant_type)
    packed = _pack(xp, codes)
    nested = offset = None
    if double_quant:
        absmax, nested, offset = _double_quantize(xp, absmax, nested_blocksize)
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


def _no_fma(product: jax.Array, nonneg: jax.Array) -> jax.Array:
    """``product``, rounded to float32 on its own before any later add.

    Under ``jit`` XLA (CPU and GPU) contracts ``a * b + c`` into one FMA, which rounds once
    and differs from bnb by an ulp; optimization barriers and reduce_precision are removed
    before codegen. XOR-ing the bits with the sign bit of ``nonneg`` (values >= 0, so the
    XOR is a no-op) is opaque to the compiler and keeps the multiply and the add apart.
    """
    zero = jax.lax.bitcast_convert_type(nonneg, jnp.uint32) >> 31
    bits = jax.lax.bitcast_convert_type(product, jnp.uint32) ^ zero
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


_FALLBACK_LOGGED: set[tuple] = set()


def _log_fallback_once(shape: tuple, x_shape: tuple, reason: str) -> None:
    key = (shape, x_shape, reason)
    if key not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add(key)
        logger.info("NF4 %s x %s: dequantize-then-dot (%s)", x_shape, shape, reason)


@jax.tree_util.register_pytree_with_keys_class
class NF4Tensor:
    """A frozen 4-bit ``[out, in]`` weight: packed codes + (double-quantized) absmax.

    Leaves (arrays): ``codes`` uint8 ``[out, in/2]`` (2-D layout) or ``[ceil(numel/2)]``
    (flat layout); ``absmax`` ``[out, in/blocksize]`` or ``[blocks]``: uint8 codes with
    double quantization, float32 without; ``nested_absmax`` float32 ``[ceil(blocks/nbs)]``
    and ``offset`` float32 ``[]`` (both ``None`` without double quantization).
    Static aux data: ``shape``, ``dtype`` (name, what :meth:`dequantize` returns),
    ``blocksize``, ``quant_type``, ``nested_blocksize`` (``None`` without DQ).
    """

    _LEAVES = ("codes", "absmax", "nested_absmax", "offset")

    def __init__(self, codes, absmax, nested_absmax, offset, *, shape, dtype, blocksize,
                 quant_type, nested_blocksize):  # fmt: skip
        self.codes, self.absmax = codes, absmax
        self.nested_absmax, self.offset = nested_absmax, offset
        self.shape: tuple[int, int] = tuple(shape)
        self.dtype_name: str = dtype
        self.blocksize: int = blocksize
        self.quant_type: str = quant_type
        self.nested_blocksize: int | None = nested_blocksize

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_flat(cls, packed, absmax, nested_absmax, offset, *, shape, dtype, blocksize,
                  quant_type, nested_blocksize) -> NF4Tensor:  # fmt: skip
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
        return cls(packed, absmax, nested_absmax, offset, shape=shape, dtype=dtype,
                   blocksize=blocksize, quant_type=quant_type,
                   nested_blocksize=nested_blocksize)  # fmt: skip

    # ---- pytree -------------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.GetAttrKey(k) for k in self._LEAVES]
        return list(zip(keys, self.tree_flatten()[0], strict=True)), self._aux()

    def tree_flatten(self):
        return tuple(getattr(self, k) for k in self._LEAVES), self._aux()

    def _aux(self) -> tuple:
        return (self.shape, self.dtype_name, self.blocksize, self.quant_type, self.nested_blocksize)

    @classmethod
    def tree_unflatten(cls, aux, children):
        shape, dtype, blocksize, quant_type, nested_blocksize = aux
        return cls(*children, shape=shape, dtype=dtype, blocksize=blocksize,
                   quant_type=quant_type, nested_blocksize=nested_blocksize)  # fmt: skip

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
        return (f"NF4Tensor(shape={self.shape}, dtype={self.dtype_name}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}{dq})")  # fmt: skip

    # ---- math ---------------------------------------------------------------------------
    def absmax_f32(self) -> jax.Array:
        """Per-block absmax as float32, same shape as ``self.absmax``.

        With DQ: ``DYNAMIC_MAP[code] * nested_absmax[i // nbs]`` then ``+ offset``, two
        float32 roundings as in bnb's ``dequantize_blockwise`` followed by ``absmax += offset``.
        """
        if not self.double_quant:
            return jnp.asarray(self.absmax, jnp.float32)
        flat = jnp.asarray(self.absmax).reshape(-1)
        nested = jnp.repeat(jnp.asarray(self.nested_absmax), self.nested_blocksize)
        nested = nested[: flat.shape[0]]
        scaled = _no_fma(jnp.asarray(DYNAMIC_MAP)[flat] * nested, nested)
        return (scaled + jnp.asarray(self.offset)).reshape(self.absmax.shape)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """``[out, in]`` weight: ``code[nibble] * absmax`` in float32, then cast to ``dtype``
        (default: the original dtype). Bit-identical to bnb's ``dequantize_4bit``."""
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        code = jnp.asarray(CODES[self.quant_type])
        vals = code[_unpack(jnp, jnp.asarray(self.codes))]
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

    def fallback_weight(self, dtype, x_shape: tuple[int, ...]) -> jax.Array | None:
        """``None`` when the fused dequant-matmul kernel applies; otherwise the dequantized
        ``[out, in]`` weight in ``dtype`` (no gradient) for a plain dot, with the reason logged
        once per shape."""
        use, reason = kernels.kernel_applies(self.is_2d, self.blocksize)
        if use:
            return None
        _log_fallback_once(self.shape, x_shape, reason)
        return jax.lax.stop_gradient(self.dequantize(dtype))

    def matmul(self, x: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """``x [..., in] -> x @ Wᵀ [..., out]`` in ``x.dtype``; no gradient for ``W``.

        Uses the fused Pallas dequant-matmul (``jaxlora.kernels.nf4_matmul``) when the kernel
        mode allows it and the layout fits; otherwise dequantizes to ``x.dtype`` and dots,
        logging which path runs (once per shape). ``rng`` is unused (no randomness).
        """
        del rng
        if x.shape[-1] != self.shape[1]:
            raise ValueError(f"NF4Tensor.matmul: x has {x.shape[-1]} features, weight {self.shape}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.shape[1])
        w = self.fallback_weight(x.dtype, x.shape)
        if w is None:
            y = nf4_matmul.nf4_matmul(
                x2,
                jnp.asarray(self.codes),
                jax.lax.stop_gradient(self.absmax_f32()),
                code=tuple(float(c) for c in CODES[self.quant_type]),
                blocksize=self.blocksize,
                interpret=kernels.interpret(),
            )
        else:
            y = jnp.einsum("mi,oi->mo", x2, w, preferred_element_type=jnp.float32).astype(x.dtype)
        return y.reshape(*lead, self.shape[0])


def storage_bits_per_param(t: NF4Tensor) -> float:
    """Bits of storage per weight element, counted from the pytree's leaves."""
    return 8.0 * t.nbytes / (t.shape[0] * t.shape[1])
