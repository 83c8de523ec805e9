"""LoRA with PEFT's semantics, as pure functions of parameter trees.

Names, defaults and matching rules follow ``peft`` 0.21.2 (``peft/tuners/lora/{config,layer,
dora}.py``, ``peft/tuners/tuners_utils.py``), so an adapter moves between jaxlora and PEFT
unchanged. The vocabulary is lorax/levanter's: :func:`inject` wraps targeted weights in
:class:`~jaxlora.weights.LoRAWeight` (the model's ``dense`` dispatch does the rest),
:func:`partition`/:func:`combine` split the tree into frozen and trainable halves (gradients and
optimizer state exist only for the latter), :func:`merge`/:func:`unmerge` fold the adapter into
the base and back. Which modules are targeted is :mod:`jaxlora.lora.targets`; how A and B start
is :mod:`jaxlora.lora.init`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxlora.config.lora import LoraConfig
from jaxlora.lora import init as lora_init
from jaxlora.lora import stacked as lora_stacked
from jaxlora.lora import targets as lora_targets
from jaxlora.models.stacking import stacked_runs
from jaxlora.weights.lora import LoRAWeight

# ---- tree functions -----------------------------------------------------------------------------


def _map(tree: dict, fn) -> dict:
    """Rebuild a nested dict, calling ``fn("dotted.path", leaf)`` on every non-dict value."""
    flat = flatten_dict(tree, sep=".")
    return unflatten_dict({k: fn(k, v) for k, v in flat.items()}, sep=".")


def inject(params: dict, cfg: LoraConfig, key: jax.Array) -> dict:
    """Wrap every weight ``cfg`` targets in a :class:`LoRAWeight`; everything else is unchanged.

    ``params`` is the Hugging Face-shaped tree (arrays or ``NF4Tensor`` weights), or one with
    its layers stacked for scan, which gets the same LoRA weights stacked
    (:mod:`jaxlora.lora.stacked`). Matching, ranks, scales and the initial A, B (and, for
    PiSSA/LoftQ, the new base) come from :mod:`jaxlora.lora.targets` and
    :mod:`jaxlora.lora.init`. Raises :class:`LoraConfigError` for a target that matches
    nothing (listing the modules there are) or a module LoRA cannot wrap.
    """
    if stacked_runs(params) is not None:
        return lora_stacked.inject(params, cfg, key)
    targets = lora_targets.resolve_targets(params, cfg, strict=True)
    lora_targets.check_modules_to_save(params, cfg)
    keys = lora_init.module_keys(targets, key)

    def wrap(path: str, leaf: Any) -> Any:
        module, name = path.rsplit(".", 1)
        if name != "weight" or module not in targets:
            return leaf
        return lora_init.wrap(cfg, module, leaf, targets[module][0], keys[module])

    return _map(params, wrap)


def _is_trainable_leaf(path: str, leaf: Any, lora_modules: set[str], saved: set[str], bias: str):
    module, name = path.rsplit(".", 1) if "." in path else ("", path)
    if lora_targets.under(module, saved):
        return True
    if name == "bias":
        return bias == "all" or (bias == "lora_only" and module in lora_modules)
    return False


def partition(params: dict, cfg: LoraConfig) -> tuple[dict, dict]:
    """``params -> (frozen, trainable)``, two trees of the same shape with ``None`` holes.

    Trainable: every LoRA ``a``, ``b`` and DoRA ``magnitude``; biases per ``cfg.bias``; every
    leaf of a ``modules_to_save`` module. A LoRA weight splits into a half with only ``base``
    and a half with only ``a``/``b``/``magnitude``. ``None`` is an empty pytree, so
    ``jax.grad``/optax over ``trainable`` see exactly the trainable arrays. A tree with its
    layers stacked for scan splits as its Hugging Face tree would, stacked.
    """
    flat = flatten_dict(params, sep=".")
    lora_modules = {p.rsplit(".", 1)[0] for p, v in flat.items() if isinstance(v, LoRAWeight)}
    if stacked_runs(params) is not None:
        saved = lora_stacked.saved_paths(params, cfg)
    else:
        saved = lora_targets.modules_to_save_paths(params, cfg)

    def split(path: str, leaf: Any, want_trainable: bool) -> Any:
        if isinstance(leaf, LoRAWeight):
            if want_trainable:
                return leaf.replace(base=None)
            return leaf.replace(a=None, b=None, magnitude=None)
        trainable = _is_trainable_leaf(path, leaf, lora_modules, saved, cfg.bias)
        return leaf if trainable == want_trainable else None

    frozen = _map(params, lambda p, v: split(p, v, False))
    trainable = _map(params, lambda p, v: split(p, v, True))
    return frozen, trainable


def combine(frozen: dict, trainable: dict) -> dict:
    """Inverse of :func:`partition`: fill each tree's ``None`` holes from the other."""

    def join(f: Any, t: Any, path: str) -> Any:
        if isinstance(f, dict) and isinstance(t, dict):
            if f.keys() != t.keys():
                raise ValueError(f"combine: keys differ under {path or '<root>'!r}")
            return {k: join(f[k], t[k], f"{path}{k}.") for k in f}
        if isinstance(f, LoRAWeight) and isinstance(t, LoRAWeight):
            return f.replace(a=t.a, b=t.b, magnitude=t.magnitude)
        if f is None:
            return t
        if t is None:
            return f
        raise ValueError(f"combine: {path.rstrip('.')!r} is set in both trees")

    return join(frozen, trainable, "")


def merge(params: dict, *, dtype: Any = None) -> dict:
    """Fold every :class:`LoRAWeight` into a plain ``[out, in]`` array (see ``LoRAWeight.merged``).

    The sum is taken in float32 (PEFT's ``merge_and_unload`` adds the float32 delta in place).
    An NF4 base is dequantized and the merged weight returned dense: requantizing ``W + s·B·A``
    to 4 bits would lose most of the update, so merging never writes back into NF4.
    """
    return _map(params, lambda p, v: v.merged(dtype) if isinstance(v, LoRAWeight) else v)


def unmerge(merged: dict, adapters: dict) -> dict:
    """Inverse of :func:`merge` for plain-array bases: ``W₀ = W − s·B·A`` (in float32).

    ``adapters`` holds the :class:`LoRAWeight` leaves to take out (the pre-merge params, or the
    trainable half from :func:`partition`). DoRA cannot be unmerged without the pre-merge norm
    ``‖W₀ + s·B·A‖``, which the merged weight no longer determines (PEFT caches it), so it raises.
    """
    lora = {p: v for p, v in flatten_dict(adapters, sep=".").items() if isinstance(v, LoRAWeight)}
    flat = flatten_dict(merged, sep=".")
    missing = sorted(set(lora) - set(flat))
    if missing:
        raise ValueError(f"unmerge: merged params have no weight at {missing[:4]}")

    def restore(path: str, leaf: Any) -> Any:
        if path not in lora:
            return leaf
        lw = lora[path]
        if lw.use_dora:
            raise ValueError(f"unmerge: {path} is DoRA; its merge cannot be inverted")
        if not isinstance(leaf, jax.Array | np.ndarray):
            raise ValueError(f"unmerge: {path} is a {type(leaf).__name__}, not a merged array")
        delta = lw.scale * (lw.b.astype(jnp.float32) @ lw.a.astype(jnp.float32))
        base = (jnp.asarray(leaf, jnp.float32) - delta).astype(leaf.dtype)
        return lw.replace(base=base)

    return _map(merged, restore)
