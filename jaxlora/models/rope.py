"""RoPE scaling rules whose tables need more than a fixed frequency list: yarn, dynamic NTK
and LongRoPE, as ``transformers.modeling_rope_utils`` computes them (float32 throughout).

* ``yarn`` (Peng et al. 2023): frequencies blended between interpolated (``/factor``) and
  extrapolated by a linear ramp over the dimensions whose wavelength falls between
  ``beta_fast`` and ``beta_slow`` rotations of the original context; cos and sin scaled by the
  attention factor ``0.1·ln(factor) + 1`` (or its ``mscale / mscale_all_dim`` ratio).
* ``dynamic`` (NTK-aware, /u/emozilla): ``base ← base · (factor·L/M − (factor − 1))^(d/(d−2))``
  where ``L`` is the length of the forward call and ``M`` ``max_position_embeddings``; plain
  RoPE while ``L ≤ M``.
* ``longrope`` (Ding et al. 2024; Phi-3 128k): per-frequency divisors, ``short_factor`` while
  ``L ≤ original_max_position_embeddings`` and ``long_factor`` beyond; cos and sin scaled by
  ``sqrt(1 + ln(factor) / ln(original))``.

The length ``L`` of a call is ``max(positions) + 1`` over the whole batch, the rule
``transformers``' ``dynamic_rope_update`` applies on every forward. It is computed inside the
compiled step from the positions it is given, so a step gets the frequencies ``transformers``
gets for the same ``position_ids``. One difference is by design: ``transformers`` keeps the
grown dynamic frequencies in module state until a call shorter than ``M`` resets them, so its
answer for a call of length ``M < L < L_earlier`` depends on earlier calls; jaxlora computes
what a fresh module computes (the answer for this call alone).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCALED_TYPES = ("yarn", "dynamic", "longrope")

_KEYS = {
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
    "dynamic": {"factor"},
    "longrope": {
        "short_factor",
        "long_factor",
        "original_max_position_embeddings",
        "attention_factor",
        "factor",
    },
}
_REQUIRED = {
    "yarn": {"factor", "original_max_position_embeddings"},
    "dynamic": {"factor"},
    "longrope": {"short_factor", "long_factor", "original_max_position_embeddings"},
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """The resolved parameters of one yarn / dynamic / longrope rule (hashable: it is part of
    the static model config)."""

    rope_type: str
    dim: int  # rotary dimensions (head_dim × partial_rotary_factor)
    theta: float
    factor: float = 1.0
    max_position_embeddings: int = 0  # dynamic: the length past which the base grows
    original_max_position_embeddings: int = 0  # yarn, longrope
    attention_factor: float = 1.0  # cos and sin are multiplied by it
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    def to_hf(self) -> dict[str, Any]:
        """The ``rope_parameters`` entries (besides ``rope_type``/``rope_theta``) that give
        this rule back in ``transformers``."""
        if self.rope_type == "dynamic":
            return {"factor": self.factor}
        out: dict[str, Any] = {
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "attention_factor": self.attention_factor,
        }
        if self.rope_type == "yarn":
            out |= {"beta_fast": self.beta_fast, "beta_slow": self.beta_slow}
            out["truncate"] = self.truncate
        else:
            out |= {"short_factor": list(self.short_factor), "long_factor": list(self.long_factor)}
        return out


def parse(
    rope_type: str,
    params: dict[str, Any],
    *,
    theta: float,
    dim: int,
    max_position_embeddings: int | None,
    refuse,
) -> RopeScaling:
    """A :class:`RopeScaling` from ``rope_parameters`` (``rope_type``/``rope_theta`` already
    taken out), each default resolved as ``transformers`` resolves it; an unknown key or a
    missing one is refused by name through ``refuse(field, value, allowed)``."""
    unknown = sorted(set(params) - _KEYS[rope_type])
    if unknown:
        refuse(f"rope parameters {unknown} for rope_type", rope_type, sorted(_KEYS[rope_type]))
    missing = sorted(k for k in _REQUIRED[rope_type] if params.get(k) is None)
    if missing:
        refuse(f"rope_parameters (missing {missing}) for rope_type", rope_type, "those keys")
    if rope_type in ("dynamic", "longrope") and not max_position_embeddings:
        refuse("max_position_embeddings", max_position_embeddings, f"set, for {rope_type}")
    base = dict(rope_type=rope_type, dim=dim, theta=theta)
    if rope_type == "dynamic":
        return RopeScaling(
            **base, factor=float(params["factor"]), max_position_embeddings=max_position_embeddings
        )
    original = int(params["original_max_position_embeddings"])
    if rope_type == "yarn":
        return _parse_yarn(base, params, original)
    factor = params.get("factor")
    factor = max_position_embeddings / original if factor is None else float(factor)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short, long = (tuple(float(f) for f in params[k]) for k in ("short_factor", "long_factor"))
    for name, factors in (("short_factor", short), ("long_factor", long)):
        if len(factors) != dim // 2:
            refuse(f"rope_parameters.{name} (length)", len(factors), dim // 2)
    return RopeScaling(
        **base,
        factor=factor,
        max_position_embeddings=max_position_embeddings,
        original_max_position_embeddings=original,
        attention_factor=float(attention),
        short_factor=short,
        long_factor=long,
    )


def _parse_yarn(base: dict[str, Any], params: dict[str, Any], original: int) -> RopeScaling:
    factor = float(params["factor"])
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)
    return RopeScaling(
        **base,
        factor=factor,
        original_max_position_embeddings=original,
        attention_factor=float(attention),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)),
    )


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _exponents(dim: int) -> np.ndarray:
    return np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)


def default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """Plain RoPE ``1 / theta^(2i/dim)``, float32 ``[dim // 2]``."""
    return (np.float32(1.0) / (np.float32(theta) ** _exponents(dim))).astype(np.float32)


def yarn_inv_freq(s: RopeScaling) -> np.ndarray:
    """YaRN's blended frequencies (``_compute_yarn_parameters``), float32 ``[dim // 2]``."""
    dim, base, original = s.dim, s.theta, s.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = (np.float32(base) ** _exponents(dim)).astype(np.float32)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(s.factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
    extrapolation_factor = (np.float32(1.0) - ramp.astype(np.float32)).astype(np.float32)
    inv = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv.astype(np.float32)


def longrope_inv_freq(s: RopeScaling, long: bool) -> np.ndarray:
    """LongRoPE's ``1 / (factor_i · theta^(2i/dim))`` with the short or long factors."""
    ext = np.asarray(s.long_factor if long else s.short_factor, np.float32)
    return (np.float32(1.0) / (ext * np.float32(s.theta) ** _exponents(s.dim))).astype(np.float32)


def static_inv_freq(s: RopeScaling) -> np.ndarray:
    """The frequencies ``transformers`` builds at init (before any call picks a length)."""
    if s.rope_type == "yarn":
        return yarn_inv_freq(s)
    if s.rope_type == "longrope":
        return longrope_inv_freq(s, long=False)
    return default_inv_freq(s.theta, s.dim)


def call_inv_freq(s: RopeScaling, positions: jax.Array) -> jax.Array:
    """The frequencies of one forward call over ``positions [B, S]`` (traced, float32)."""
    if s.rope_type == "yarn":
        return jnp.asarray(yarn_inv_freq(s))
    length = jnp.max(positions).astype(jnp.int32) + 1  # transformers: max(position_ids) + 1
    if s.rope_type == "longrope":
        long = length > s.original_max_position_embeddings
        return jnp.where(long, longrope_inv_freq(s, True), longrope_inv_freq(s, False))
    # dynamic: computed in float32 as torch does it from an int64 length tensor
    m = s.max_position_embeddings
    seq = jnp.maximum(length, m).astype(jnp.float32)
    grown = (jnp.float32(s.factor) * seq / jnp.float32(m)) - jnp.float32(s.factor - 1)
    base = jnp.float32(s.theta) * grown ** jnp.float32(s.dim / (s.dim - 2))
    ntk = 1.0 / base ** jnp.asarray(_exponents(s.dim))
    return jnp.where(length > m, ntk, jnp.asarray(default_inv_freq(s.theta, s.dim)))
