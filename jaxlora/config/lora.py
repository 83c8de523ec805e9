"""LoRA's configuration with PEFT's names, defaults and validation (peft 0.21.2's ``LoraConfig``).

One class serves the library (``jaxlora.lora.LoraConfig(r=16, ...)``) and the recipes (the
``lora:`` section of a YAML recipe, ``lora.r=32`` on the command line): the same fields, the same
checks, and errors that name the field as a recipe key (``lora.r: must be > 0; got 0``). Kept
apart from the weight type (:mod:`jaxlora.weights.lora`) and the tree functions
(:mod:`jaxlora.lora`), which re-exports what users need from here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, get_args

from jaxlora.config.typed import GE1, GT0, ConfigError, Section, check, check_regex

# LoftQ quantizes its targets as PEFT's LoftQ does (bitsandbytes NF4, blocks of 64, double
# quant); a run with lora.init=loftq needs its quant section to say the same.
LOFTQ_QUANT = {"quant_type": "nf4", "blocksize": 64, "double_quant": True}

BiasMode = Literal["none", "all", "lora_only"]
BIAS_MODES = get_args(BiasMode)
INITS = ("default", "random", "gaussian", "pissa", "loftq")  # + "pissa_niter_<K>"


class LoraError(ValueError):
    """Something about LoRA (its config, an adapter, a tree) that jaxlora refuses."""


class LoraConfigError(LoraError, ConfigError):
    """A :class:`LoraConfig` field holds a value that is not allowed; the message names it as
    its recipe key (``lora.<field>``). A :class:`ConfigError` too, so the CLI reports it as one."""


def _names(value: Any) -> Any:
    """PEFT takes sets for the name lists; order carries no meaning there, so sort them."""
    return tuple(sorted(value)) if isinstance(value, set | frozenset) else value


@dataclasses.dataclass(frozen=True)
class LoraConfig(Section):
    """LoRA hyper-parameters with PEFT's names (``alpha`` is ``lora_alpha``, ``dropout`` is
    ``lora_dropout``, ``init`` is ``init_lora_weights``) and PEFT 0.21.2's defaults.

    * ``target_modules``: ``None`` = PEFT's default for the model's family,
      ``("q_proj", "v_proj")`` for Llama/Mistral/Qwen2/Qwen3 and ``("query_key_value",)`` for
      Falcon (``jaxlora.models.registry.default_targets``); a list matches a module path
      exactly or as a dotted suffix (``"self_attn.q_proj"``); a str is a regex
      ``re.fullmatch``-ed against the whole path (``"model.layers.0.self_attn.q_proj"``);
      ``"all-linear"`` is every linear except ``lm_head``.
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
    * ``loraplus_lr_ratio``: jaxlora-only, an optimizer setting as PEFT's
      ``create_loraplus_optimizer(loraplus_lr_ratio=...)``: LoRA B (and 1-D parameters) train
      at this many times ``train.lr`` (LoRA+, arXiv:2402.12354; the paper suggests 2-16).

    Lists may be given as lists, tuples or (names only) sets; they are stored as tuples.
    """

    _prefix: ClassVar[str] = "lora."
    _ranges: ClassVar = {
        "r": GT0,
        "alpha": GT0,
        "loftq_iters": GE1,
        "loraplus_lr_ratio": GT0,
        "dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    }

    r: int = 8
    alpha: int | float = 8
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    bias: BiasMode = "none"
    modules_to_save: tuple[str, ...] = ()
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    loftq_iters: int = 1
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    loraplus_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            object.__setattr__(self, name, _names(getattr(self, name)))
        for name in ("rank_pattern", "alpha_pattern"):  # any mapping -> a plain dict
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, dict(value))
        try:
            super().__post_init__()
        except LoraConfigError:
            raise
        except ConfigError as e:  # type and range errors from the Section machinery
            raise LoraConfigError(str(e)) from None

    def _validate(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            key = self._prefix + name
            if isinstance(value, tuple):  # a set in PEFT: order carries no meaning
                check(len(value) > 0, key, "must not be empty (null means PEFT's default)")
                check(all(value), key, f"every entry must be a non-empty string; got {list(value)}")
                check(
                    not any(v.lower() == "all-linear" for v in value),
                    key,
                    'write "all-linear" as a plain string, not inside a list',
                )
                put(name, tuple(sorted(dict.fromkeys(value))))
            elif isinstance(value, str):
                check(value != "", key, "must not be empty (null means PEFT's default)")
                if value.lower() != "all-linear":
                    check_regex(value, key)
        check(
            all(self.modules_to_save),
            "lora.modules_to_save",
            f"every entry must be a non-empty string; got {list(self.modules_to_save)}",
        )
        put("modules_to_save", tuple(dict.fromkeys(self.modules_to_save)))
        lt = self.layers_to_transform
        if lt is not None:
            values = [lt] if isinstance(lt, int) else list(lt)
            check(
                len(values) > 0 and min(values) >= 0,
                "lora.layers_to_transform",
                f"must be null, a layer index >= 0 or a non-empty list of them; got {lt!r}",
            )
        if isinstance(self.layers_pattern, str):
            put("layers_pattern", (self.layers_pattern,))
        if isinstance(self.target_modules, str) and lt is not None:
            check(
                False,
                "lora.layers_to_transform",
                "cannot be used when target_modules is a str (PEFT)",
            )
        if self.layers_pattern is not None and lt is None:
            check(False, "lora.layers_pattern", "needs layers_to_transform (PEFT)")
        for name, pattern in (
            ("rank_pattern", self.rank_pattern),
            ("alpha_pattern", self.alpha_pattern),
        ):
            for regex, value in pattern.items():
                check_regex(regex, f"lora.{name}.{regex}")
                check(value > 0, f"lora.{name}.{regex}", f"must be > 0; got {value}")
        check(
            self.init in INITS or _pissa_niter(self.init),
            "lora.init",
            f"must be one of {', '.join(INITS)} or pissa_niter_<K>; got {self.init!r}",
        )

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
