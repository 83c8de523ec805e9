"""Several named adapters on one frozen base: PEFT's multi-adapter model, as a value.

PEFT keeps every adapter's A and B beside one base layer and switches which one runs
(``PeftModel.load_adapter(path, adapter_name)``, ``set_adapter``, ``disable_adapter``,
``delete_adapter``; peft 0.21.2 ``peft_model.py``, ``tuners/tuners_utils.py``). Here an adapter
is an *overlay*: the leaves it puts over the base tree — at each module it targets a
:class:`~jaxlora.weights.LoRAWeight` whose ``base`` is the base tree's own array, and its own
copy of each ``modules_to_save`` module (PEFT's ``ModulesToSaveWrapper`` keeps one per adapter
too). The tree a model runs is the base with the active adapter's overlay, so every base array
is held once, however many adapters there are.

An adapter that changes the base itself cannot be one of several, since the others would run
on its base (PEFT overwrites the shared base in place for them): trained biases (``bias`` other
than ``"none"``), PiSSA (its base is the residual ``W − top_r(W)``), embedding layers saved
outside ``modules_to_save``. Those are refused when loaded by name; load such an adapter alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from flax.traverse_util import flatten_dict, unflatten_dict

from jaxlora.config.lora import LoraConfig, LoraError
from jaxlora.interop import peft
from jaxlora.lora import targets as lora_targets
from jaxlora.weights.lora import LoRAWeight

log = logging.getLogger(__name__)


class AdapterError(LoraError):
    """A named-adapter call that cannot be honoured (unknown name, a name already used, an
    adapter that changes the shared base); the model it was called on is unchanged."""


@dataclasses.dataclass(frozen=True, eq=False)
class Adapter:
    """One named adapter: its config, what it puts over the base (dotted parameter path ->
    leaf) and the tokenizer saved beside it (a jaxlora run's carries its prompt format as the
    chat template), if any."""

    config: LoraConfig
    overlay: Mapping[str, Any]
    tokenizer: Any = None


def read_adapter(base: dict, directory: str | Path, tokenizer: Any = None) -> Adapter:
    """The PEFT adapter in ``directory`` as an overlay of ``base`` (a tree without LoRA).

    Loading checks it against ``base`` as :func:`jaxlora.interop.peft.load_adapter` does (a
    shape or module that does not fit is refused there); an adapter that would change a base
    leaf rather than add beside it is refused here, naming the leaves.
    """
    params, cfg = peft.load_adapter(base, directory)
    flat_base = flatten_dict(base, sep=".")
    overlay = {k: v for k, v in flatten_dict(params, sep=".").items() if v is not flat_base.get(k)}
    saved = lora_targets.modules_to_save_paths(base, cfg)
    changed = sorted(
        k
        for k, v in overlay.items()
        if not (isinstance(v, LoRAWeight) and v.base is flat_base[k])
        and not lora_targets.under(k.rsplit(".", 1)[0], saved)
    )
    if changed:
        raise AdapterError(
            f"{directory}: the adapter changes the base itself at {changed[:4]} (trained biases, "
            "PiSSA's residual base or saved embedding layers), so it cannot share the base with "
            "other adapters; load it alone (load_adapter without a name) or merge it"
        )
    return Adapter(cfg, MappingProxyType(overlay), tokenizer)


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterSet:
    """A frozen base tree, the adapters loaded over it by name (in load order) and the active
    one (``None``: the base alone). Its verbs return a new set."""

    base: dict
    base_tokenizer: Any
    named: Mapping[str, Adapter]
    active: str | None

    @classmethod
    def over(cls, base: dict, tokenizer: Any) -> AdapterSet:
        return cls(base, tokenizer, MappingProxyType({}), None)

    def get(self, name: str) -> Adapter:
        if name not in self.named:
            raise AdapterError(f"no adapter named {name!r}; loaded: {list(self.named)}")
        return self.named[name]

    def add(self, name: str, adapter: Adapter) -> AdapterSet:
        """With ``adapter`` as ``name``; the first one added becomes active (as PEFT's
        ``from_pretrained``), later ones wait for :meth:`activate` (as ``load_adapter``)."""
        check_name(name, self.named)
        named = MappingProxyType({**self.named, name: adapter})
        return dataclasses.replace(self, named=named, active=self.active if self.named else name)

    def activate(self, name: str | None) -> AdapterSet:
        if name is not None:
            self.get(name)
        return dataclasses.replace(self, active=name)

    def remove(self, name: str) -> AdapterSet:
        """Without ``name``. Deleting the active adapter activates the first one left, as
        PEFT's ``delete_adapter`` does (with the same warning)."""
        self.get(name)
        named = MappingProxyType({k: v for k, v in self.named.items() if k != name})
        active = self.active
        if active == name:
            active = next(iter(named), None)
            if active is not None:
                log.warning("adapter %r was active and is deleted; %r is active now", name, active)
        return dataclasses.replace(self, named=named, active=active)

    def config(self) -> LoraConfig | None:
        """The active adapter's config (``None``: the base alone)."""
        return None if self.active is None else self.named[self.active].config

    def tokenizer(self) -> Any:
        """The active adapter's tokenizer, or the base's when it brought none."""
        own = None if self.active is None else self.named[self.active].tokenizer
        return self.base_tokenizer if own is None else own

    def params(self) -> dict:
        """The tree the model runs: the base with the active adapter's overlay."""
        if self.active is None:
            return self.base
        flat = flatten_dict(self.base, sep=".") | dict(self.named[self.active].overlay)
        return unflatten_dict(flat, sep=".")


def check_name(name: Any, named: Mapping[str, Adapter]) -> None:
    """A new adapter's name must be a non-empty string not yet in ``named``."""
    if not isinstance(name, str) or not name:
        raise AdapterError(f"an adapter name is a non-empty string; got {name!r}")
    if name in named:
        raise AdapterError(
            f"an adapter named {name!r} is already loaded (loaded: {list(named)}); "
            "delete_adapter it first or choose another name"
        )
