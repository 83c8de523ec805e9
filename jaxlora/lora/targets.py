"""Where LoRA goes: PEFT's module matching over a parameter tree.

Matching mirrors ``peft.tuners.tuners_utils.check_target_module_exists`` (exclusions, the
``modules_to_save`` guard, list / regex / ``"all-linear"`` targets, ``layers_to_transform``) and
``_set_trainable`` (``modules_to_save``), run over the module paths of a Hugging Face-shaped
parameter tree — the names ``model.named_modules()`` yields in ``transformers``.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from jaxlora.config.lora import LoraConfig, LoraConfigError
from jaxlora.models.registry import default_targets
from jaxlora.weights.lora import LoRAWeight

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for llama, mistral, qwen2, qwen3,
# gemma2 and gemma3_text (Gemma names its modules as Llama does; each family's is
# jaxlora.models.registry.default_targets).
DEFAULT_TARGETS = ("q_proj", "v_proj")
# Families PEFT has no default for (it asks for target_modules): the presets to name instead.
NO_DEFAULT = {"qkv_proj": "phi3: [qkv_proj], [qkv_proj, o_proj], or all-linear"}
EMBEDDINGS = ("embed_tokens", "word_embeddings")  # Llama family, Falcon
HEAD = "lm_head"


class Modules:
    """The module paths of a parameter tree: ``all`` (every node, as ``named_modules`` lists
    them), ``linear`` (path -> ``[out, in]`` weight LoRA can wrap) and ``tied_head`` (the model
    has ``lm_head`` only as a view of ``embed_tokens``)."""

    def __init__(self, params: dict):
        flat = flatten_dict(params, sep=".")
        self.all: set[str] = set()
        self.linear: dict[str, Any] = {}
        for key, leaf in flat.items():
            module = key.rsplit(".", 1)[0] if "." in key else ""
            parts = module.split(".")
            self.all |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
            is_2d = key.endswith(".weight") and len(getattr(leaf, "shape", ())) == 2
            if is_2d and parts[-1] not in EMBEDDINGS:
                self.linear[module] = leaf
        self.tied_head = HEAD not in params and any(m.endswith(EMBEDDINGS) for m in self.all)
        if self.tied_head:
            self.all.add(HEAD)  # transformers still has the module; its weight is embed_tokens'

    def describe(self) -> str:
        names = sorted({p.rsplit(".", 1)[-1] for p in self.linear})
        example = next((p for p in sorted(self.linear) if re.search(r"\.\d+\.", p)), None)
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
    tm = cfg.target_modules
    if tm is None:
        tm = default_targets(linear or {key})
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
    tm = cfg.target_modules if cfg.target_modules is not None else default_targets(mods.linear)
    if cfg.target_modules is None:
        _check_default_applies(mods)
    if strict and isinstance(tm, tuple):
        for t in tm:
            if not any(m == t or m.endswith(f".{t}") for m in mods.all):
                raise LoraConfigError(
                    f"lora.target_modules: {t!r} matches no module; {mods.describe()}"
                )
    hits = sorted(m for m in mods.all if target_matches(cfg, m, set(mods.linear)))
    if not hits:
        raise LoraConfigError(
            f"lora.target_modules={tm!r} matches no module (after exclude_modules, "
            f"modules_to_save and layers_to_transform); {mods.describe()}"
        )
    for m in hits:
        if m == HEAD and mods.tied_head:
            raise LoraConfigError(
                "lora.target_modules: lm_head is tied to model.embed_tokens in this model; "
                "LoRA on a tied head is not supported (the adapter would also change the "
                "embedding lookup in transformers)"
            )
        if m not in mods.linear:
            kind = "an embedding" if m.rsplit(".", 1)[-1] in EMBEDDINGS else "not a linear layer"
            raise LoraConfigError(
                f"lora.target_modules matches {m!r}, which is {kind}; jaxlora puts LoRA "
                f"on linear layers only; {mods.describe()}"
            )
        if isinstance(mods.linear[m], LoRAWeight):
            raise LoraConfigError(
                f"{m} already holds a LoRA weight: merge it or start from the base"
            )
    saved = modules_to_save_paths(params, cfg)
    both = [m for m in hits if under(m, saved)]
    if both:
        raise LoraConfigError(
            f"lora: {both[:4]} would be both LoRA-wrapped and in modules_to_save "
            f"{list(cfg.modules_to_save)}; a module is either adapted or trained in full"
        )
    return {m: cfg.rank_alpha(m) for m in hits}


def _check_default_applies(mods: Modules) -> None:
    """PEFT refuses an unset ``target_modules`` for a family outside its default table (Phi-3):
    say so, with the family's presets, rather than report that ``q_proj`` matches nothing."""
    for name, presets in NO_DEFAULT.items():
        if any(m.endswith(f".{name}") for m in mods.linear):
            raise LoraConfigError(
                f"lora.target_modules is unset and this model has {name!r} (PEFT has no "
                f"default target_modules for it); choose one, e.g. {presets}"
            )


def under(module: str, roots: set[str]) -> bool:
    """Whether ``module`` is one of ``roots`` or inside one (``model.norm`` is under ``model``)."""
    return any(module == m or module.startswith(m + ".") for m in roots)


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
            raise LoraConfigError(
                f"lora.modules_to_save: {name!r} matches no module; {mods.describe()}"
            )
        for m in hits:
            if mods.tied_head and (m == HEAD or m.rsplit(".", 1)[-1] in EMBEDDINGS):
                raise LoraConfigError(
                    f"lora.modules_to_save: {m!r} is tied (lm_head = embed_tokens) in this "
                    "model; PEFT trains a separate copy for the lookup while the head keeps the "
                    "original, which jaxlora's single tied weight cannot represent"
                )
    saved = modules_to_save_paths(params, cfg)
    for key, leaf in flatten_dict(params, sep=".").items():
        module = key.rsplit(".", 1)[0]
        # an array, or its shape (jaxlora.lora.stacked matches on a tree of shapes)
        if under(module, saved) and not isinstance(
            leaf, jax.Array | np.ndarray | jax.ShapeDtypeStruct
        ):
            raise LoraConfigError(
                f"lora.modules_to_save: {key} is a {type(leaf).__name__}; only "
                "unquantized modules can be trained in full"
            )
