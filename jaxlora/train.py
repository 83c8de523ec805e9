"""``python -m jaxlora.train recipe=<name|path.yaml> key.sub=value ...``

The whole run, top to bottom: config -> model (NF4 while streaming) -> data -> LoRA -> partition
(gradients and optimizer state exist only for the trainable part) -> sharded, jitted step ->
loop (metrics, eval, samples, checkpoints) -> PEFT adapter in ``output_dir/adapter``.
With no arguments it runs the built-in demo recipe: a QLoRA fine-tune of the shipped tiny model.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlora import checkpoint, data, evaluate, hf, lora, sharding
from jaxlora.config import Config, ConfigError, config_from_argv, print_config, save_config
from jaxlora.model import Model, load_model
from jaxlora.monitor import NONFINITE_ADVICE, Monitor, peak_memory_bytes
from jaxlora.optim import make_optimizer, make_schedule
from jaxlora.step import make_eval_step, make_train_step

log = logging.getLogger("jaxlora.train")


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


def load_base(cfg: Config) -> Model:
    """The frozen base (NF4/FP4 while streaming when ``quant.type`` says so) and its tokenizer."""
    quant = None if cfg.quant.type == "none" else cfg.quant.type
    model = load_model(
        cfg.model.path, dtype=cfg.model.dtype, compute_dtype=cfg.model.compute_dtype,
        quant=quant, revision=cfg.model.revision,
        quant_kwargs={"blocksize": cfg.quant.blocksize, "double_quant": cfg.quant.double_quant},
    )  # fmt: skip
    if cfg.model.tokenizer:
        model.tokenizer = data.load_tokenizer(cfg.model.tokenizer)
    if model.tokenizer is None:
        raise ConfigError(f"model.path={cfg.model.path} has no tokenizer; set model.tokenizer")
    return model


def init_lora(cfg: Config, model: Model, key: jax.Array):
    """Inject LoRA per the recipe; returns ``(lora config, frozen, trainable)``."""
    lcfg = cfg.lora
    params = lora.inject(model.params, lcfg, key)
    model.params, model.lora = params, lcfg
    frozen, trainable = lora.partition(params, lcfg)
    return lcfg, frozen, trainable


def make_tx(cfg: Config, total_steps: int):
    """AdamW with the recipe's schedule; returns ``(optimizer, schedule)``."""
    t = cfg.train
    schedule = make_schedule(t.lr, total_steps, t.warmup_ratio, t.schedule)
    tx = make_optimizer(schedule, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                        b1=t.adam_beta1, b2=t.adam_beta2, eps=t.adam_eps)  # fmt: skip
    return tx, schedule


def run_meta(cfg: Config, lcfg) -> dict:
    """What a checkpoint must agree with to be resumed or exported: base identity and configs."""
    return {
        "base_model": cfg.model.path,
        "base_fingerprint": hf.fingerprint(hf.resolve(cfg.model.path, cfg.model.revision)),
        "lora": checkpoint.meta_json(lora.to_meta(lcfg)),
        "quant": checkpoint.meta_json({"type": cfg.quant.type, "blocksize": cfg.quant.blocksize,
                                       "double_quant": cfg.quant.double_quant}),
    }  # fmt: skip


def run(cfg: Config) -> dict:
    out = Path(cfg.output_dir)
    main_process = jax.process_index() == 0
    # An existing run is continued only when asked; checked first, so a refused run writes nothing.
    ckpt = checkpoint.Checkpointer(out / "checkpoints", keep=cfg.train.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None and not cfg.train.resume:
        ckpt.close()
        raise ConfigError(
            f"{out / 'checkpoints'} already holds step {latest}: pass train.resume=true to "
            "continue it, or choose another output_dir"
        )

    # --- model: the frozen base, quantized to 4 bits as it streams in when quant.type != none
    model = load_base(cfg)

    # --- data: every error (malformed line, empty set, all too long) surfaces before compute
    train_ds, val_ds = data.build_datasets(cfg.data, model.tokenizer, cfg.data_seed)
    t = cfg.train
    rows_per_step = t.batch_size * t.grad_accum
    steps_per_epoch = len(train_ds) // rows_per_step
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size × train.grad_accum = {rows_per_step} rows, but the training set "
            f"packs into only {len(train_ds)} rows; lower the batch or add data"
        )
    total_steps = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch

    # --- LoRA: wrap the targeted weights, then split what trains from what stays frozen
    key = jax.random.key(t.seed)
    key, init_key = jax.random.split(key)
    lcfg, frozen, trainable = init_lora(cfg, model, init_key)
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    log.info("trainable parameters: %s (%.3f%% of the model)", f"{n_train:,}",
             100 * n_train / max(1, model.num_params))  # fmt: skip

    # --- the step, sharded over the mesh; trainable params and optimizer state are donated
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tx, schedule = make_tx(cfg, total_steps)
    rules = cfg.mesh.rules
    frozen_sh = sharding.tree_shardings(frozen, mesh, rules)
    train_sh = sharding.tree_shardings(trainable, mesh, rules)
    frozen = sharding.place(frozen, frozen_sh)
    trainable = sharding.place(trainable, train_sh)
    opt_state = jax.jit(tx.init, out_shardings=None)(trainable)
    opt_sh = sharding.tree_shardings(opt_state, mesh, rules)
    opt_state = sharding.place(opt_state, opt_sh)
    module = model.module(remat=t.remat)
    repl = sharding.replicated(mesh)
    step_batch_sh = sharding.batch_sharding(mesh, ndim=3, leading=1)
    train_step = jax.jit(
        make_train_step(module, lora.combine, tx, dropout=lcfg.dropout > 0),
        in_shardings=(train_sh, opt_sh, frozen_sh, step_batch_sh, repl),
        out_shardings=(train_sh, opt_sh, repl),
        donate_argnums=(0, 1),
    )
    eval_step = jax.jit(make_eval_step(module, lora.combine))

    # --- checkpoints: resume from the latest when asked; refuse a foreign one
    meta = run_meta(cfg, lcfg)
    pc, pi = jax.process_count(), jax.process_index()
    batches = data.batches(
        train_ds, t.batch_size, seed=cfg.data_seed, process_index=pi, process_count=pc
    )
    start = 0
    key, step_key = jax.random.split(key)
    if t.resume and latest is not None:
        trainable, opt_state, data_state, step_key, _ = ckpt.restore(
            latest, trainable, opt_state, meta
        )
        batches.restore(data_state)
        start = latest
        log.info("resumed from %s at step %d", out / "checkpoints", start)
    if main_process:  # the resolved config, once everything above has been accepted
        save_config(cfg, out / "config.yaml")

    evaluate_loss = lambda tr: evaluate.eval_loss(eval_step, tr, frozen, val_ds, t.batch_size)
    report = evaluate.Report(cfg, model, frozen, trainable, evaluate_loss) if start == 0 else None

    # --- the loop
    monitor = Monitor(out, total_steps, start, enabled=main_process)
    prev = time.perf_counter()
    try:
        for step in range(start + 1, total_steps + 1):
            local = [next(batches) for _ in range(t.grad_accum)]
            local = {k: np.stack([b[k] for b in local]) for k in local[0]}
            batch = sharding.global_batch(local, step_batch_sh)
            trainable, opt_state, m = train_step(trainable, opt_state, frozen, batch,
                                                 jax.random.fold_in(step_key, step))  # fmt: skip
            m = jax.device_get(m)
            now = time.perf_counter()
            step_time, prev = now - prev, now
            if not m["finite"]:
                raise TrainingDiverged(
                    f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; "
                    f"the update was not applied and the last good checkpoint "
                    f"(step {ckpt.latest_step()}) is kept. Try: {NONFINITE_ADVICE}"
                )
            record = {"step": step, "loss": m["loss"], "lr": float(schedule(step - 1)),
                      "grad_norm": m["grad_norm"], "tokens": int(m["tokens"]),
                      "trained_tokens": int(m["trained_tokens"]),
                      "tokens_per_sec": m["tokens"] / step_time, "step_time": step_time}  # fmt: skip
            if step == start + 1:  # the first step of a process compiles: don't call it speed
                record["compile_time"] = record.pop("step_time")
                del record["tokens_per_sec"]
            if (mem := peak_memory_bytes()) is not None:
                record["peak_memory_bytes"] = mem
            if (
                val_ds is not None
                and t.eval_every
                and (step % t.eval_every == 0 or step == total_steps)
            ):
                record["eval_loss"] = evaluate_loss(trainable)
            if step % t.log_every == 0 or "eval_loss" in record or step in (1, total_steps):
                monitor.log(record)
            # every process joins (the parameters are sharded); only process 0 prints
            if t.sample_every and step % t.sample_every == 0:
                model.params = lora.combine(frozen, trainable)
                evaluate.print_samples(model, cfg, monitor.write, step)
            if t.save_every and (step % t.save_every == 0 or step == total_steps):
                ckpt.save(step, trainable, opt_state, batches.state(), step_key, meta)
            monitor.advance()
            prev = time.perf_counter()  # eval/sample/save time is not step time
    finally:
        monitor.close()
        ckpt.close()

    # --- the adapter, in PEFT format, and what the run achieved
    # Every process takes part in gathering the (possibly multi-host-sharded) adapter weights;
    # process 0 then writes them.
    trainable_host = multihost_utils.process_allgather(trainable, tiled=True)
    model.params = lora.combine(frozen, trainable_host)
    summary = {"steps": total_steps, "warnings": monitor.warnings}
    if main_process:
        model.save_adapter(out / "adapter", base_model_name_or_path=cfg.model.path)
        print(f"adapter written to {out / 'adapter'} (PEFT format)")
    if report is not None:
        summary |= report.finish(trainable, main_process)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    # force: absl (imported by orbax) has already configured the root logger
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from jaxlora.host import tune_allocator

    tune_allocator()  # before the first JAX computation (see jaxlora.host)
    try:
        cfg = config_from_argv(argv)
    except ConfigError as e:
        print(f"jaxlora.train: {e}", file=sys.stderr)
        return 2
    from jaxlora.distributed import maybe_initialize

    maybe_initialize()
    if jax.process_index() == 0:
        print_config(cfg)
    try:
        run(cfg)
    except TrainingDiverged as e:
        print(f"jaxlora.train: training diverged: {e}", file=sys.stderr)
        return 3
    except (ConfigError, data.DataError, hf.CheckpointError, checkpoint.ResumeError,
            hf.UnsupportedConfigError, lora.LoraError) as e:  # fmt: skip
        print(f"jaxlora.train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
