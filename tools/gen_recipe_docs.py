"""Generate docs/recipes.md from the config dataclasses, so the key reference cannot drift.

    python tools/gen_recipe_docs.py            # rewrite docs/recipes.md
    python tools/gen_recipe_docs.py --check    # exit 1 if docs/recipes.md is out of date

Keys, types, allowed values, ranges and defaults are read from ``jaxlora.config`` (the frozen
dataclasses and their ``_ranges``); the values each shipped recipe sets are read by loading it.
Only the one-line meanings live here, in ``MEANINGS``: a key the config has and this table lacks
(or the reverse) is an error, so a new or renamed key fails ``tests/test_docs.py`` until it is
documented.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from jaxlora import config as C
from jaxlora.config.typed import Dumper, all_keys, fields, to_plain

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"

# One line per key: what it means and when to change it. Defaults and types are generated.
MEANINGS: dict[str, str] = {
    # top level
    "output_dir": "Where the run writes `config.yaml`, `metrics.jsonl`, `tb/`, `checkpoints/`, "
    "`adapter/` and `report.json`. Defaults to `runs/<recipe name>`.",
    "recipe": "The recipe this config came from (set with `recipe=` on the command line; "
    "recorded in `config.yaml`, not an override).",
    # model
    "model.path": "Base model: a local Hugging Face directory (`config.json` + `*.safetensors`) "
    "or a hub id such as `meta-llama/Llama-3.1-8B`. Required.",
    "model.dtype": "Storage dtype of the unquantized base weights (all of them with "
    "`quant.type=none`; embeddings, norms and `lm_head` with NF4/FP4).",
    "model.compute_dtype": "Activation dtype. `bfloat16` on TPU and Ampere+ GPUs; `float16` on "
    "GPUs without bf16 (T4, V100), with dynamic loss scaling (`train.loss_scale_*`; refused on "
    "TPU); `float32` on CPU. Trainable parameters and optimizer math stay float32.",
    "model.revision": "Hub revision (branch, tag or commit) of `model.path`.",
    "model.tokenizer": "Tokenizer directory or hub id when it is not next to the weights "
    "(`null` = `model.path`).",
    "model.scan_layers": "Scan the decoder layers over stacked parameters in the train step "
    "(each run of alike layers compiles once instead of every layer: docs/planning.md has the "
    "compile times). `auto` = on for TPU/GPU meshes and `plan`, off on CPU (a CPU step compiles "
    "fast unrolled). The base then loads stacked, straight onto the mesh (on the device once), "
    "and LoRA dropout draws the same masks as unrolled. Adapters, exports and generation see "
    "the usual `layers/0 ... N-1`; a checkpoint records its layout, so resume with the same "
    "setting.",
    # quant
    "quant.type": "`none` = 16/32-bit LoRA; `nf4` = QLoRA (4-bit NormalFloat, the paper's "
    "choice); `fp4` = bitsandbytes' FP4. A bitsandbytes 4-bit checkpoint is read as stored.",
    "quant.blocksize": "Weights per absmax scale (bitsandbytes' `blocksize`). 64 is QLoRA's.",
    "quant.double_quant": "Quantize the per-block scales too (8-bit, blocks of 256): "
    "4.127 instead of 4.5 bits per parameter.",
    "quant.compute_dtype": "Dtype a dequantized 4-bit weight is multiplied in "
    "(`bnb_4bit_compute_dtype`): the activations are cast to it and the product back, as "
    "bitsandbytes' `Linear4bit` does; `null` = `model.compute_dtype`. `model.compute_dtype="
    "float32 quant.compute_dtype=bfloat16` is PEFT's QLoRA after `prepare_model_for_kbit_"
    "training` (float32 activations, bf16 4-bit matmuls); see memory.md.",
    "quant.kernel": "The 4-bit matmul, chosen for the devices the step is built for: `auto` = "
    "the Mosaic kernel on TPU, dequantize-then-dot elsewhere (on a GPU measured 3-6x faster than "
    "the Triton kernel at training sizes, on an H200); `fused` = the platform's Pallas kernel (Mosaic on TPU, "
    "Triton on compute capability 8.0+; an error elsewhere); `dequant` = never a kernel; "
    "`interpret` = the kernels in Pallas interpret mode on any device (slow; debugging). See "
    "docs/kernels.md.",
    # lora
    "lora.r": "Adapter rank. 4-8 format/style, 16-32 instruction tuning, 64-128 reasoning or "
    "new knowledge; QLoRA often wants more than 16-bit LoRA. See tuning.md.",
    "lora.alpha": "Scale numerator: the update is multiplied by `alpha / r` (`alpha / sqrt(r)` "
    "with `use_rslora`). Keep `alpha = 2 * r`.",
    "lora.dropout": "Dropout on the adapter's input only (PEFT's `lora_dropout`). 0.05-0.1 for "
    "small data, 0 for large.",
    "lora.target_modules": "Which linears get adapters: a list matches module names or dotted "
    "suffixes, a string is a full-match regex over the module path, `all-linear` is every "
    "linear except `lm_head`.",
    "lora.exclude_modules": "Linears to leave out of `target_modules`, in the same forms "
    "(e.g. `[down_proj]` with `all-linear`).",
    "lora.bias": "Which biases train: `none`, `all` (every bias) or `lora_only` (biases of "
    "adapted layers).",
    "lora.modules_to_save": "Modules trained and saved in full (e.g. `[lm_head]` for a new "
    "head, `[embed_tokens]` for new tokens). Empty for ordinary SFT.",
    "lora.layers_to_transform": "Only adapt these layer indices (`null` = all). Needs a list "
    "`target_modules`, as in PEFT.",
    "lora.layers_pattern": "Name of the layer list that `layers_to_transform` indexes "
    "(`layers` in Llama-family models; `null` = any).",
    "lora.rank_pattern": "Per-module rank: `{regex: r}`; a key applies when it matches the end "
    "of the module path (PEFT's rule), first match wins.",
    "lora.alpha_pattern": "Per-module alpha: `{regex: alpha}`, matched like `rank_pattern`.",
    "lora.use_rslora": "Rank-stabilised LoRA: scale by `alpha / sqrt(r)`; keeps high ranks "
    "(128+) stable.",
    "lora.use_dora": "DoRA: adds a trained per-output magnitude vector on top of LoRA.",
    "lora.init": "Adapter initialisation: `default` (A kaiming-uniform, B = 0, so the model "
    "starts unchanged), `gaussian`, `pissa` (principal singular vectors), `pissa_niter_<K>` "
    "(PiSSA by a K-iteration randomized SVD, fast on large models, drawn from `train.seed`), "
    "`loftq` (NF4 base only: starts closer to the 16-bit model). PiSSA and LoftQ rewrite the "
    "base: a 4-bit run loads it in float once and quantizes it after the init, as PEFT's "
    "PiSSA/LoftQ QLoRA recipes do, `random` (B != 0 as well: for tests).",
    "lora.loftq_iters": "LoftQ alternating-optimisation iterations (`lora.init=loftq`).",
    "lora.dtype": "Dtype of the adapter weights and their optimizer state (PEFT keeps float32).",
    "lora.loraplus_lr_ratio": "LoRA+ (PEFT's `create_loraplus_optimizer`): LoRA B, DoRA "
    "magnitudes, 1-D and bias parameters train at this many times `train.lr` (weight decay as "
    "PEFT's: not on biases and LayerNorm weights, on RMSNorm weights). `null` = off; the paper uses 2-16, with `train.lr` about half of plain LoRA's.",
    # data
    "data.path": "Training records: a `.json`/`.jsonl`/`.csv`/`.parquet` file, a directory of "
    "them, or a hub dataset id (e.g. `yahma/alpaca-cleaned`). Required, unless `data.sources` "
    "gives a mixture (then `null`).",
    "data.format": "`alpaca` (instruction, input, output in the Stanford Alpaca template), "
    "`chat` (messages rendered with the tokenizer's chat template), `sharegpt` (`conversations` "
    "of `{from: human|gpt|system, value}`, mapped to chat messages) or `text` (plain text).",
    "data.split": "Split of a hub dataset (or of local files) to train on.",
    "data.subset": "Hub dataset configuration name.",
    "data.max_seq_len": "Tokens per row. Longer examples are cut from the right (and counted "
    "in the log).",
    "data.packing": "Pack several examples into one row; attention and positions stay within "
    "each example. Far fewer wasted tokens on short data.",
    "data.train_on_inputs": "Also train on the prompt tokens (default: loss on responses / "
    "assistant turns only).",
    "data.val_size": "Held-out share of `data.path`: a fraction in (0, 1) (at least one "
    "example, so it scales with the file) or a count; 0 = no validation set. Must be 0 when "
    "`data.eval_path` is set. Streams and mixtures take a count: the first N records (of each "
    "source).",
    "data.eval_path": "A separate held-out file or directory in the same format; it is then "
    "the validation set (eval loss, exact match), read whole (`data.split`, `data.subset`, "
    "`data.max_examples` select training records only).",
    "data.shuffle_seed": "Seed for the validation split and per-epoch shuffles "
    "(`null` = `train.seed`).",
    "data.max_examples": "Use only the first N records (`null` = all); handy for smoke runs.",
    "data.instruction_field": "Record field holding the instruction (`alpaca`).",
    "data.input_field": "Record field holding the optional input (`alpaca`).",
    "data.output_field": "Record field holding the response (`alpaca`).",
    "data.text_field": "Record field holding the text (`text`).",
    "data.messages_field": "Record field holding the `[{role, content}, ...]` list (`chat`).",
    "data.conversations_field": "Record field holding the `[{from, value}, ...]` list "
    "(`sharegpt`).",
    "data.role_field": "Key of a ShareGPT turn naming the speaker (`sharegpt`).",
    "data.content_field": "Key of a ShareGPT turn holding the text (`sharegpt`).",
    "data.sharegpt_roles": "More ShareGPT speaker names, each mapped to `user`, `assistant`, "
    "`system` or `tool` (`data.sharegpt_roles.bing=assistant`); `human`, `gpt`, `system`, "
    "`user`, `assistant` are always known, any other speaker is refused naming the line.",
    "data.chat_template": "The chat template `chat`/`sharegpt` data is rendered with and every "
    "export carries: `llama3`, `chatml`, `mistral`, `gemma`, `phi3` (each family's official "
    "instruct template), `alpaca`, or a Jinja file. For a base model without a template, or to "
    "replace the tokenizer's own (logged); in a mixture it serves the chat sources, beside "
    "alpaca or text ones. `null` = the tokenizer's own.",
    "data.streaming": "Stream the dataset (`datasets`' `IterableDataset`): nothing is downloaded "
    "before the first step; records are tokenized and packed as they arrive, and checkpoints "
    "hold the exact position. Needs `train.max_steps` and a `val_size` count (the first N "
    'records) or `eval_path`. See quickstart.md, "Hub datasets, streaming and mixtures".',
    "data.shuffle_buffer": "Streams and mixtures: records in the shuffle buffer of a streamed "
    "source (`datasets`' buffer shuffle, seeded; reshuffled each epoch); a loaded source is "
    "permuted whole. 0 = read in order.",
    "data.sources": "A weighted mixture instead of `data.path`: each entry is a source (keys "
    "below); the next example comes from source i with probability `weight_i / sum(weights)`, "
    "drawn from the seed. Needs `train.max_steps`; `data.streaming` streams every source.",
    # train
    "train.batch_size": "Rows (of `data.max_seq_len` tokens) per micro-batch, summed over all "
    "devices and hosts. Must divide evenly over the `data x fsdp` mesh axes.",
    "train.grad_accum": "Micro-batches per optimizer step. Effective batch = `batch_size x "
    "grad_accum` rows; raise it (and lower `batch_size`) on out-of-memory.",
    "train.max_steps": "Optimizer steps to run; `-1` runs `train.epochs` full passes.",
    "train.epochs": "Passes over the training set when `max_steps` is -1.",
    "train.lr": "Peak learning rate. LoRA 1e-4-5e-4, QLoRA 5e-5-2e-4 on 7-13B models.",
    "train.warmup_ratio": "Fraction of the steps spent warming up linearly to `lr` (3-5 %).",
    "train.schedule": "Decay after warmup: `cosine` (to 0), `linear` (to 0) or `constant`.",
    "train.weight_decay": "Decoupled weight decay (× the learning rate, every optimizer) on the trainable parameters but biases and norm weights, as HF's Trainer (with LoRA+: as PEFT's `create_loraplus_optimizer`).",
    "train.max_grad_norm": "Clip the global gradient norm to this (0 = no clipping).",
    "train.adam_beta1": "AdamW first-moment decay.",
    "train.adam_beta2": "AdamW second-moment decay.",
    "train.adam_eps": "AdamW epsilon.",
    "train.optimizer": "`adamw` (float32 moments), `adamw_8bit` (bitsandbytes' `AdamW8bit`: "
    "moments in 8 bits, blocks of 256, ~1/4 of the bytes), `adafactor` (factored second moment, "
    "no first), `lion` (one moment; use 3-10x lower `train.lr`), `sgd`. LR ranges: "
    "docs/tuning.md.",
    "train.optimizer_8bit_min_size": "`adamw_8bit`: parameters with fewer values keep float32 "
    "moments (bitsandbytes' `min_8bit_size`); 0 = every parameter in 8 bits.",
    "train.sgd_momentum": "`sgd`: momentum (0 = plain SGD, torch's default).",
    "train.modules_to_save_lr": "Learning rate of `lora.modules_to_save` modules (fully "
    "trained heads or embeddings often want 5-10x less than the adapters); `null` = `train.lr`.",
    "train.optimizer_offload": "`host`: optimizer state kept in host memory (`pinned_host`) "
    "between steps and streamed to the device one parameter's state at a time for the update "
    "(bitsandbytes' paged optimizers, the JAX way): device memory drops by about the state's "
    "size (docs/memory.md). Refused on devices with no host memory space, as JAX's "
    "compile-only GPU devices (`jaxlora.plan` for a GPU target) are.",
    "train.loss_scale_init": "`model.compute_dtype` or `quant.compute_dtype` `float16`: the "
    "first loss scale (torch's "
    "GradScaler: 2^16). A step whose gradients overflow is skipped and the scale halved.",
    "train.loss_scale_growth_interval": "`float16`: finite steps in a row after which the loss "
    "scale doubles (torch's GradScaler: 2000).",
    "train.remat": "Activation recompute per decoder layer: `none`, `full` (least memory; "
    "the forward runs twice, about +50 % matmul work for LoRA), `dots` (keeps matmul "
    "outputs, recomputes the rest) or `offload` (keeps what `dots` keeps in host memory: "
    "device memory of `full`, less recompute; costs transfers).",
    "train.loss_chunk": "Tokens per chunk of the cross-entropy, all rows of a micro-batch "
    "together (`loss_chunk // batch` positions of each row): each chunk's logits are formed, "
    "reduced and differentiated on the spot, so the float32 `[tokens, vocab]` logits never "
    "exist at once (Llama 3 at 8,192 tokens: 4 GiB), and only tokens in the loss go through "
    "the head (a masked prompt or padding is skipped: 1.25x the tokens/s on the 57m shape "
    "with the demo data, CPU). Same loss and gradients as `0` (whole logits, every "
    "token) up to summation order. See memory.md.",
    "train.mlp_chunk": "Tokens per tile of every layer's MLP, all rows of a micro-batch "
    "together (`mlp_chunk // batch` positions of each row): the MLP runs over the sequence a "
    "tile at a time, each tile rematerialized, so the backward holds one tile's "
    "`[tokens, intermediate]` activations instead of the whole sequence's (Llama-3-8B at 8,192 "
    "tokens: 448 MiB each in float32). For long sequences; same logits and gradients as `0` "
    "(the whole sequence at once) up to summation order. See memory.md.",
    "train.seed": "Seed for adapter init, dropout and (unless `data.shuffle_seed`) data order.",
    "train.log_every": "Write a `metrics.jsonl` / TensorBoard record every N steps (the first "
    "and last step and every eval step are always written).",
    "train.eval_every": "Eval loss on the validation set every N steps and at the end (0 = off).",
    "train.save_every": "Orbax checkpoint every N steps and at the end (0 = off).",
    "train.keep_checkpoints": "How many checkpoints to keep in `output_dir/checkpoints`.",
    "train.sample_every": "Generate from `sample_prompts` every N steps and print it (0 = off).",
    "train.sample_prompts": "Fixed prompts for the samples (needed when `sample_every` > 0).",
    "train.sample_max_new_tokens": "Length of each sample (and of exact-match answers).",
    "train.exact_match_examples": "Score greedy answers on the first N records of "
    "`data.eval_path` before and after training (`report.json`); 0 = off.",
    "train.resume": "Continue from the latest checkpoint in `output_dir`. Without it, a run "
    "into a directory that holds checkpoints is refused.",
    "train.report_to": "Where metrics go besides the progress bar: `jsonl` (`metrics.jsonl`, "
    "required: it is the run's record), `tensorboard` (`output_dir/tb`), `wandb` (a Weights & "
    "Biases run in `output_dir/wandb`; `pip install 'jaxlora[wandb]'`, `WANDB_MODE=offline` "
    "to sync later). Only process 0 reports.",
    "train.wandb_project": "The wandb project the run is logged to (`WANDB_ENTITY` picks the "
    "team). The run's config is the resolved recipe.",
    "train.wandb_name": "The wandb run's name (`null` = the name of `output_dir`).",
    # mesh
    "mesh.data": "Devices on the pure data-parallel axis (each holds a full replica).",
    "mesh.fsdp": "Devices on the fully-sharded axis: weights, adapters and optimizer state "
    "are split over it, and so is the batch. `-1` = all remaining devices.",
    "mesh.tensor": "Devices on the tensor-parallel axis (wide per-layer dimensions).",
    "mesh.rules": "Logical axis -> mesh axis (`data`, `fsdp`, `tensor` or `null` = "
    "replicated). Override one at a time, e.g. `mesh.rules.vocab=fsdp`.",
}

# The keys of one `data.sources` entry (jaxlora.config.recipe.SourceConfig).
SOURCE_MEANINGS: dict[str, str] = {
    "path": "A file, a directory of them, or a hub dataset id, as `data.path`. Required.",
    "weight": "Relative sampling weight, > 0: the source gives `weight / sum(weights)` of the "
    "examples. Required.",
    "format": "This source's format (one of `data.format`'s choices).",
    "split": "This source's split.",
    "subset": "This source's hub configuration name.",
    "max_examples": "Use only this source's first N records.",
    "instruction_field": "This source's instruction field (`alpaca`).",
    "input_field": "This source's input field (`alpaca`).",
    "output_field": "This source's response field (`alpaca`).",
    "text_field": "This source's text field (`text`).",
    "messages_field": "This source's messages field (`chat`).",
    "conversations_field": "This source's conversations field (`sharegpt`).",
    "role_field": "This source's speaker key in a ShareGPT turn (`sharegpt`).",
    "content_field": "This source's text key in a ShareGPT turn (`sharegpt`).",
}

SECTIONS = [
    ("", "Top level", C.Config),
    ("model.", "`model`: the base model", C.ModelConfig),
    ("quant.", "`quant`: 4-bit base weights (QLoRA)", C.QuantConfig),
    ("lora.", "`lora`: the adapters (PEFT's `LoraConfig`)", C.LoraConfig),
    ("data.", "`data`: examples -> token rows", C.DataConfig),
    ("train.", "`train`: optimisation and the loop's cadence", C.TrainConfig),
    ("mesh.", "`mesh`: devices and sharding", C.MeshConfig),
]

HEADER = """\
# Recipes and every config key

<!-- Generated by tools/gen_recipe_docs.py from jaxlora/config/recipe.py: do not edit by hand.
     tests/test_docs.py fails when this file and the code disagree. -->

A run is configured by a **recipe** (a YAML file) plus **overrides** on the command line or in
Python. Every key has a type and a default; unknown keys, wrong types and out-of-range values are
refused with an error that names the key (and the nearest valid one).

```bash
python -m jaxlora.train                                    # recipe=demo
python -m jaxlora.train recipe=llama_qlora lora.r=32 train.lr=1e-4
python -m jaxlora.train recipe=<path/to/your_recipe.yaml> output_dir=runs/try1
```

```python
from jaxlora.config import load_config
cfg = load_config("llama_qlora", ["lora.r=32", "train.lr=1e-4"])
```

* A recipe **name** is a file in `recipes/`; anything ending in `.yaml`/`.yml` or containing a
  `/` is a path.
* A recipe may start with `base: <name or path>` to inherit another recipe; its own keys override
  the base's, and mappings (`mesh.rules`, `lora.rank_pattern`) merge key by key.
* Override values are YAML: `8` (int), `2e-4` (float), `true`, `null`, `[q_proj,v_proj]` (list).
  Below a mapping-valued key the rest of the dotted name is one key, added to the recipe's
  mapping: `lora.rank_pattern.model.layers.0.self_attn.q_proj=8`. The mapping named whole
  replaces the recipe's: `lora.rank_pattern={o_proj: 8}`, or `lora.rank_pattern={}` to clear it
  (`mesh.rules` keeps its defaults for the axes not given).
* Relative paths (`model.path`, `data.path`, `output_dir`) are relative to the current directory.
* The resolved config, every key included, is written to `output_dir/config.yaml`, which
  `recipe=output_dir/config.yaml` reads back.
"""


def _type(tp: Any) -> str:
    """An annotation as the docs say it: `a` \\| `b`, list of strings, ..."""
    origin = get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(tp))
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if a is not type(None)]
        text = " or ".join(_type(a) for a in arms)
        return text + (" or null" if type(None) in get_args(tp) else "")
    if origin is tuple and dataclasses.is_dataclass(get_args(tp)[0]):
        return "list of mappings (keys below)"
    if origin is tuple and get_origin(get_args(tp)[0]) is Literal:
        return f"list, each {_type(get_args(tp)[0])}"
    if origin is tuple:
        return f"list of {_type(get_args(tp)[0])}s"
    if origin is dict:
        k, v = get_args(tp)
        return f"mapping {_type(k)} -> {_type(v)}"
    names = {int: "int", float: "float", str: "string", bool: "bool"}
    if tp not in names:
        raise TypeError(f"gen_recipe_docs: no wording for annotation {tp!r}")
    return names[tp]


def _yaml(value: Any) -> str:
    plain = to_plain(value)
    text = yaml.dump(plain, Dumper=Dumper, default_flow_style=True, sort_keys=False, width=10_000)
    text = text.strip().removesuffix("...").strip()
    if isinstance(plain, list) and len(text) > 60:  # e.g. sample prompts: the recipe has them
        return f"{len(plain)} items"
    return text


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{_yaml(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{_yaml(f.default_factory())}`"
    return "*required*"


def _section_table(prefix: str, cls: type) -> list[str]:
    ranges = getattr(cls, "_ranges", {})
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        tp = fields(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            continue  # a section: documented in its own table
        kind = _type(tp)
        if f.name in ranges:
            kind += f", {ranges[f.name][1]}"
        rows.append(
            f"| `{prefix}{f.name}` | {kind} | {_default(f)} | {MEANINGS[prefix + f.name]} |"
        )
    return rows


def _leaves(cfg: C.Config) -> dict[str, Any]:
    """Every leaf key of a config (``all_keys``) -> its plain value."""
    out = {}
    for key in all_keys(C.Config):
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        out[key] = to_plain(value)
    return out


def _recipe_tables() -> list[str]:
    """For each shipped recipe, the keys it sets to something other than the default."""
    recipes = C.available_recipes()
    defaults = _leaves(C.Config(model=C.ModelConfig(path="-"), data=C.DataConfig(path="-")))
    loaded = {name: _leaves(C.load_config(name)) for name in recipes}
    keys = [k for k in all_keys(C.Config) if k not in ("recipe", "output_dir")]
    keys = [k for k in keys if any(loaded[n][k] != defaults[k] for n in recipes)]
    lines = [
        "## The shipped recipes",
        "",
        "Each recipe file in `recipes/` explains its choices in comments. This table lists every "
        "key that at least one recipe sets to something other than the default (a blank cell "
        "means that recipe keeps the default).",
        "",
        "| key | default | " + " | ".join(f"`{n}`" for n in recipes) + " |",
        "| --- | --- | " + " | ".join("---" for _ in recipes) + " |",
    ]
    for k in keys:
        cells = ["" if loaded[n][k] == defaults[k] else f"`{_yaml(loaded[n][k])}`" for n in recipes]
        default = "*required*" if k in ("model.path", "data.path") else f"`{_yaml(defaults[k])}`"
        lines.append(f"| `{k}` | {default} | " + " | ".join(cells) + " |")
    return lines


def render() -> str:
    """The whole of docs/recipes.md."""
    keys = set(all_keys(C.Config))
    missing, stale = sorted(keys - set(MEANINGS)), sorted(set(MEANINGS) - keys)
    if missing or stale:
        raise SystemExit(
            "gen_recipe_docs: MEANINGS is out of step with jaxlora/config/recipe.py: "
            f"undocumented keys {missing}, keys that no longer exist {stale}"
        )
    lines = [HEADER.rstrip(), ""]
    lines += _recipe_tables()
    lines += ["", "## Every key", ""]
    for prefix, title, cls in SECTIONS:
        lines += [f"### {title}", ""]
        if cls.__doc__ and prefix:
            summary = cls.__doc__.strip().split("\n\n")[0]  # the first paragraph
            lines += [" ".join(summary.split()).replace("``", "`"), ""]
        lines += [*_section_table(prefix, cls), ""]
        if cls is C.DataConfig:
            lines += _sources_table()
    return "\n".join(lines).rstrip() + "\n"


def _sources_table() -> list[str]:
    """The keys of one ``data.sources`` entry; a key left out takes the ``data.`` key's value."""
    names = [f.name for f in dataclasses.fields(C.SourceConfig)]
    if sorted(names) != sorted(SOURCE_MEANINGS):
        raise SystemExit(
            f"gen_recipe_docs: SOURCE_MEANINGS has {sorted(SOURCE_MEANINGS)}, SourceConfig has "
            f"{sorted(names)}"
        )
    ranges = C.SourceConfig._ranges
    lines = [
        "#### `data.sources` entries",
        "",
        " ".join(C.SourceConfig.__doc__.split()).replace("``", "`"),
        "",
        "```yaml",
        "data:",
        "  path: null",
        "  sources:",
        "    - {path: yahma/alpaca-cleaned, weight: 3}",
        "    - {path: data/notes.jsonl, format: text, text_field: body, weight: 1}",
        "```",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for f in dataclasses.fields(C.SourceConfig):
        kind = _type(fields(C.SourceConfig)[f.name])
        if f.name in ranges:
            kind += f", {ranges[f.name][1]}"
        lines.append(f"| `{f.name}` | {kind} | {_default(f)} | {SOURCE_MEANINGS[f.name]} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/recipes.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python tools/gen_recipe_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
