"""LoRA's configuration with PEFT's names, defaults and validation (``peft`` 0.21.2's ``LoraConfig``).

Kept apart from the weight type and tree functions in :mod:`jaxlora.lora`, which re-exports
everything here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from jaxlora.ops import FLOAT_DTYPES

BIAS_MODES = ("none", "all", "lora_only")
INITS = ("default", "random", "gaussian", "pissa", "loftq")  # + "pissa_niter_<K>"
DTYPES = FLOAT_DTYPES


class LoraError(ValueError):
    """Something about LoRA (its config, an adapter, a tree) that jaxlora refuses."""


class LoraConfigError(LoraError):
    """A :class:`LoraConfig` field holds a value that is not allowed; the message names it."""


def _bad(field: str, msg: str) -> LoraConfigError:
    return LoraConfigError(f"LoraConfig.{field}: {msg}")


def _positive(field: str, value: Any, *, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or value <= 0:
        raise _bad(field, f"must be a positive {'integer' if integer else 'number'}, got {value!r}")


def _check_regex(field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise _bad(field, f"{pattern!r} is not a valid regular expression ({e})") from None


def _names(field: str, value: Any) -> str | tuple[str, ...] | None:
    """A str (regex) stays a str; any list/tuple/set becomes a de-duplicated tuple of names."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list | tuple | set | frozenset):
        raise _bad(
            field, f"must be a string, a list of strings or None, got {type(value).__name__}"
        )
    items = sorted(value) if isinstance(value, set | frozenset) else list(value)
    if not all(isinstance(v, str) and v for v in items):
        raise _bad(field, f"every entry must be a non-empty string, got {items!r}")
    return tuple(dict.fromkeys(items))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters with PEFT's names (``alpha`` is ``lora_alpha``, ``dropout`` is
    ``lora_dropout``, ``init`` is ``init_lora_weights``) and PEFT 0.21.2's defaults.

    * ``target_modules``: ``None`` = PEFT's default for Llama/Mistral/Qwen2/Qwen3,
      ``("q_proj", "v_proj")``; a list matches a module path exactly or as a dotted suffix
      (``"self_attn.q_proj"``); a str is a regex ``re.fullmatch``-ed against the whole path
      (``"model.layers.0.self_attn.q_proj"``); ``"all-linear"`` is every linear except ``lm_head``.
    * ``exclude_modules``: same forms, removes matches from ``target_modules``.
    * ``bias``: which biases train: ``"none"``, ``"all"`` (every bias in the model) or
      ``"lora_only"`` (biases of LoRA-wrapped layers).
    * ``modules_to_save``: modules trained and saved in full; a name matches every module whose
      path ends with it (plain ``str.endswith``, as PEFT's ``_set_trainable``).
    * ``layers_to_transform`` (int or list) / ``layers_pattern``: keep only targets in these layer
      indices (list ``target_modules`` only, as in PEFT).
    * ``rank_pattern`` / ``alpha_pattern``: ``{regex: value}``; a key applies to a module when
      ``re.match(rf"(.*\\.)?({key})$", path)`` (PEFT's ``get_pattern_key``), first key wins.
    * ``init``: ``"default"`` (A ~ kaiming-uniform = U(±1/√in), B = 0), ``"random"`` (PEFT's
      ``init_lora_weights=False``: B ~ U(±1/√r) too, not a no-op; for tests), ``"gaussian"``
      (A ~ N(0, std=1/r), B = 0), ``"pissa"``, ``"pissa_niter_<K>"``, ``"loftq"``.
    * ``dtype``: jaxlora-only (not in adapter_config.json): dtype of A, B and the DoRA magnitude.
      PEFT keeps adapters in float32 (``autocast_adapter_dtype=True``), hence the default.
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    loftq_iters: int = 1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        _positive("r", self.r, integer=True)
        _positive("alpha", self.alpha)
        _positive("loftq_iters", self.loftq_iters, integer=True)
        for field in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, field), bool):
                raise _bad(field, f"must be true or false, got {getattr(self, field)!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise _bad("dropout", f"must be in [0, 1), got {self.dropout!r}")
        for field in ("target_modules", "exclude_modules"):
            value = _names(field, getattr(self, field))
            if isinstance(value, tuple):  # a set in PEFT: order carries no meaning
                value = tuple(sorted(value))
            if isinstance(value, str) and value.lower() != "all-linear":
                _check_regex(field, value)
            if value is not None and len(value) == 0:
                raise _bad(field, "must not be empty (None means PEFT's default)")
            if isinstance(value, tuple) and any(v.lower() == "all-linear" for v in value):
                raise _bad(field, "write 'all-linear' as a plain string, not inside a list")
            put(field, value)
        if self.bias not in BIAS_MODES:
            raise _bad("bias", f"must be one of {BIAS_MODES}, got {self.bias!r}")
        mts = _names("modules_to_save", self.modules_to_save or ())
        if isinstance(mts, str):
            raise _bad("modules_to_save", f"must be a list of module names, got the string {mts!r}")
        put("modules_to_save", mts)
        put("layers_to_transform", self._layers())
        lp = _names("layers_pattern", self.layers_pattern) or None
        put("layers_pattern", (lp,) if isinstance(lp, str) else lp)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise _bad("layers_to_transform", "cannot be used when target_modules is a str (PEFT)")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise _bad("layers_pattern", "needs layers_to_transform (PEFT)")
        for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
            pattern = dict(getattr(self, field) or {})
            for key, value in pattern.items():
                _check_regex(f"{field}[{key!r}]", key)
                _positive(f"{field}[{key!r}]", value, integer=integer)
            put(field, pattern)
        if self.init not in INITS and not _pissa_niter(self.init):
            raise _bad("init", f"must be one of {INITS} or 'pissa_niter_<K>', got {self.init!r}")
        if self.dtype not in DTYPES:
            raise _bad("dtype", f"must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    def _layers(self) -> int | tuple[int, ...] | None:
        lt = self.layers_to_transform
        if lt is None:
            return None
        values = [lt] if isinstance(lt, int) else list(lt)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise _bad(
                "layers_to_transform", f"must be an int or a non-empty list of ints, got {lt!r}"
            )
        if min(values) < 0:
            raise _bad("layers_to_transform", f"layer indices must be >= 0, got {lt!r}")
        return lt if isinstance(lt, int) else tuple(values)

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """``(r, alpha)`` for the module at ``path`` after ``rank_pattern`` / ``alpha_pattern``."""
        return (
            _pattern_value(self.rank_pattern, path, self.r),
            _pattern_value(self.alpha_pattern, path, self.alpha),
        )

    def scale(self, path: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for the module at ``path``."""
        r, alpha = self.rank_alpha(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """This config as PEFT 0.21.2's ``adapter_config.json`` (same keys PEFT writes)."""
        from jaxlora.peft_io import config_to_peft

        return config_to_peft(self, base_model_name_or_path)

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        """Parse an ``adapter_config.json`` dict; refuses PEFT features jaxlora does not implement."""
        from jaxlora.peft_io import config_from_peft

        return config_from_peft(d)


def from_recipe(section: Any) -> LoraConfig:
    """The :class:`LoraConfig` for a recipe's ``lora:`` section (``jaxlora.config.LoraConfig``,
    same field names); a field this module does not know is an error, not dropped."""
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    unknown = sorted(set(values) - ours)
    if unknown:
        raise LoraConfigError(f"lora: recipe field(s) {unknown} have no LoraConfig counterpart")
    return LoraConfig(**values)


def to_meta(cfg: LoraConfig) -> dict[str, Any]:
    """``cfg`` as JSON-ready plain data (tuples become lists), e.g. for checkpoint metadata."""
    plain = lambda v: list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _pissa_niter(init: str) -> bool:
    return isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init) is not None


def _pattern_value(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    # peft.utils.other.get_pattern_key: the first key that matches as a dotted suffix regex.
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return pattern[key]
    return default
