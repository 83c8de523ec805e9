"""LoRA on a tree whose layers are stacked for scan (:mod:`jaxlora.models.stacking`), without
unstacking its base: ``inject(stack_layers(P, runs)) == stack_layers(inject(P), runs)``, leaf
for leaf and bit for bit, and :func:`saved_paths` gives ``partition`` the same halves stacked.

What LoRA does is decided on the Hugging Face view of the tree: its shapes with the layers
unstacked (nothing is copied). So matching, ranks and errors are those of the unstacked tree,
and each layer's A and B come from the same key and the same draws; they are then stacked like
the base. An init that reads the weight (PiSSA, LoftQ, DoRA's magnitude) reads one layer at a
time. A run whose layers LoRA treats differently (one targeted, the next not; another rank) cannot
be one array: that is an error naming the run, since its stacking was planned for another LoRA
config (``jaxlora.training.run.plan_runs`` plans the runs of the LoRA-wrapped tree).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxlora.config.lora import LoraConfig, LoraConfigError
from jaxlora.lora import init as lora_init
from jaxlora.lora import targets as lora_targets
from jaxlora.models import stacking


def hf_view(params: dict) -> dict:
    """``params``' shapes (``ShapeDtypeStruct`` leaves) with the layers unstacked: the Hugging
    Face-shaped tree LoRA matches against, for the price of its metadata."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    return stacking.unstack_layers(shapes)


def inject(params: dict, cfg: LoraConfig, key: jax.Array) -> dict:
    """:func:`jaxlora.lora.inject` for a tree with stacked layers (see the module docstring)."""
    view = hf_view(params)
    targets = lora_targets.resolve_targets(view, cfg, strict=True)
    lora_targets.check_modules_to_save(view, cfg)
    keys = lora_init.module_keys(targets, key)
    view_flat = flatten_dict(view, sep=".")

    def wrap(path: str, leaf: Any) -> Any:
        module, name = path.rsplit(".", 1)
        if name != "weight":
            return leaf
        layers = stacking.run_layer_paths(module.split("."))
        if layers is None:
            if module not in targets:
                return leaf
            return lora_init.wrap(cfg, module, leaf, targets[module][0], keys[module])
        modules = [".".join(p) for p in layers]
        hit = [m in targets for m in modules]
        if not any(hit):
            return leaf
        if not all(hit):
            _mixed_run(module, modules, hit, "LoRA targets")
        per_layer = [
            lora_init.wrap(
                cfg,
                m,
                _slot(leaf, j) if lora_init.reads_weight(cfg) else view_flat[f"{m}.weight"],
                targets[m][0],
                keys[m],
            )
            for j, m in enumerate(modules)
        ]
        kinds = {(w.rank, w._aux()) for w in per_layer}
        if len(kinds) != 1:
            raise LoraConfigError(
                f"{module}: the layers of this stacked run get different LoRA (rank, scale, "
                f"dropout, DoRA: {sorted(kinds)}); stack the runs planned for this LoRA config"
            )
        changed = lora_init.changes_base(cfg)
        stack = lambda name: stacking.stack([getattr(w, name) for w in per_layer])
        return per_layer[0].replace(
            base=stack("base") if changed else leaf,
            a=stack("a"),
            b=stack("b"),
            magnitude=stack("magnitude") if cfg.use_dora else None,
        )

    flat = flatten_dict(params, sep=".")
    return unflatten_dict({k: wrap(k, v) for k, v in flat.items()}, sep=".")


def saved_paths(params: dict, cfg: LoraConfig) -> set[str]:
    """The ``modules_to_save`` paths of a stacked tree: matched on its Hugging Face view, a
    layer's module named by its run's path; a run saved for some layers only is an error."""
    saved = lora_targets.modules_to_save_paths(hf_view(params), cfg)
    runs = stacking.stacked_runs(params)
    out = set()
    for m in saved:
        at = stacking.layer_slot(m.split("."), runs)
        out.add(m if at is None else ".".join(at[0]))
    for s in out:
        layers = stacking.run_layer_paths(s.split("."))
        if layers is not None:
            modules = [".".join(p) for p in layers]
            hit = [m in saved for m in modules]
            if not all(hit):
                _mixed_run(s, modules, hit, "modules_to_save names")
    return out


def _slot(leaf: Any, j: int) -> Any:
    return jax.tree.map(lambda x: x[j], leaf)


def _mixed_run(module: str, modules: list[str], hit: list[bool], what: str):
    yes = [m for m, h in zip(modules, hit, strict=True) if h]
    no = [m for m, h in zip(modules, hit, strict=True) if not h]
    raise LoraConfigError(
        f"{module}: {what} {yes[:3]} but not {no[:3]} of this stacked run; stack the runs "
        "planned for this LoRA config (they split where LoRA differs)"
    )
