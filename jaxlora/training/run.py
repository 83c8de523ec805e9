"""The run builder: a :class:`~jaxlora.config.Config` -> the frozen base, the LoRA-wrapped
model, the optimizer, the mesh and the sharded, jitted step.

``python -m jaxlora.train`` (:mod:`jaxlora.training.loop`) and ``python -m jaxlora.export``
(:mod:`jaxlora.training.export`) build a run with these same functions, so a checkpoint is read
back into exactly the trees it was written from, and no command imports another.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import jax
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding

from jaxlora import data, lora
from jaxlora.config import Config, ConfigError
from jaxlora.dtypes import FLOAT_DTYPES
from jaxlora.interop import bnb, hf
from jaxlora.kernels import KERNEL_BLOCKSIZES
from jaxlora.kernels.attention_sharded import AttentionMesh
from jaxlora.lora import init as lora_init
from jaxlora.lora.stacked import hf_view
from jaxlora.model import Model, load_model
from jaxlora.models import stacking
from jaxlora.models.registry import fused_layouts, param_shapes
from jaxlora.training import checkpoint, sharding
from jaxlora.training.optim import (
    dynamic_loss_scale,
    make_optimizer,
    make_schedule,
    param_groups,
)
from jaxlora.training.step import make_eval_step, make_train_step
from jaxlora.weights import kernels_for, prepare, quantize


def check_kernel(cfg: Config) -> None:
    """``quant.kernel=fused`` asks for the Pallas 4-bit kernel on every weight: a blocksize the
    kernels do not take would fall back to dequantize-then-dot, so it is refused up front."""
    if cfg.quant.kernel == "fused" and cfg.quant.blocksize not in KERNEL_BLOCKSIZES:
        raise ConfigError(
            f"quant.kernel=fused: the Pallas 4-bit kernels take blocks of "
            f"{', '.join(map(str, KERNEL_BLOCKSIZES))}, and quant.blocksize="
            f"{cfg.quant.blocksize} would multiply by dequantize-then-dot instead; set "
            "quant.blocksize=64, or quant.kernel=auto to let the blocksize decide"
        )


def load_base(cfg: Config, mesh: Mesh | None = None) -> Model:
    """The frozen base (NF4/FP4 while streaming when ``quant.type`` says so) and its tokenizer.

    With ``mesh`` (a run whose step scans its layers: :func:`scans`) the layers arrive stacked
    into the runs the step will scan (:func:`plan_runs`), each stacked leaf written slot by
    slot as the checkpoint streams, already on its sharding over ``mesh`` (the step's, layer
    axis whole): the base is on the devices once, not loaded and then copied into stacked
    arrays (:class:`~jaxlora.models.stacking.StackingSink`).

    A 4-bit run whose LoRA init rewrites the base from its float weights (PiSSA, LoftQ:
    :func:`quantizes_after_init`) loads it in float and unstacked, as PEFT does for those
    inits, and :func:`init_lora` quantizes it."""
    check_kernel(cfg)
    after = quantizes_after_init(cfg)
    quant = None if cfg.quant.type == "none" or after else cfg.quant.type
    model = load_model(
        cfg.model.path,
        dtype=cfg.model.dtype,
        compute_dtype=cfg.model.compute_dtype,
        quant=quant,
        revision=cfg.model.revision,
        quant_kwargs={"blocksize": cfg.quant.blocksize, "double_quant": cfg.quant.double_quant},
        kernel=cfg.quant.kernel,
        sink=None if mesh is None or after else stacking_sink(cfg, mesh),
    )
    if cfg.model.tokenizer:
        model = model.replace(tokenizer=data.load_tokenizer(cfg.model.tokenizer))
    if model.tokenizer is None:
        raise ConfigError(f"model.path={cfg.model.path} has no tokenizer; set model.tokenizer")
    # The prompt format this run trains with becomes the tokenizer's chat template, so every
    # export (adapter, merged, bnb4) carries it and sampling prompts the way training did.
    data.install_template(model.tokenizer, cfg.data)
    return model


def stacking_sink(cfg: Config, mesh: Mesh) -> stacking.StackingSink:
    """Where :func:`load_base` streams a base whose layers the step scans: the runs of
    :func:`plan_runs`, every leaf on the step's sharding over ``mesh``."""
    config, raw = hf.read_config(hf.resolve(cfg.model.path, cfg.model.revision))
    return stacking.StackingSink(plan_runs(cfg, config, raw), _sharding_of(cfg, mesh, config))


def abstract_base(cfg: Config, config, raw: dict[str, Any]) -> dict:
    """The base's parameter tree from ``config.json`` alone (``config``, and ``raw``, its
    dict), every leaf a ``ShapeDtypeStruct``: ``model.dtype``, the decoder linears 4-bit as
    ``quant.type`` says, or as a bitsandbytes checkpoint stores them (which load as stored)."""
    params = param_shapes(config, FLOAT_DTYPES[cfg.model.dtype])
    if raw.get("quantization_config"):
        q = bnb.parse_quantization_config(raw["quantization_config"])
        kw = {"blocksize": 64, "quant_type": q["quant_type"], "double_quant": q["double_quant"]}
    elif cfg.quant.type != "none":
        q = cfg.quant
        kw = {"blocksize": q.blocksize, "quant_type": q.type, "double_quant": q.double_quant}
    else:
        return params
    flat = flatten_dict(params, sep=".")
    for k, v in flat.items():
        if bnb.is_quantized_weight(k):
            flat[k] = jax.eval_shape(lambda w: quantize(w, **kw), v)
    return unflatten_dict(flat, sep=".")


def plan_runs(cfg: Config, config, raw: dict[str, Any]) -> stacking.Runs:
    """The runs the step will scan, from ``config.json`` and the recipe alone: those of the
    abstract base with the recipe's LoRA injected (shapes only), which is what
    :func:`stack_for_scan` computes from the loaded base, and checks against it."""
    base = abstract_base(cfg, config, raw)
    lcfg = lora_for_shapes(cfg)
    injected = jax.eval_shape(lambda p, k: lora.inject(p, lcfg, k), base, jax.random.key(0))
    return stacking.common_runs(*lora.partition(injected, lcfg), windows=config.sliding_windows)


def _sharding_of(cfg: Config, mesh: Mesh, model_config) -> stacking.ShardingOf:
    """Where each leaf of the frozen base lives in the step: the shardings
    :func:`step_shardings` gives it (they follow a leaf's path and shape, not what LoRA wraps
    around it)."""
    rules, fused = cfg.mesh.rules, fused_layouts(model_config)

    def of(path: tuple[str, ...], leaf: Any) -> Any:
        tree = functools.reduce(lambda sub, k: {k: sub}, reversed(path), leaf)
        out = sharding.tree_shardings(tree, mesh, rules, fused)
        for k in path:
            out = out[k]
        return out

    return of


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(init_key, step_key)``: the run's two random streams from ``train.seed``, the LoRA
    initialisation's and the steps' (dropout; step ``s`` folds ``s`` in), so a tool can rebuild
    the adapter a run starts from."""
    key = jax.random.key(seed)
    key, init_key = jax.random.split(key)
    _, step_key = jax.random.split(key)
    return init_key, step_key


def train_batches(
    cfg: Config, train_ds, process_index: int = 0, process_count: int = 1
) -> data.BatchIterator | data.StreamIterator:
    """The training loop's batches of ``train_ds`` (from ``data.build_datasets``): this
    process's share of every global batch of ``train.batch_size`` rows, in the run's order
    (shuffled by ``cfg.data_seed``; a stream's own order), resumable."""
    if isinstance(train_ds, data.ExampleStream):
        return train_ds.batches(
            cfg.train.batch_size, process_index=process_index, process_count=process_count
        )
    return data.batches(
        train_ds,
        cfg.train.batch_size,
        seed=cfg.data_seed,
        process_index=process_index,
        process_count=process_count,
    )


def quantizes_after_init(cfg: Config) -> bool:
    """Whether the base is quantized after the LoRA init rather than while it loads: a 4-bit run
    whose init rewrites the base from its float weights (PiSSA's residual ``W − s·B·A``, LoftQ's
    ``NF4(W − s·B·A)``; PEFT's PiSSA and LoftQ recipes for QLoRA do the same)."""
    return cfg.quant.type != "none" and lora_init.changes_base(cfg.lora)


def lora_for_shapes(cfg: Config) -> lora.LoraConfig:
    """The LoRA config to inject into an abstract base (``plan``, the runs to stack): under
    :func:`quantizes_after_init` the default init, which gives the quantized base's shapes the
    real init ends with, where PiSSA or LoftQ cannot read an abstract 4-bit weight."""
    return dataclasses.replace(cfg.lora, init="default") if quantizes_after_init(cfg) else cfg.lora


def init_lora(cfg: Config, model: Model, key: jax.Array) -> tuple[Model, Any, Any]:
    """LoRA per the recipe: ``(model with LoRA, frozen half, trainable half)``. Under
    :func:`quantizes_after_init` the base is quantized here, as :func:`load_base` quantizes it
    for every other init: LoftQ's targets come back in NF4, PiSSA's residuals and the other
    linears are quantized by ``quant``."""
    model = model.apply_lora(cfg.lora, key=key)
    if quantizes_after_init(cfg):
        q = cfg.quant
        params = bnb.quantize_linears(
            model.params,
            q.type,
            dtype=cfg.model.dtype,
            blocksize=q.blocksize,
            double_quant=q.double_quant,
        )
        model = model.replace(params=params, quant=q.type)
    frozen, trainable = lora.partition(model.params, cfg.lora)
    return model, frozen, trainable


def scans(cfg: Config, mesh: Mesh) -> bool:
    """Whether the step scans its layers: ``model.scan_layers``, where ``auto`` is on for a
    TPU/GPU mesh (compiling unrolled layers takes minutes there: docs/planning.md) and off on
    CPU (a CPU step compiles in seconds either way)."""
    if cfg.model.scan_layers == "auto":
        return mesh.devices.flat[0].platform != "cpu"
    return cfg.model.scan_layers


def stack_for_scan(frozen, trainable, model_config, scan: bool):
    """``(frozen, trainable, runs)``: both halves with their layers stacked into the runs of
    their combined tree when ``scan`` (:mod:`jaxlora.models.stacking`), or as they are with
    ``runs = None``. Halves already stacked (loaded so: :func:`load_base` with a mesh) are
    checked to hold exactly those runs, so a checkpoint's layout does not depend on how the
    base was loaded."""
    stacked = stacking.stacked_runs(frozen)
    if not scan:
        if stacked is not None:
            raise ValueError("the base was loaded stacked for scan, but this step unrolls")
        return frozen, trainable, None
    # the halves differ where a layer's module is trained whole (modules_to_save): a run of
    # the step is one both halves can be stacked into
    windows = model_config.sliding_windows
    if stacked is None:
        runs = stacking.common_runs(frozen, trainable, windows=windows)
        return stacking.stack_layers(frozen, runs), stacking.stack_layers(trainable, runs), runs
    runs = stacking.common_runs(hf_view(frozen), hf_view(trainable), windows=windows)
    if runs != stacked:
        raise ValueError(
            f"the base was stacked while loading into the runs {stacked} (planned from "
            f"config.json and the LoRA config), but the loaded model's layers form {runs}; "
            "load it unstacked (model.scan_layers=false) and report this"
        )
    return frozen, trainable, runs


def hf_adapter_params(frozen, trainable) -> Any:
    """The Hugging Face-shaped tree for writing an adapter from a step's halves: layers
    unstacked, the frozen leaves as shapes only (an adapter holds none of them, so the base is
    never copied)."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
    return stacking.unstack_layers(lora.combine(shapes, trainable))


def make_tx(
    cfg: Config, total_steps: int, trainable: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``train.optimizer`` with the recipe's schedule and, with LoRA+
    (``lora.loraplus_lr_ratio``) or ``train.modules_to_save_lr``, per-group LRs over
    ``trainable`` (arrays or shape structs); returns ``(optimizer, schedule)``. With a float16
    backward anywhere (``model.compute_dtype`` or ``quant.compute_dtype`` float16, as torch's
    GradScaler with fp16 autocast) the loss is scaled dynamically."""
    t = cfg.train
    schedule = make_schedule(t.lr, total_steps, t.warmup_ratio, t.schedule)
    groups = None
    if cfg.lora.loraplus_lr_ratio is not None or t.modules_to_save_lr is not None:
        groups = param_groups(
            trainable,
            loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
            modules_to_save=cfg.lora.modules_to_save,
            modules_to_save_lr_scale=None
            if t.modules_to_save_lr is None
            else t.modules_to_save_lr / t.lr,
        )
    tx = make_optimizer(
        schedule,
        name=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        b1=t.adam_beta1,
        b2=t.adam_beta2,
        eps=t.adam_eps,
        momentum=t.sgd_momentum,
        min_8bit_size=t.optimizer_8bit_min_size,
        groups=groups,
    )
    if "float16" in (cfg.model.compute_dtype, cfg.quant_compute_dtype):  # any float16 backward
        tx = dynamic_loss_scale(tx, t.loss_scale_init, t.loss_scale_growth_interval)
    return tx, schedule


def run_meta(cfg: Config, runs=None) -> dict:
    """What a checkpoint must agree with to be resumed or exported: base identity, configs and
    the layout of its layers (``runs`` when stacked for scan, else ``"unrolled"``)."""
    quant = {
        "type": cfg.quant.type,
        "blocksize": cfg.quant.blocksize,
        "double_quant": cfg.quant.double_quant,
    }
    meta = {
        "base_model": cfg.model.path,
        "base_fingerprint": hf.fingerprint(hf.resolve(cfg.model.path, cfg.model.revision)),
        "lora": checkpoint.meta_json(lora.to_meta(cfg.lora)),
        "quant": checkpoint.meta_json(quant),
        "layers": "unrolled" if runs is None else checkpoint.meta_json(runs),
    }
    if cfg.lora.init.startswith("pissa_niter_"):  # its base comes from the init key
        meta["init_seed"] = cfg.train.seed
    return meta


@dataclass(frozen=True)
class Shardings:
    """Where every tree of the step lives on the mesh."""

    mesh: Mesh
    frozen: Any
    trainable: Any
    opt_state: Any  # in host memory (pinned_host) with train.optimizer_offload=host
    opt_state_device: Any  # where the update runs: opt_state's shardings in device memory
    batch: NamedSharding  # [accum, rows, seq]: rows over data × fsdp
    replicated: NamedSharding


def make_mesh(cfg: Config) -> Mesh:
    return sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)


def for_mesh(cfg: Config, mesh: Mesh, frozen, model_config, trainable=None):
    """``(kernels, frozen)``: the kernels for the mesh's devices (``quant.kernel``; the mesh's
    platform decides, not the process's default backend; 4-bit weights multiplied in
    ``quant.compute_dtype``, as bitsandbytes' ``Linear4bit``), written into the frozen tree with
    each 4-bit weight's mesh and spec (``weights.prepare``), so the step runs each kernel on
    its devices' own rows; attention kernels split the batch over the batch axes and the heads
    over the axis the ``heads`` rule names. Given ``trainable`` (arrays or shape structs), each
    LoRA weight also gets where its factors lie while multiplied (gathered over ``fsdp``:
    ``weights.lora.FactorUse``)."""
    platform = mesh.devices.flat[0].platform
    for key, dtype in (
        ("model.compute_dtype", cfg.model.compute_dtype),
        ("quant.compute_dtype", cfg.quant.compute_dtype),
    ):
        if dtype == "float16" and platform == "tpu":
            raise ConfigError(
                f"{key}=float16: TPUs compute in bfloat16 (no float16 matmul, no loss scaling "
                f"needed); set {key}=bfloat16"
            )
    kv_heads = model_config.num_key_value_heads
    kernels = kernels_for(
        list(mesh.devices.flat),
        cfg.quant.kernel,
        seq_len=cfg.data.max_seq_len,
        packed=cfg.data.packing,
        mesh=AttentionMesh(mesh, sharding.BATCH_AXES, cfg.mesh.rules.get("heads")),
        heads=(kv_heads, model_config.num_attention_heads // kv_heads),
        softcap=model_config.attn_logit_softcapping is not None,
        nf4_dtype=cfg.quant_compute_dtype,
    )
    fused = fused_layouts(model_config)
    specs = sharding.tree_shardings(frozen, mesh, cfg.mesh.rules, fused)
    adapters = None
    if trainable is not None:
        adapters = sharding.tree_shardings(trainable, mesh, cfg.mesh.rules, fused)
    frozen = prepare(
        frozen, kernels, shardings=specs, batch_axes=sharding.BATCH_AXES, adapters=adapters
    )
    return kernels, frozen


def step_shardings(
    cfg: Config, mesh: Mesh, frozen, trainable, opt_state, model_config
) -> Shardings:
    """Shardings of the step's trees from the recipe's ``mesh.rules`` (arrays or shape structs;
    ``frozen`` as :func:`for_mesh` prepared it); ``model_config`` gives the fused projections
    that split only on whole heads or groups (``registry.fused_layouts``)."""
    rules, fused = cfg.mesh.rules, fused_layouts(model_config)
    state = sharding.tree_shardings(opt_state, mesh, rules, fused)
    home = state
    if cfg.train.optimizer_offload == "host":
        home = jax.tree.map(_in_host_memory, state)
    return Shardings(
        mesh=mesh,
        frozen=sharding.tree_shardings(frozen, mesh, rules, fused),
        trainable=sharding.tree_shardings(trainable, mesh, rules, fused),
        opt_state=home,
        opt_state_device=state,
        batch=sharding.batch_sharding(mesh, ndim=3, leading=1),
        replicated=sharding.replicated(mesh),
    )


def _in_host_memory(s: NamedSharding) -> NamedSharding:
    """``s`` in its devices' pinned host memory. Devices that report no host memory space get
    no memory kind from JAX, which then places the state in device memory without a word:
    refused instead. JAX 0.10.2's compile-only GPU devices are such (``python -m jaxlora.plan``
    for a GPU target): a real GPU, a TPU and the CPU have it."""
    host = s.with_memory_kind("pinned_host")
    if host.memory_kind != "pinned_host":
        device = s.mesh.devices.flat[0]
        raise ValueError(
            f"train.optimizer_offload=host: the {device.platform} devices of this mesh "
            f"({device.device_kind}) report no host memory space, so the optimizer state would "
            "stay in device memory. JAX's compile-only GPU devices have none: plan host offload "
            "for a TPU target, or run it on the GPU itself (train.remat=offload plans on GPU "
            "targets; train.optimizer=adamw_8bit shrinks the state instead)."
        )
    return host


def jit_train_step(cfg: Config, model: Model, tx, sh: Shardings):
    """``step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics)``,
    jitted with explicit shardings; trainable params and optimizer state are donated."""
    module = model.module(remat=cfg.train.remat, mlp_chunk=cfg.train.mlp_chunk)
    offload = cfg.train.optimizer_offload == "host"
    memory = (sh.opt_state_device, sh.opt_state) if offload else None
    return jax.jit(
        make_train_step(
            module,
            lora.combine,
            tx,
            dropout=cfg.lora.dropout > 0,
            loss_chunk=cfg.train.loss_chunk,
            state_memory=memory,
        ),
        in_shardings=(sh.trainable, sh.opt_state, sh.frozen, sh.batch, sh.replicated),
        out_shardings=(sh.trainable, sh.opt_state, sh.replicated),
        donate_argnums=(0, 1),
    )


def jit_eval_step(cfg: Config, model: Model):
    """``eval_step(trainable, frozen, batch) -> (loss_sum, token_count)``, jitted."""
    module = model.module(remat=cfg.train.remat, mlp_chunk=cfg.train.mlp_chunk)
    return jax.jit(make_eval_step(module, lora.combine, loss_chunk=cfg.train.loss_chunk))
