"""The training run, top to bottom: config -> base (NF4 while streaming) -> data -> LoRA ->
partition (gradients and optimizer state exist only for the trainable part) -> sharded, jitted
step -> loop (metrics, eval, samples, checkpoints) -> PEFT adapter in ``output_dir/adapter``.

``python -m jaxlora.train`` parses the recipe and calls :func:`run`; the pieces are built by
:mod:`jaxlora.training.run`, which ``export`` (and the coming ``plan``) share.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from jaxlora import data, lora
from jaxlora.config import Config, ConfigError, save_config
from jaxlora.training import checkpoint, evaluate, sharding
from jaxlora.training.monitor import NONFINITE_ADVICE, Monitor, require_sinks, wandb_args
from jaxlora.training.plan import (
    StepTooLarge,
    advice,
    advice_lines,
    memory_line,
    memory_report,
    refused_for_memory,
)
from jaxlora.training.run import (
    for_mesh,
    hf_adapter_params,
    init_lora,
    jit_eval_step,
    jit_train_step,
    load_base,
    make_mesh,
    make_tx,
    run_keys,
    run_meta,
    scans,
    stack_for_scan,
    step_shardings,
    train_batches,
)

log = logging.getLogger("jaxlora.train")


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


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

    require_sinks(cfg.train.report_to)

    # --- model: the frozen base, quantized to 4 bits as it streams in when quant.type != none;
    # a step that scans its layers gets them stacked as they stream, on the mesh already
    mesh = make_mesh(cfg)
    model = load_base(cfg, mesh if scans(cfg, mesh) else None)

    # --- data: every error (malformed line, empty set, all too long) surfaces before compute
    train_ds, val_ds = data.build_datasets(cfg.data, model.tokenizer, cfg.data_seed)
    t = cfg.train
    streamed = isinstance(train_ds, data.ExampleStream)  # config requires max_steps for these
    total_steps = t.max_steps if streamed else _total_steps(cfg, len(train_ds))

    # --- LoRA: wrap the targeted weights, then split what trains from what stays frozen
    init_key, step_key = run_keys(t.seed)
    model, frozen, trainable = init_lora(cfg, model, init_key)
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    log.info(
        "trainable parameters: %s (%.3f%% of the model)",
        f"{n_train:,}",
        100 * n_train / max(1, model.num_params),
    )

    # --- the step, sharded over the mesh; trainable params and optimizer state are donated
    # layers stacked for scan on accelerators; the model holds the stacked tree from here on
    frozen, trainable, runs = stack_for_scan(frozen, trainable, model.config, scans(cfg, mesh))
    model = model.replace(params=lora.combine(frozen, trainable))
    tx, schedule = make_tx(cfg, total_steps, trainable)
    opt_state = jax.eval_shape(tx.init, trainable)
    kernels, frozen = for_mesh(cfg, mesh, frozen, model.config, trainable)
    model = model.replace(kernels=kernels)
    sh = step_shardings(cfg, mesh, frozen, trainable, opt_state, model.config)
    frozen = sharding.place(frozen, sh.frozen)
    trainable = sharding.place(trainable, sh.trainable)
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(trainable)
    train_step = jit_train_step(cfg, model, tx, sh)
    eval_step = jit_eval_step(cfg, model)
    if kernels.platform != "cpu":  # compile now and say what the step needs (jaxlora.plan)
        train_step = _compile_and_report(train_step, trainable, opt_state, frozen, sh, cfg)

    # --- checkpoints: resume from the latest when asked; refuse a foreign one
    meta = run_meta(cfg, runs)
    pc, pi = jax.process_count(), jax.process_index()
    batches = train_batches(cfg, train_ds, pi, pc)
    start = 0
    if t.resume and latest is not None:
        trainable, opt_state, data_state, step_key, _ = ckpt.restore(
            latest, trainable, opt_state, meta
        )
        batches.restore(data_state)
        start = latest
        log.info("resumed from %s at step %d", out / "checkpoints", start)
    if main_process:  # the resolved config, once everything above has been accepted
        save_config(cfg, out / "config.yaml")
    if streamed:
        train_ds.log_plan(total_steps * t.grad_accum * t.batch_size)

    evaluate_loss = lambda tr: evaluate.eval_loss(eval_step, tr, frozen, val_ds, t.batch_size)
    report = evaluate.Report(cfg, model, frozen, trainable, evaluate_loss) if start == 0 else None

    # --- the loop
    monitor = Monitor(
        out,
        total_steps,
        start,
        enabled=main_process,
        report_to=t.report_to,
        wandb_init=wandb_args(cfg),
    )
    prev = time.perf_counter()
    try:
        for step in range(start + 1, total_steps + 1):
            local = [next(batches) for _ in range(t.grad_accum)]  # [accum] micro-batches
            local = {k: np.stack([b[k] for b in local]) for k in local[0]}
            batch = sharding.global_batch(local, sh.batch)
            trainable, opt_state, m = train_step(
                trainable, opt_state, frozen, batch, jax.random.fold_in(step_key, step)
            )
            m = jax.device_get(m)
            now = time.perf_counter()
            step_time, prev = now - prev, now
            skipped = "loss_scale" in m and not m["finite"] and np.isfinite(m["loss"])
            if not m["finite"] and not skipped:
                raise TrainingDiverged(
                    f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; "
                    f"the update was not applied and the last good checkpoint "
                    f"(step {ckpt.latest_step()}) is kept. Try: {NONFINITE_ADVICE}"
                )
            lr = float(schedule(_schedule_index(opt_state, step, m, skipped)))
            record = _step_record(step, m, lr, step_time, compiled=step == start + 1)
            record |= monitor.memory(step)
            if skipped:  # float16 gradients overflowed: the update was skipped, the scale halved
                record["skipped"] = True
                scale = float(m["loss_scale"])
                monitor.write(
                    f"step {step}: float16 gradients overflowed at loss scale {scale:g}; "
                    f"update skipped, scale lowered to {max(scale / 2, 1):g}"
                )
            if (
                val_ds is not None
                and t.eval_every
                and (step % t.eval_every == 0 or step == total_steps)
            ):
                record["eval_loss"] = evaluate_loss(trainable)
            if (
                step % t.log_every == 0
                or "eval_loss" in record
                or skipped
                or step in (1, total_steps)
            ):
                monitor.log(record)
            # every process joins (the parameters are sharded); only process 0 prints
            if t.sample_every and step % t.sample_every == 0:
                current = model.replace(params=lora.combine(frozen, trainable))
                evaluate.print_samples(current, cfg, monitor.write, step)
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
    model = model.replace(params=hf_adapter_params(frozen, trainable_host))
    summary = {"steps": total_steps, "warnings": monitor.warnings}
    if streamed:  # the realized mixture: examples and positions per source
        summary["data"] = batches.counts()
        log.info("data: realized %s", summary["data"])
    if main_process:
        model.save_adapter(out / "adapter", base_model_name_or_path=cfg.model.path)
        print(f"adapter written to {out / 'adapter'} (PEFT format)")
    if report is not None:
        summary |= report.finish(trainable, main_process)
    return summary


def _total_steps(cfg: Config, train_rows: int) -> int:
    """Optimizer steps: ``train.max_steps``, or ``train.epochs`` passes over the packed rows."""
    t = cfg.train
    rows_per_step = t.batch_size * t.grad_accum
    steps_per_epoch = train_rows // rows_per_step
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size × train.grad_accum = {rows_per_step} rows, but the training set "
            f"packs into only {train_rows} rows; lower the batch or add data"
        )
    return t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch


def _schedule_index(opt_state, step: int, m: dict, skipped: bool) -> int:
    """Where in the schedule this step's learning rate is: ``step - 1``, or under float16 loss
    scaling the optimizer's own schedule count, which a skipped update does not advance (as
    HF's Trainer does not step its scheduler then): after a skip the schedule lags the step."""
    if "loss_scale" not in m:
        return step - 1
    (count,) = [
        v
        for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
        if any(getattr(k, "tuple_name", None) == "ScaleByScheduleState" for k in path)
    ]
    count = int(jax.device_get(count))  # updates applied so far, this one included
    return count if skipped else count - 1


def _step_record(step: int, m: dict, lr: float, step_time: float, *, compiled: bool) -> dict:
    """One metrics.jsonl row. The first step of a process compiles: its time is not speed."""
    record = {
        "step": step,
        "loss": m["loss"],
        "lr": lr,
        "grad_norm": m["grad_norm"],
        "tokens": int(m["tokens"]),
        "trained_tokens": int(m["trained_tokens"]),
    }
    if "loss_scale" in m:  # float16: the dynamic loss scale this step used
        record["loss_scale"] = float(m["loss_scale"])
    if compiled:
        record["compile_time"] = step_time
    else:
        record |= {"tokens_per_sec": m["tokens"] / step_time, "step_time": step_time}
    return record


def _compile_and_report(train_step, trainable, opt_state, frozen, sh, cfg: Config):
    """The step compiled ahead of the first batch, with its per-device memory logged as
    ``python -m jaxlora.plan`` reports it; the compiled step is what the loop then calls."""
    t = cfg.train
    rows = (t.grad_accum, t.batch_size, cfg.data.max_seq_len)
    ints = ("input_ids", "targets", "segment_ids", "positions")
    batch = {
        k: jax.ShapeDtypeStruct(rows, jnp.int32 if k in ints else jnp.float32, sharding=sh.batch)
        for k in (*ints, "loss_mask")
    }
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sh.replicated)
    rows_split = sh.batch.mesh.shape["data"] * sh.batch.mesh.shape["fsdp"]
    platform = sh.batch.mesh.devices.flat[0].platform
    tries = lambda: (
        "to make it fit, try (docs/memory.md):\n  "
        + "\n  ".join(advice_lines(advice(cfg, t.batch_size, rows_split, platform)))
    )
    try:
        compiled = train_step.lower(trainable, opt_state, frozen, batch, key).compile()
    except jax.errors.JaxRuntimeError as e:
        if not refused_for_memory(e):
            raise
        first = str(e).strip().splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ")
        raise StepTooLarge(f"the compiler refused the train step: {first}\n{tries()}") from e
    stats = jax.devices()[0].memory_stats() or {}
    report = memory_report(compiled, stats.get("bytes_limit"))
    log.info("plan: the step needs %s", memory_line(report))
    if report["fits"] is False:
        log.warning("plan: %s", tries())
    return compiled
