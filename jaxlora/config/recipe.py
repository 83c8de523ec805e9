"""Typed run configuration: YAML recipes + ``a.b=c`` overrides -> frozen dataclasses.

``python -m jaxlora.train recipe=<name|path.yaml> key.sub=value ...`` becomes::

    cfg = load_config("llama_qlora", ["lora.r=32", "train.lr=1e-4"])

A recipe *name* is looked up in the repository's ``recipes/`` directory (next to the ``jaxlora``
package in a checkout or editable install; shipped as the ``jaxlora.recipes`` package data in a
wheel). Anything ending in ``.yaml``/``.yml`` or
containing a path separator is a path to any YAML file. A recipe may say ``base: <name|path>``
to start from another recipe (a relative path is taken from the including file's directory);
its own keys then override the base's, and mappings (``mesh.rules``, ``lora.rank_pattern``)
are merged key by key.

Override values are parsed as YAML (``8`` int, ``2e-4`` float, ``true``, ``null``,
``[q_proj,v_proj]``). Keys below a mapping-valued field keep their dots:
``lora.rank_pattern.model.layers.0.q_proj=8`` adds the pattern ``model.layers.0.q_proj``; the
field named whole replaces the recipe's mapping (``lora.rank_pattern={}`` clears it).
Relative local paths (``model.path``, ``data.path``, ``output_dir``) are relative to the
current directory. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the key (and the nearest valid key, or the allowed values).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, get_args

import yaml

from jaxlora.config.lora import LOFTQ_QUANT, LoraConfig
from jaxlora.config.typed import (
    GE0,
    GE1,
    GT0,
    SEED,
    UNIT,
    ConfigError,
    Dumper,
    Section,
    build,
    check,
    merge,
    parse_override,
    read_yaml,
    to_plain,
    unknown_key_message,
)
from jaxlora.config.typed import fields as schema

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "LoraConfig",
    "MeshConfig",
    "ModelConfig",
    "QuantConfig",
    "SourceConfig",
    "TrainConfig",
    "config_from_argv",
    "load_config",
    "print_config",
    "save_config",
    "to_yaml",
]


def _recipes_dir() -> Path:
    # A checkout (or editable install) has recipes/ beside the package; a wheel ships the same
    # files as the jaxlora.recipes package data (see pyproject.toml).
    package = Path(__file__).resolve().parents[1]  # jaxlora/
    beside = package.parent / "recipes"
    if beside.is_dir():
        return beside
    return package / "recipes"


RECIPES_DIR = _recipes_dir()
LOGICAL_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "lora_rank")
MESH_AXES = ("data", "fsdp", "tensor")
BNB_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept
# data.chat_template's names: the families' official templates (jaxlora.data.templates).
CHAT_TEMPLATES = ("llama3", "chatml", "mistral", "gemma", "phi3", "alpaca")

Dtype = Literal["float32", "bfloat16"]
# float16 computes (GPUs without bf16: T4, V100) with dynamic loss scaling (train.loss_scale_*);
# trainable parameters and the optimizer stay float32.
ComputeDtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelConfig(Section):
    """The base model: ``dtype`` stores unquantized base weights, ``compute_dtype`` activations."""

    _prefix: ClassVar[str] = "model."
    path: str  # a local Hugging Face directory or a hub id (e.g. meta-llama/Llama-3.1-8B)
    dtype: Dtype = "bfloat16"
    compute_dtype: ComputeDtype = "bfloat16"
    revision: str | None = None  # hub revision (branch, tag or commit)
    tokenizer: str | None = None  # tokenizer dir or hub id; None = model.path
    # Scan the decoder layers over stacked parameters in the train step (compiles one layer per
    # run of alike layers instead of every layer): auto = on for TPU/GPU meshes (and plan), off
    # on CPU, where compiling is fast and the unrolled step is as fast (docs/planning.md).
    scan_layers: bool | Literal["auto"] = "auto"

    def _validate(self) -> None:
        check(self.path != "", "model.path", "must be a local directory or a hub id, got ''")


@dataclass(frozen=True)
class QuantConfig(Section):
    """Base-weight quantization, as bitsandbytes' ``bnb_4bit_*`` options."""

    _prefix: ClassVar[str] = "quant."
    type: Literal["none", "nf4", "fp4"] = "none"
    blocksize: int = 64
    double_quant: bool = True
    # dtype the dequantized weight is multiplied in (bnb_4bit_compute_dtype); None = the
    # activations' (model.compute_dtype)
    compute_dtype: ComputeDtype | None = None
    # The 4-bit matmul: auto = the Mosaic kernel on TPU, dequantize-then-dot elsewhere (on a
    # GPU measured faster than the Triton kernel: docs/kernels.md); fused = the platform's
    # Pallas kernel (Mosaic on TPU, Triton on sm_80+ GPUs); dequant = never a kernel;
    # interpret = the kernels in Pallas interpret mode on any device (slow: debugging).
    kernel: Literal["auto", "fused", "dequant", "interpret"] = "auto"

    def _validate(self) -> None:
        check(
            self.blocksize in BNB_BLOCKSIZES,
            "quant.blocksize",
            f"must be one of {', '.join(map(str, BNB_BLOCKSIZES))}; got {self.blocksize}",
        )


@dataclass(frozen=True)
class SourceConfig(Section):
    """One source of a ``data.sources`` mixture: where its records are, how they read, and its
    weight (the chance that the next example comes from it is ``weight / sum of weights``).
    Every key left out (null) takes the ``data.`` key of the same name."""

    _ranges: ClassVar = {"weight": GT0, "max_examples": GT0}
    path: str  # a file, a directory of them, or a hub dataset id, as data.path
    weight: float
    format: str | None = None  # one of data.format's choices
    split: str | None = None
    subset: str | None = None
    max_examples: int | None = None
    instruction_field: str | None = None
    input_field: str | None = None
    output_field: str | None = None
    text_field: str | None = None
    messages_field: str | None = None
    conversations_field: str | None = None
    role_field: str | None = None
    content_field: str | None = None

    def _validate(self) -> None:
        check(self.path != "", "path", "must be a file, a directory or a hub dataset id")
        formats = get_args(schema(DataConfig)["format"])
        check(
            self.format is None or self.format in formats,
            "format",
            f"must be one of {', '.join(formats)} (or left out for data.format); "
            f"got {self.format!r}",
        )


@dataclass(frozen=True)
class DataConfig(Section):
    """Where the examples come from and how they become token rows (see ``jaxlora.data``)."""

    _prefix: ClassVar[str] = "data."
    _ranges: ClassVar = {
        "max_seq_len": (lambda v: v >= 2, ">= 2"),
        "max_examples": GT0,
        "shuffle_buffer": GE0,
        "shuffle_seed": SEED,
    }
    # a .json/.jsonl/.csv/.parquet file, a directory of them, or a hub dataset id (null: sources)
    path: str | None = None
    format: Literal["alpaca", "chat", "sharegpt", "text"] = "alpaca"
    split: str = "train"
    subset: str | None = None  # hub dataset configuration name
    max_seq_len: int = 512
    packing: bool = True
    train_on_inputs: bool = False
    val_size: int | float = 0.05  # a fraction in (0, 1) or a count (0 = no validation set)
    # Held-out records in the same format (a local file or directory). When set they are the
    # validation set (eval loss, exact match) and val_size must be 0.
    eval_path: str | None = None
    shuffle_seed: int | None = None  # None = train.seed
    max_examples: int | None = None  # use only the first N records (None = all)
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    text_field: str = "text"
    messages_field: str = "messages"
    # ShareGPT records: {conversations: [{from: human|gpt|system, value}, ...]} (jaxlora.data.
    # conversations); sharegpt_roles adds to or overrides the standard role names' mapping.
    conversations_field: str = "conversations"
    role_field: str = "from"
    content_field: str = "value"
    sharegpt_roles: dict[str, Literal["system", "user", "assistant", "tool"]] = field(
        default_factory=dict
    )
    # The chat template chat/sharegpt data is rendered with, and every export carries: a name in
    # CHAT_TEMPLATES or a Jinja file; None = the tokenizer's own.
    chat_template: str | None = None
    # Read the records as they are needed (a datasets IterableDataset: no download first);
    # tokenized and packed on the fly (jaxlora.data.streams).
    streaming: bool = False
    shuffle_buffer: int = 1000  # streams and mixtures: records in datasets' shuffle buffer
    sources: tuple[SourceConfig, ...] = ()  # a weighted mixture instead of data.path

    def _validate(self) -> None:
        check(self.path != "", "data.path", "must be a file, a directory or a hub dataset id")
        check(
            (self.path is None) != (not self.sources),
            "data.path",
            f"give data.path or data.sources, not both; got {self.path!r} and "
            f"{len(self.sources)} sources (data.path=null clears a recipe's path)"
            if self.sources
            else "required: a file, a directory or a hub dataset id (or give data.sources)",
        )
        v = self.val_size
        ok = 0 < v < 1 if isinstance(v, float) else v >= 0
        check(ok, "data.val_size", f"must be a fraction in (0, 1) or a count >= 0; got {v}")
        check(
            self.eval_path is None or v == 0,
            "data.val_size",
            f"must be 0 when data.eval_path gives the validation set; got {v}",
        )
        check(
            not self.is_stream or not isinstance(v, float),
            "data.val_size",
            f"a fraction ({v}) needs the dataset's length, which a stream or a mixture does not "
            "have; give a count (data.val_size=500 holds out the first 500 records"
            f"{' of each source' if self.sources else ''}), data.eval_path, or 0",
        )
        self._validate_chat_template()

    @property
    def is_stream(self) -> bool:
        """Examples are drawn on the fly (streamed, or from a mixture), not built up front."""
        return self.streaming or bool(self.sources)

    def _validate_chat_template(self) -> None:
        t = self.chat_template
        if t is None:
            return
        formats = {self.format} | {s.format for s in self.sources if s.format is not None}
        check(
            bool(formats & {"chat", "sharegpt"}),
            "data.chat_template",
            f"renders conversations: it needs data.format chat or sharegpt, not {self.format} "
            "(or a data.sources entry in one of them)",
        )
        check(
            t in CHAT_TEMPLATES or "/" in t or Path(t).suffix != "",
            "data.chat_template",
            f"{t!r} is neither a named template ({', '.join(CHAT_TEMPLATES)}) nor a path to a "
            "Jinja file",
        )


@dataclass(frozen=True)
class TrainConfig(Section):
    """Optimisation and the loop's cadence. Steps are optimizer steps; ``*_every = 0`` turns off."""

    _prefix: ClassVar[str] = "train."
    _ranges: ClassVar = {
        **dict.fromkeys(
            ["batch_size", "grad_accum", "epochs", "log_every", "keep_checkpoints"], GE1
        ),
        **dict.fromkeys(
            [
                "eval_every",
                "save_every",
                "sample_every",
                "weight_decay",
                "exact_match_examples",
                "loss_chunk",
                "mlp_chunk",
            ],
            GE0,
        ),
        **dict.fromkeys(["adam_beta1", "adam_beta2"], UNIT),
        "max_steps": (lambda v: v == -1 or v > 0, "> 0, or -1 to use train.epochs"),
        "lr": GT0,
        "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "max_grad_norm": GE0,
        "adam_eps": GT0,
        "sample_max_new_tokens": GE1,
        "sgd_momentum": UNIT,
        "optimizer_8bit_min_size": GE0,
        "seed": SEED,
        "modules_to_save_lr": GT0,
        "loss_scale_init": (lambda v: v >= 1, ">= 1"),
        "loss_scale_growth_interval": GE1,
    }
    batch_size: int = 8  # rows (of data.max_seq_len tokens) per micro-batch, global
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = -1  # -1 = run train.epochs epochs
    epochs: int = 1
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    optimizer: Literal["adamw", "adamw_8bit", "adafactor", "lion", "sgd"] = "adamw"
    # adamw_8bit: parameters with fewer values keep float32 moments (bnb's min_8bit_size)
    optimizer_8bit_min_size: int = 4096
    sgd_momentum: float = 0.0
    modules_to_save_lr: float | None = None  # None = train.lr
    # host: optimizer state in host memory (pinned_host), streamed to the device per update
    optimizer_offload: Literal["none", "host"] = "none"
    # activation-recompute policy per layer; offload = save matmul outputs in host memory
    remat: Literal["none", "full", "dots", "offload"] = "none"
    loss_scale_init: float = 2.0**16  # model.compute_dtype=float16 only: dynamic loss scaling
    loss_scale_growth_interval: int = 2000  # good steps before the scale doubles
    # tokens per chunk of the cross-entropy, all rows of a micro-batch together; only tokens in
    # the loss go through the head (0 = whole [tokens, vocab] logits, every token)
    loss_chunk: int = 512
    # tokens per tile of every layer's MLP, all rows of a micro-batch together: the backward
    # holds one tile's [tokens, intermediate] activations at a time (0 = the whole sequence)
    mlp_chunk: int = 0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_max_new_tokens: int = 64
    exact_match_examples: int = 0  # greedy answers scored on data.eval_path, before and after
    resume: bool = False  # continue from the latest checkpoint in output_dir
    # Where metrics go besides the progress bar. metrics.jsonl is the run's record (resume trims
    # it, report.json and the model card read it), so jsonl must be listed.
    report_to: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = ("jsonl", "tensorboard")
    wandb_project: str = "jaxlora"
    wandb_name: str | None = None  # None = output_dir's name

    def _validate(self) -> None:
        check(
            self.sample_every == 0 or len(self.sample_prompts) > 0,
            "train.sample_prompts",
            "must list at least one prompt when train.sample_every > 0",
        )
        check(
            "jsonl" in self.report_to,
            "train.report_to",
            "must include jsonl: metrics.jsonl is the run's record (resume, report.json and the "
            f"model card read it); choices: jsonl, tensorboard, wandb; got {list(self.report_to)}",
        )


def _default_rules() -> dict[str, str | None]:
    # Weights are [out, in]: embed (the model width) shards over fsdp, the wide per-layer axes
    # (mlp, heads, vocab) over tensor; head_dim and the small LoRA rank stay whole.
    return {
        "vocab": "tensor",
        "embed": "fsdp",
        "mlp": "tensor",
        "heads": "tensor",
        "kv_heads": "tensor",
        "head_dim": None,
        "lora_rank": None,
    }


@dataclass(frozen=True)
class MeshConfig(Section):
    """Device mesh sizes (``-1`` = all remaining devices, at most once) and logical-axis rules."""

    _prefix: ClassVar[str] = "mesh."
    _ranges: ClassVar = dict.fromkeys(MESH_AXES, (lambda v: v >= 1 or v == -1, ">= 1 or -1"))
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, str | None] = field(default_factory=_default_rules)

    def _validate(self) -> None:
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        check(list(sizes.values()).count(-1) <= 1, "mesh", "at most one axis may be -1")
        for logical, mesh_axis in self.rules.items():
            if logical not in LOGICAL_AXES:
                raise ConfigError(
                    unknown_key_message(
                        f"mesh.rules.{logical}", [f"mesh.rules.{a}" for a in LOGICAL_AXES]
                    )
                )
            check(
                mesh_axis is None or mesh_axis in MESH_AXES,
                f"mesh.rules.{logical}",
                f"must be one of {', '.join(MESH_AXES)} or null; got {mesh_axis!r}",
            )


@dataclass(frozen=True)
class Config(Section):
    """A whole run: one section per concern, plus where it writes and which recipe it came from."""

    model: ModelConfig
    data: DataConfig
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    output_dir: str = "runs/run"
    recipe: str = ""

    def _validate(self) -> None:
        check(self.output_dir != "", "output_dir", "must not be empty")
        q, want = self.quant, LOFTQ_QUANT
        got = {"quant_type": q.type, "blocksize": q.blocksize, "double_quant": q.double_quant}
        yaml_value = lambda v: str(v).lower()
        check(
            self.lora.init != "loftq" or got == want,
            "lora.init",
            "loftq initialises LoRA against the base it quantizes as PEFT's LoftQ does (NF4, "
            "blocks of 64, double-quantized absmax); set "
            f"quant.type={want['quant_type']}, quant.blocksize={want['blocksize']}, "
            f"quant.double_quant={yaml_value(want['double_quant'])} "
            f"(got {', '.join(yaml_value(v) for v in got.values())})",
        )
        check(
            self.train.exact_match_examples == 0
            or (self.data.eval_path is not None and self.data.format != "text"),
            "train.exact_match_examples",
            "needs question/answer records: set data.eval_path, with data.format alpaca, chat or "
            "sharegpt",
        )
        check(
            not self.data.is_stream or self.train.max_steps > 0,
            "train.max_steps",
            "a streamed dataset or a mixture has no length to count train.epochs in; set "
            "train.max_steps (a stream that runs out starts its next epoch)",
        )

    @property
    def quant_compute_dtype(self) -> str:
        """The dtype 4-bit weights are multiplied in: ``quant.compute_dtype``, else the
        activations' (``model.compute_dtype``)."""
        return self.quant.compute_dtype or self.model.compute_dtype

    @property
    def data_seed(self) -> int:
        """The seed for the validation split and per-epoch shuffling."""
        return self.train.seed if self.data.shuffle_seed is None else self.data.shuffle_seed


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``recipes/``."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(recipe: str, relative_to: Path | None = None) -> Path:
    """A recipe name (in ``recipes/``) or a YAML path -> an existing file."""
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe or "\\" in recipe:
        path = Path(recipe).expanduser()
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        names = available_recipes()
        close = difflib.get_close_matches(recipe, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown recipe '{recipe}'{hint} (in {RECIPES_DIR}: {', '.join(names)})")
    return path


def _load_recipe(recipe: str, relative_to: Path | None, seen: tuple[Path, ...]) -> dict:
    path = recipe_path(recipe, relative_to).resolve()
    if path in seen:
        raise ConfigError(f"recipe base cycle: {' -> '.join(map(str, (*seen, path)))}")
    data = read_yaml(path)
    base = data.pop("base", None)
    raw: dict = {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base must be a recipe name or path; got {base!r}")
        raw = _load_recipe(base, path.parent, (*seen, path))
        raw.pop("recipe", None)  # the including recipe is the one recorded
    merge(raw, data, Config, str(path))
    return raw


def load_config(recipe: str = "demo", overrides: Sequence[str] = ()) -> Config:
    """Recipe (name or YAML path) + ``a.b=c`` overrides -> a validated :class:`Config`."""
    raw = _load_recipe(recipe, None, ())
    for text in overrides:
        new = parse_override(text, Config)
        if "recipe" in new:
            raise ConfigError(f"override {text!r}: choose the recipe with recipe=..., once")
        merge(raw, new, Config, f"override {text!r}")
    raw.setdefault("recipe", recipe)
    raw.setdefault("output_dir", f"runs/{re.sub(r'[.]ya?ml$', '', Path(recipe).name)}")
    return build(Config, raw)


def config_from_argv(argv: Sequence[str]) -> Config:
    """``["recipe=llama_qlora", "lora.r=8", ...]`` -> Config (recipe defaults to ``demo``)."""
    recipes = [a.partition("=")[2] for a in argv if a.startswith("recipe=")]
    if len(recipes) > 1:
        raise ConfigError(f"recipe= given {len(recipes)} times; give it once")
    overrides = [a for a in argv if not a.startswith("recipe=")]
    return load_config(recipes[0] if recipes else "demo", overrides)


def to_yaml(cfg: Config) -> str:
    """The whole config as YAML (every key, defaults included); ``load_config`` reads it back."""
    d = to_plain(cfg)
    order = ["recipe", "output_dir", "model", "quant", "lora", "data", "train", "mesh"]
    body = yaml.dump(
        {k: d[k] for k in order},
        Dumper=Dumper,
        sort_keys=False,
        default_flow_style=False,
        width=100,
    )
    return f"# jaxlora run config (recipe: {cfg.recipe})\n{body}"


def save_config(cfg: Config, path: str | Path) -> None:
    """Write :func:`to_yaml` to ``path`` (e.g. ``output_dir/config.yaml``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))


def print_config(cfg: Config) -> None:
    """Print the config as YAML, the form ``save_config`` writes."""
    print(to_yaml(cfg), end="")
