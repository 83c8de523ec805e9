"""Recipes, overrides and the typed config: typing, errors that name the key, round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jaxlora.config import (
    RECIPES_DIR,
    Config,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    available_recipes,
    config_from_argv,
    load_config,
    print_config,
    save_config,
    to_yaml,
)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


MINIMAL = "model:\n  path: some/model\ndata:\n  path: train.jsonl\n"


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_loads_and_round_trips(name, tmp_path):
    cfg = load_config(name)
    assert cfg.recipe == name and cfg.output_dir == f"runs/{name}"
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(str(tmp_path / "run" / "config.yaml")) == cfg


def test_shipped_recipes_exist():
    assert {"demo", "llama_qlora", "llama_lora"} <= set(available_recipes())
    assert RECIPES_DIR.name == "recipes"
    qlora = load_config("llama_qlora")
    assert (qlora.quant.type, qlora.quant.double_quant, qlora.quant.compute_dtype) == (
        "nf4",
        True,
        "bfloat16",
    )
    assert qlora.lora.target_modules == "all-linear" and qlora.lora.alpha == 2 * qlora.lora.r
    assert load_config("llama_lora").quant.type == "none"
    assert load_config("demo").quant.type == "nf4"


def test_overrides_are_typed_like_yaml():
    cfg = load_config(
        "demo",
        [
            "lora.r=7",
            "train.lr=2e-4",
            "lora.alpha=11",
            "lora.dropout=0",
            "data.packing=false",
            "lora.target_modules=[q_proj,v_proj]",
            "lora.layers_to_transform=[0, 3]",
            "model.revision=null",
            "data.val_size=13",
            "data.eval_path=null",  # the demo holds out a file; a count splits train instead
            "train.exact_match_examples=0",
            "lora.rank_pattern.model.layers.0.self_attn.q_proj=3",
            "mesh.rules.embed=null",
            "output_dir=/tmp/somewhere",
        ],
    )
    assert cfg.lora.r == 7 and isinstance(cfg.lora.r, int)
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.lora.alpha == 11 and isinstance(cfg.lora.alpha, int)  # int | float keeps ints
    assert cfg.lora.dropout == 0.0 and isinstance(cfg.lora.dropout, float)  # ints widen to floats
    assert cfg.data.packing is False
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.lora.layers_to_transform == (0, 3)
    assert cfg.model.revision is None
    assert cfg.data.val_size == 13 and isinstance(cfg.data.val_size, int)  # a count, not 13.0
    assert cfg.lora.rank_pattern == {"model.layers.0.self_attn.q_proj": 3}
    assert cfg.mesh.rules["embed"] is None and cfg.mesh.rules["mlp"] == "tensor"  # merged per axis
    assert cfg.output_dir == "/tmp/somewhere"
    # A regex string is kept as one string; a fraction stays a float.
    split = ["data.eval_path=null", "train.exact_match_examples=0", "data.val_size=0.25"]
    cfg = load_config("demo", ["lora.target_modules=.*\\.(q|v)_proj", *split])
    assert cfg.lora.target_modules == ".*\\.(q|v)_proj" and cfg.data.val_size == 0.25


def test_round_trip_keeps_overrides_and_awkward_strings(tmp_path):
    cfg = load_config(
        "llama_qlora",
        [
            "train.sample_prompts=['1e5', 'null', 'yes', 'a: b']",
            "lora.alpha_pattern={'.*down_proj': 3.5}",
            "lora.modules_to_save=[lm_head]",
            "train.adam_eps=1e-9",
        ],
    )
    assert cfg.train.sample_prompts == ("1e5", "null", "yes", "a: b")
    text = to_yaml(cfg)
    assert "recipe: llama_qlora" in text
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(str(path)) == cfg


def test_print_config(capsys):
    cfg = load_config("demo")
    print_config(cfg)
    out = capsys.readouterr().out
    assert out == to_yaml(cfg) and "target_modules: all-linear" in out


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("lora.rnak=3", ["unknown key 'lora.rnak'", "did you mean 'lora.r'"]),
        ("lroa.r=3", ["unknown key 'lroa'", "did you mean 'lora'"]),
        ("train.max_seq_len=9", ["train.max_seq_len", "did you mean 'data.max_seq_len'"]),
        ("data.formt=chat", ["data.formt", "did you mean 'data.format'"]),
        ("mesh.rules.embd=fsdp", ["mesh.rules.embd", "did you mean 'mesh.rules.embed'"]),
        ("lora.r.x=1", ["lora.r is a value, not a section"]),
        ("lora.r", ["must look like key.sub=value"]),
        ("recipe=llama_lora", ["choose the recipe with recipe="]),
    ],
)
def test_bad_keys_are_named_with_a_suggestion(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("lora.r=0", ["lora.r", "> 0", "got 0"]),
        ("lora.r=2.5", ["lora.r", "an integer", "2.5"]),
        ("lora.r=true", ["lora.r", "an integer"]),
        ("lora.dropout=1.0", ["lora.dropout", "[0, 1)"]),
        ("lora.bias=some", ["lora.bias", "none, all, lora_only", "'some'"]),
        ("lora.init=olora", ["lora.init", "default, random, gaussian, pissa, loftq", "olora"]),
        ("lora.target_modules=[]", ["lora.target_modules", "must not be empty"]),
        ("lora.target_modules=[all-linear]", ["lora.target_modules", "plain string"]),
        ("lora.target_modules=(q_proj", ["lora.target_modules", "regular expression"]),
        ("lora.rank_pattern.q_proj=0", ["lora.rank_pattern.q_proj", "> 0"]),
        ("lora.layers_to_transform=[-1]", ["lora.layers_to_transform"]),
        ("train.lr=0", ["train.lr", "> 0"]),
        ("train.lr=abc", ["train.lr", "a number", "'abc'"]),
        ("train.warmup_ratio=1.5", ["train.warmup_ratio", "[0, 1]"]),
        ("train.schedule=step", ["train.schedule", "cosine, linear, constant"]),
        ("train.remat=some", ["train.remat", "none, full, dots, offload"]),
        (
            "train.optimizer=adam8bit",
            ["train.optimizer", "adamw, adamw_8bit, adafactor, lion, sgd"],
        ),
        ("train.optimizer_offload=cpu", ["train.optimizer_offload", "none, host", "'cpu'"]),
        ("train.modules_to_save_lr=0", ["train.modules_to_save_lr", "> 0"]),
        ("train.loss_scale_init=0.5", ["train.loss_scale_init", ">= 1"]),
        ("lora.loraplus_lr_ratio=0", ["lora.loraplus_lr_ratio", "> 0"]),
        ("model.compute_dtype=fp16", ["model.compute_dtype", "float32, bfloat16, float16"]),
        ("train.max_steps=0", ["train.max_steps", "-1"]),
        ("train.batch_size=0", ["train.batch_size", ">= 1"]),
        ("train.loss_chunk=-1", ["train.loss_chunk", ">= 0", "got -1"]),
        ("train.loss_chunk=1k", ["train.loss_chunk", "an integer", "'1k'"]),
        ("train.sample_prompts=[]", ["train.sample_prompts", "sample_every"]),
        ("model.dtype=float16", ["model.dtype", "float32, bfloat16"]),
        ("quant.type=int8", ["quant.type", "none, nf4, fp4"]),
        ("quant.blocksize=48", ["quant.blocksize", "64"]),
        ("data.val_size=1.0", ["data.val_size", "(0, 1)"]),
        ("data.val_size=-2", ["data.val_size"]),
        ("data.format=oasst", ["data.format", "alpaca, chat, sharegpt, text"]),
        ("data.max_seq_len=1", ["data.max_seq_len", ">= 2"]),
        ("mesh.fsdp=0", ["mesh.fsdp", ">= 1 or -1"]),
        ("mesh.data=-1", ["mesh", "at most one axis may be -1"]),
        ("mesh.rules.embed=model", ["mesh.rules.embed", "data, fsdp, tensor"]),
        ("lora.model=x", ["lora.model", "unknown key"]),
        ("lora.target_modules=[q_proj", ["lora.target_modules", "YAML"]),
        # the demo recipe sets data.eval_path (val_size 0) and train.exact_match_examples
        ("data.val_size=0.05", ["data.val_size", "must be 0 when data.eval_path"]),
        ("data.eval_path=null", ["train.exact_match_examples", "data.eval_path"]),
        ("train.exact_match_examples=-1", ["train.exact_match_examples", ">= 0"]),
        ("train.seed=-1", ["train.seed", "in [0, 2**63)", "got -1"]),
        ("data.shuffle_seed=-3", ["data.shuffle_seed", "in [0, 2**63)", "got -3"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_exact_match_needs_held_out_question_answer_data():
    ok = ["data.eval_path=e.jsonl", "data.val_size=0", "train.exact_match_examples=5"]
    cfg = load_config("demo", ok)
    assert (cfg.data.eval_path, cfg.train.exact_match_examples) == ("e.jsonl", 5)
    with pytest.raises(
        ConfigError, match="train.exact_match_examples: .* alpaca, chat or sharegpt"
    ):
        load_config("demo", [*ok, "data.format=text"])


@pytest.mark.parametrize(
    ("recipe", "extra", "got"),
    [
        ("llama_lora", [], "none, 64, true"),
        ("llama_qlora", ["quant.type=fp4"], "fp4, 64, true"),
        ("llama_qlora", ["quant.blocksize=128"], "nf4, 128, true"),
        ("llama_qlora", ["quant.double_quant=false"], "nf4, 64, false"),
    ],
)
def test_loftq_needs_the_base_it_quantizes(recipe, extra, got):
    """LoftQ's base is NF4 in blocks of 64 with double quantization (PEFT's): the run's quant
    must be that base's, not none or another 4-bit layout."""
    with pytest.raises(ConfigError, match=rf"lora.init: loftq .*\(got {got}\)"):
        load_config(recipe, ["lora.init=loftq", *extra])
    assert load_config("llama_qlora", ["lora.init=loftq"]).lora.init == "loftq"


def test_recipe_files_base_inheritance_and_errors(tmp_path):
    base = _write(tmp_path / "base.yaml", MINIMAL + "lora:\n  r: 4\n  rank_pattern: {a: 2}\n")
    child = _write(
        tmp_path / "child.yaml",
        "base: base.yaml\nlora:\n  alpha: 9\n  rank_pattern: {b: 3}\ntrain:\n  lr: 5e-5\n",
    )
    cfg = load_config(child)
    assert cfg.lora.r == 4 and cfg.lora.alpha == 9.0 and cfg.train.lr == 5e-5
    assert cfg.lora.rank_pattern == {"a": 2, "b": 3}
    assert cfg.recipe == child and cfg.output_dir == "runs/child"
    # On the command line a dotted key adds to the mapping, the mapping named whole replaces it.
    assert load_config(child, ["lora.rank_pattern.c=5"]).lora.rank_pattern == {
        "a": 2,
        "b": 3,
        "c": 5,
    }
    assert load_config(child, ["lora.rank_pattern={c: 5}"]).lora.rank_pattern == {"c": 5}
    assert load_config(child, ["lora.rank_pattern={}"]).lora.rank_pattern == {}
    rules = load_config(child, ["mesh.rules={vocab: fsdp}"]).mesh.rules  # over the defaults
    assert rules["vocab"] == "fsdp" and rules["embed"] == "fsdp" and rules["mlp"] == "tensor"
    # Inheriting from a shipped recipe by name.
    by_name = _write(tmp_path / "mine.yaml", "base: llama_qlora\nlora:\n  r: 8\n")
    assert load_config(by_name).lora.r == 8 and load_config(by_name).quant.type == "nf4"

    bad = _write(tmp_path / "bad.yaml", MINIMAL + "lora:\n  dropuot: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown key 'lora.dropuot'; did you mean 'lora.dropout'"
    ):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"model.path: required key is missing"):
        load_config(_write(tmp_path / "nomodel.yaml", "data:\n  path: x.jsonl\n"))
    with pytest.raises(ConfigError, match=r"lora must be a mapping"):
        load_config(_write(tmp_path / "flat.yaml", MINIMAL + "lora: 8\n"))
    with pytest.raises(ConfigError, match=r"cycle"):
        _write(tmp_path / "x.yaml", "base: y.yaml\n")
        load_config(_write(tmp_path / "y.yaml", "base: x.yaml\n"))
    with pytest.raises(
        ConfigError, match=r"unknown recipe 'lama_qlora'; did you mean 'llama_qlora'"
    ):
        load_config("lama_qlora")
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"invalid YAML"):
        load_config(_write(tmp_path / "broken.yaml", "model: [unclosed\n"))
    assert base


def test_config_from_argv():
    cfg = config_from_argv(["recipe=llama_lora", "lora.r=8"])
    assert cfg.recipe == "llama_lora" and cfg.lora.r == 8
    assert config_from_argv([]).recipe == "demo"
    with pytest.raises(ConfigError, match="once"):
        config_from_argv(["recipe=demo", "recipe=llama_lora"])


def test_python_construction_is_checked_and_frozen():
    cfg = Config(
        model=ModelConfig(path="m"),
        data=DataConfig(path="d.jsonl"),
        lora=LoraConfig(target_modules=["q_proj"]),
    )
    assert cfg.lora.target_modules == ("q_proj",)  # lists become tuples
    assert cfg.lora.target_modules != LoraConfig().target_modules
    assert cfg.data_seed == cfg.train.seed
    assert dataclasses.replace(cfg, data=DataConfig(path="d", shuffle_seed=5)).data_seed == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora.r = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"lora.r: must be > 0"):
        LoraConfig(r=-3)
    with pytest.raises(ConfigError, match=r"model.path"):
        ModelConfig(path="")
