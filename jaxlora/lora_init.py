"""Where LoRA goes and how it starts: PEFT's module matching and initialisations.

Matching mirrors ``peft.tuners.tuners_utils.check_target_module_exists`` (exclusions, the
``modules_to_save`` guard, list / regex / ``"all-linear"`` targets, ``layers_to_transform``) and
``_set_trainable`` (``modules_to_save``), run over the module paths of a Hugging Face-shaped
parameter tree — the names ``model.named_modules()`` yields in ``transformers``.

Initialisations follow ``LoraLayer.reset_lora_parameters`` / ``pissa_init`` and LoftQ
(Li et al. 2023, arXiv:2310.08659; ``peft.utils.loftq_utils.loftq_init``); PiSSA is Meng et al.
2024 (arXiv:2404.02948).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.hf import flatten

if TYPE_CHECKING:
    from jaxlora.lora import LoraConfig

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for llama, mistral, qwen2, qwen3.
DEFAULT_TARGETS = ("q_proj", "v_proj")
EMBEDDINGS = ("embed_tokens",)
HEAD = "lm_head"


def _error(msg: str) -> Exception:
    from jaxlora.lora import LoraConfigError

    return LoraConfigError(msg)


class Modules:
    """The module paths of a parameter tree: ``all`` (every node, as ``named_modules`` lists
    them), ``linear`` (path -> ``[out, in]`` weight LoRA can wrap) and ``tied_head`` (the model
    has ``lm_head`` only as a view of ``embed_tokens``)."""

    def __init__(self, params: dict):
        flat = flatten(params)
        self.all: set[str] = set()
        self.linear: dict[str, Any] = {}
        for key, leaf in flat.items():
            module = key.rsplit(".", 1)[0] if "." in key else ""
            parts = module.split(".")
            self.all |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
            is_2d = key.endswith(".weight") and len(getattr(leaf, "shape", ())) == 2
            if is_2d and parts[-1] not in EMBEDDINGS:
                self.linear[module] = leaf
        self.tied_head = HEAD not in params and any(m.endswith("embed_tokens") for m in self.all)
        if self.tied_head:
            self.all.add(HEAD)  # transformers still has the module; its weight is embed_tokens'

    def describe(self) -> str:
        names = sorted({p.rsplit(".", 1)[-1] for p in self.linear})
        example = next((p for p in sorted(self.linear) if ".layers." in p), None)
        return f"linear modules here: {names}" + (f" (paths like {example!r})" if example else "")


def _in_modules_to_save(cfg: LoraConfig, key: str) -> bool:
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in cfg.modules_to_save)


def _excluded(cfg: LoraConfig, key: str) -> bool:
    ex = cfg.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, key) is not None
    return key in ex or any(key.endswith(f".{e}") for e in ex)


def _layer_ok(cfg: LoraConfig, key: str) -> bool:
    lt = cfg.layers_to_transform
    if lt is None:
        return True
    match = None
    if not cfg.layers_pattern:
        # Lazy: the first numbered segment is the layer index, as in PEFT.
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in cfg.layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == lt if isinstance(lt, int) else idx in lt


def target_matches(cfg: LoraConfig, key: str, linear: set[str] | None = None) -> bool:
    """Whether PEFT would put LoRA on the module at ``key`` (``linear``: the linear module
    paths, needed only for ``"all-linear"``)."""
    if _excluded(cfg, key) or _in_modules_to_save(cfg, key):
        return False
    tm = cfg.target_modules if cfg.target_modules is not None else DEFAULT_TARGETS
    if isinstance(tm, str):
        if tm.lower() == "all-linear":
            return key in (linear or set()) and key != HEAD
        return re.fullmatch(tm, key) is not None
    if key in tm:
        return True
    return any(key.endswith(f".{t}") for t in tm) and _layer_ok(cfg, key)


def resolve_targets(params: dict, cfg: LoraConfig, *, strict: bool = True) -> dict[str, tuple]:
    """``{module path: (r, alpha)}`` for every module ``cfg`` puts LoRA on.

    Raises when nothing matches, when a match is not a linear layer (embeddings, norms, whole
    blocks, a tied ``lm_head``), and — with ``strict`` — when one entry of a list
    ``target_modules`` matches no module at all (PEFT only checks the union; a typo in one name
    would silently train less).
    """
    mods = Modules(params)
    tm = cfg.target_modules if cfg.target_modules is not None else DEFAULT_TARGETS
    if strict and isinstance(tm, tuple):
        for t in tm:
            if not any(m == t or m.endswith(f".{t}") for m in mods.all):
                raise _error(f"lora.target_modules: {t!r} matches no module; {mods.describe()}")
    hits = sorted(m for m in mods.all if target_matches(cfg, m, set(mods.linear)))
    if not hits:
        raise _error(
            f"lora.target_modules={tm!r} matches no module (after exclude_modules, "
            f"modules_to_save and layers_to_transform); {mods.describe()}"
        )
    for m in hits:
        if m == HEAD and mods.tied_head:
            raise _error(
                "lora.target_modules: lm_head is tied to model.embed_tokens in this model; "
                "LoRA on a tied head is not supported (the adapter would also change the "
                "embedding lookup in transformers)"
            )
        if m not in mods.linear:
            kind = "an embedding" if m.rsplit(".", 1)[-1] in EMBEDDINGS else "not a linear layer"
            raise _error(
                f"lora.target_modules matches {m!r}, which is {kind}; jaxlora puts LoRA "
                f"on linear layers only; {mods.describe()}"
            )
        if type(mods.linear[m]).__name__ == "LoRAWeight":
            raise _error(f"{m} already holds a LoRA weight: merge it or start from the base")
    saved = modules_to_save_paths(params, cfg)
    both = [m for m in hits if any(m == s or m.startswith(s + ".") for s in saved)]
    if both:
        raise _error(
            f"lora: {both[:4]} would be both LoRA-wrapped and in modules_to_save "
            f"{list(cfg.modules_to_save)}; a module is either adapted or trained in full"
        )
    return {m: cfg.rank_alpha(m) for m in hits}


def modules_to_save_paths(params: dict, cfg: LoraConfig) -> set[str]:
    """Module paths matched by ``modules_to_save`` (``path.endswith(name)``, PEFT's rule)."""
    mods = Modules(params)
    return {m for m in mods.all if any(m.endswith(n) for n in cfg.modules_to_save)}


def check_modules_to_save(params: dict, cfg: LoraConfig) -> None:
    """Every ``modules_to_save`` name must match something jaxlora can train in full."""
    mods = Modules(params)
    for name in cfg.modules_to_save:
        hits = sorted(m for m in mods.all if m.endswith(name))
        if not hits:
            raise _error(f"lora.modules_to_save: {name!r} matches no module; {mods.describe()}")
        for m in hits:
            if mods.tied_head and (m == HEAD or m.rsplit(".", 1)[-1] in EMBEDDINGS):
                raise _error(
                    f"lora.modules_to_save: {m!r} is tied (lm_head = embed_tokens) in this "
                    "model; PEFT trains a separate copy for the lookup while the head keeps the "
                    "original, which jaxlora's single tied weight cannot represent"
                )
    saved = modules_to_save_paths(params, cfg)
    for key, leaf in flatten(params).items():
        module = key.rsplit(".", 1)[0]
        in_saved = any(module == m or module.startswith(m + ".") for m in saved)
        if in_saved and not isinstance(leaf, jax.Array | np.ndarray):
            raise _error(
                f"lora.modules_to_save: {key} is a {type(leaf).__name__}; only "
                "unquantized modules can be trained in full"
            )


# ---- initial values -----------------------------------------------------------------------------


def _svd_factors(w: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """``(B [out, r], A [r, in])`` with ``s·B·A`` the best rank-r approximation of ``w``.

    PEFT's ``pissa_init``: ``A = diag(√(S_r/s))·Vhᵣ``, ``B = Uᵣ·diag(√(S_r/s))``.
    """
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[:r] / scale)
    return u[:, :r] * root[None, :], root[:, None] * vh[:r]


def _svd_lowrank_factors(w, r: int, scale: float, niter: int, key) -> tuple[jax.Array, jax.Array]:
    """Randomized range finder with ``niter`` subspace iterations (Halko et al. 2011, Alg. 4.4;
    what ``torch.svd_lowrank`` computes for ``q=r``), then the factors of :func:`_svd_factors`."""
    q, _ = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], r), w.dtype))
    for _ in range(niter):
        q, _ = jnp.linalg.qr(w.T @ q)
        q, _ = jnp.linalg.qr(w @ q)
    b, a = _svd_factors(q.T @ w, r, scale)  # (r, in) has the same top-r spectrum
    return q @ b, a


def _float_base(weight: Any, init: str, where: str) -> jax.Array:
    if not isinstance(weight, jax.Array | np.ndarray):
        raise _error(
            f"lora.init={init!r} needs the unquantized weight, but {where} is a "
            f"{type(weight).__name__}; load the model unquantized"
            + (" (LoftQ quantizes the base itself)" if init == "loftq" else "")
        )
    return jnp.asarray(weight, jnp.float32)


def init_lora(cfg: LoraConfig, weight: Any, r: int, scale: float, key: jax.Array, dtype: Any,
              *, where: str) -> tuple[Any, jax.Array, jax.Array]:  # fmt: skip
    """``(base, A [r, in], B [out, r])`` for one ``[out, in]`` weight, per ``cfg.init``.

    ``base`` is ``weight`` unchanged, except PiSSA (``W − s·B·A``, same dtype) and LoftQ (an
    ``NF4Tensor`` of ``W − s·B·A``).
    """
    out, inn = weight.shape
    k_a, k_b = jax.random.split(key)
    init = cfg.init
    uses_svd = init in ("pissa", "loftq") or init.startswith("pissa_niter_")
    if uses_svd and r > min(out, inn):
        raise _error(f"lora.r={r} exceeds min{weight.shape} of {where} for {init!r}")
    if init in ("default", "random", "gaussian"):
        if init == "gaussian":  # nn.init.normal_(A, std=1/r)
            a = jax.random.normal(k_a, (r, inn), jnp.float32) / r
        else:  # kaiming_uniform_(a=√5) on a [r, in] matrix: U(±1/√in)
            bound = 1.0 / math.sqrt(inn)
            a = jax.random.uniform(k_a, (r, inn), jnp.float32, -bound, bound)
        if init == "random":  # init_lora_weights=False keeps nn.Linear's default for B too
            bound = 1.0 / math.sqrt(r)
            b = jax.random.uniform(k_b, (out, r), jnp.float32, -bound, bound)
        else:
            b = jnp.zeros((out, r), jnp.float32)
        return weight, a.astype(dtype), b.astype(dtype)
    w = _float_base(weight, init, where)
    if init == "pissa":
        b, a = _svd_factors(w, r, scale)
    elif init.startswith("pissa_niter_"):
        b, a = _svd_lowrank_factors(w, r, scale, int(init.rsplit("_", 1)[1]), k_a)
    elif init == "loftq":
        return _loftq(w, weight.dtype, r, scale, cfg.loftq_iters, dtype)
    else:  # LoraConfig validates init; reaching here is a bug
        raise AssertionError(init)
    a, b = a.astype(dtype), b.astype(dtype)
    base = (w - scale * (b.astype(jnp.float32) @ a.astype(jnp.float32))).astype(weight.dtype)
    return base, a, b


# LoftQ quantizes as jaxlora's loader does (bitsandbytes NF4, blocksize 64, double quant).
LOFTQ_QUANT = {"blocksize": 64, "quant_type": "nf4", "double_quant": True}


def _loftq(w: jax.Array, base_dtype, r: int, scale: float, iters: int, dtype) -> tuple:
    """Alternate ``Q = NF4(W − s·B·A)`` and ``s·B·A = SVD_r(W − deq(Q))``, ``iters`` times.

    As ``peft.utils.loftq_utils.loftq_init``, except that the factors are divided by the scale
    (PEFT uses ``B·A ≈ W − Q`` and is exact only when ``s = 1``); here ``Q + s·B·A ≈ W`` for any
    ``alpha / r``.
    """
    from jaxlora.nf4 import quantize

    res = w
    for i in range(iters):
        q = quantize(res.astype(base_dtype), **LOFTQ_QUANT)
        b, a = _svd_factors(w - q.dequantize(jnp.float32), r, scale)
        if i + 1 == iters:
            break
        res = w - scale * (b @ a)
    return q, a.astype(dtype), b.astype(dtype)


def dora_magnitude(base: Any, a: jax.Array, b: jax.Array, scale: float, dtype: Any) -> jax.Array:
    """DoRA's initial magnitude ``m = ‖W + s·B·A‖`` per output row, in float32
    (``DoraLinearLayer.update_layer``; an NF4 base is dequantized first)."""
    from jaxlora.lora import dense_weight

    w = dense_weight(base, jnp.float32)
    w = w + scale * (b.astype(jnp.float32) @ a.astype(jnp.float32))
    return jnp.linalg.norm(w, axis=1).astype(dtype)
