"""Plan a run for hardware you don't have: the real train step, built by the run builder
(:mod:`jaxlora.training.run`) from ``config.json`` alone with abstract parameters (4-bit where
the recipe quantizes), compiled for a named target's devices (:mod:`jaxlora.targets`).

What comes back is the compiler's own account, per device: arguments (frozen base, trainable
parameters, optimizer state, batch), temporaries, outputs, the total against the device's
memory, the kernels chosen, FLOPs, and how long compiling took. These are compiled figures,
not measurements of a run.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import lora, targets
from jaxlora.config import Config
from jaxlora.dtypes import FLOAT_DTYPES
from jaxlora.interop import hf
from jaxlora.model import Model
from jaxlora.targets import hlo
from jaxlora.targets.flops import FlopsUnknown, matmul_flops
from jaxlora.training.run import (
    abstract_base,
    check_kernel,
    for_mesh,
    jit_train_step,
    lora_for_shapes,
    make_tx,
    scans,
    stack_for_scan,
    step_shardings,
)

# Keep 10-20 % of device memory free (TUNING.md): a plan that leaves less does not "fit".
HEADROOM = 0.10


@dataclass
class Plan:
    """A compiled step for one target: per-device bytes, FLOPs, kernels, compile time."""

    target: str
    devices: int
    mesh: dict[str, int]
    micro_batch: int
    seq_len: int
    per_device: dict[str, int | bool]
    flops_per_device: float | None
    flops_source: str  # "hlo_matmuls" (jaxlora.targets.flops), or "unknown: <why>" with None
    kernels: dict[str, str]
    compile_s: float
    scan_layers: bool = False
    custom_calls: list[str] = field(default_factory=list)
    hlo_text: str = field(default="", repr=False)
    advice: list[dict[str, Any]] = field(default_factory=list)  # when it does not fit: advice()

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "devices": self.devices,
            "mesh": self.mesh,
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
            "per_device": self.per_device,
            "flops_per_device": self.flops_per_device,
            "flops_source": self.flops_source,
            "kernels": self.kernels,
            "compile_s": round(self.compile_s, 2),
            "scan_layers": self.scan_layers,
            "advice": self.advice,
        }


def abstract_model(cfg: Config) -> Model:
    """The base as ``config.json`` describes it, every leaf a ``ShapeDtypeStruct`` (4-bit
    decoder linears when ``quant.type`` says so): nothing is downloaded but the config."""
    check_kernel(cfg)
    config, raw = hf.read_config(hf.resolve_config(cfg.model.path, cfg.model.revision))
    params = abstract_base(cfg, config, raw)
    return Model(config=config, params=params, dtype=FLOAT_DTYPES[cfg.model.compute_dtype])


def _sds(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _bytes_per_device(tree: Any, shardings: Any) -> int:
    leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x, s in leaves)


def compile_step(cfg: Config, target: str, *, micro_batch: int | None = None) -> Plan:
    """Build the recipe's train step for ``target`` with the run builder and compile it."""
    t = targets.get_target(target)
    batch = micro_batch or cfg.train.batch_size
    seq = cfg.data.max_seq_len
    m = cfg.mesh
    mesh = targets.compile_mesh(t, data=m.data, fsdp=m.fsdp, tensor=m.tensor)
    rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % rows_split:
        raise ValueError(
            f"micro-batch {batch} does not split over data × fsdp = {rows_split} devices of "
            f"{target}; use a multiple of {rows_split} (train.batch_size)"
        )
    model = abstract_model(cfg)
    lcfg = lora_for_shapes(cfg)
    injected = jax.eval_shape(lambda p, k: lora.inject(p, lcfg, k), model.params, jax.random.key(0))
    frozen, trainable = lora.partition(injected, lcfg)
    frozen, trainable, runs = stack_for_scan(frozen, trainable, model.config, scans(cfg, mesh))
    tx, _ = make_tx(cfg, max(1, cfg.train.max_steps), trainable)
    opt_state = jax.eval_shape(tx.init, trainable)
    kernels, frozen = for_mesh(cfg, mesh, frozen, model.config, trainable)
    sh = step_shardings(cfg, mesh, frozen, trainable, opt_state, model.config)
    accum = cfg.train.grad_accum
    rows = (accum, batch, seq)
    batch_sds = {
        k: jax.ShapeDtypeStruct(rows, dt, sharding=sh.batch)
        for k, dt in (
            ("input_ids", jnp.int32),
            ("targets", jnp.int32),
            ("loss_mask", jnp.float32),
            ("segment_ids", jnp.int32),
            ("positions", jnp.int32),
        )
    }
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sh.replicated)
    model = model.replace(params=lora.combine(frozen, trainable), kernels=kernels)
    step = jit_train_step(cfg, model, tx, sh)
    start = time.perf_counter()
    lowered = step.lower(
        _sds(trainable, sh.trainable),
        _sds(opt_state, sh.opt_state),
        _sds(frozen, sh.frozen),
        batch_sds,
        key,
    )
    trees = {
        "frozen_bytes": _bytes_per_device(frozen, sh.frozen),
        "trainable_bytes": _bytes_per_device(trainable, sh.trainable),
        "optimizer_bytes": _bytes_per_device(opt_state, sh.opt_state),
    }
    plan = functools.partial(
        Plan,
        target=target,
        devices=mesh.size,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        micro_batch=batch,
        seq_len=seq,
        kernels={"matmul": kernels.nf4, "attention": kernels.attention},
        scan_layers=runs is not None,
    )
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # XLA:TPU refuses, at compile time, a program larger than the chip's memory: that is
        # the plan's answer ("does not fit"), with the compiler's own figure in its message.
        # Any other exhausted resource (a kernel's shared memory on a GPU) is a failure to
        # compile the step, not a plan.
        if not refused_for_memory(e):
            raise
        return plan(
            per_device=trees | refused_report(str(e), t.memory_bytes),
            advice=advice(cfg, batch, rows_split, t.platform),
            flops_per_device=None,
            flops_source="none: not compiled",
            compile_s=time.perf_counter() - start,
        )
    compile_s = time.perf_counter() - start
    text = compiled.as_text()
    flops, flops_source = step_flops(text)
    report = memory_report(compiled, t.memory_bytes)
    return plan(
        per_device=trees | report,
        advice=advice(cfg, batch, rows_split, t.platform) if report["fits"] is False else [],
        flops_per_device=flops,
        flops_source=flops_source,
        compile_s=compile_s,
        custom_calls=sorted(hlo.custom_call_targets(text)),
        hlo_text=text,
    )


def step_flops(hlo_text: str) -> tuple[float | None, str]:
    """``(FLOPs per device, source)`` of a compiled step: its matmuls counted from the HLO,
    every loop body × its trip count (:mod:`jaxlora.targets.flops`), on TPU and GPU alike —
    XLA's cost analysis counts a loop body once, and a compile-only GPU executable has none.
    ``(None, "unknown: <why>")`` where they cannot be counted (a loop without a trip count)."""
    try:
        return float(matmul_flops(hlo_text)), "hlo_matmuls"
    except FlopsUnknown as e:
        return None, f"unknown: {e}"


def memory_report(compiled: Any, device_bytes: int | None) -> dict[str, Any]:
    """Per-device bytes of a compiled step (XLA's ``memory_analysis``): arguments, temporaries,
    outputs, their total (donated buffers counted once; the compiler's peak where it reports
    one), and whether it fits ``device_bytes`` with :data:`HEADROOM` to spare; ``host_bytes``
    is what the step keeps in the device's host memory instead."""
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
    total -= mem.alias_size_in_bytes  # donated: trainable params and optimizer state
    # What lives in host memory (pinned_host): offloaded optimizer state and activations.
    host = mem.host_argument_size_in_bytes + mem.host_temp_size_in_bytes
    host += mem.host_output_size_in_bytes - mem.host_alias_size_in_bytes
    # The compiler's peak where it is larger — except when the step keeps buffers in host
    # memory: XLA:GPU's peak then counts them too (8B QLoRA, remat=offload, h100-1: peak 16.80
    # GiB = 7.19 arguments + 9.61 host; device buffers 9.02 GiB), which is not device memory.
    if not host:
        total = max(total, getattr(mem, "peak_memory_in_bytes", 0) or 0)
    return {
        "host_bytes": host,
        "arguments_bytes": mem.argument_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "total_bytes": total,
        "device_bytes": device_bytes,
        "fits": None if not device_bytes else total <= (1 - HEADROOM) * device_bytes,
    }


class StepTooLarge(Exception):
    """The compiler refused the train step: it needs more memory than the device has (XLA:TPU
    says so at compile time). The message has the compiler's figure and what to change."""


def refused_for_memory(e: Exception) -> bool:
    """Whether a compile error is XLA refusing a program larger than the device's memory
    (any other exhausted resource, a kernel's shared memory on a GPU, is a failure to compile)."""
    return "RESOURCE_EXHAUSTED" in str(e) and "Ran out of memory" in str(e)


def refused_report(message: str, device_bytes: int | None) -> dict[str, Any]:
    """The per-device report of a step the compiler refused for want of device memory: byte
    figures it did not produce are ``None``, ``fits`` is false and ``refused`` is its message
    (the first line, which says how much it needed)."""
    first = message.strip().splitlines()[0]
    return {
        "host_bytes": None,
        "arguments_bytes": None,
        "temp_bytes": None,
        "output_bytes": None,
        "total_bytes": None,
        "device_bytes": device_bytes,
        "fits": False,
        "refused": first.removeprefix("RESOURCE_EXHAUSTED: "),
    }


def memory_line(report: dict[str, Any]) -> str:
    """One line: total per device against the device's memory, and the headroom left."""
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    if report["total_bytes"] is None:
        return f"does not fit: the compiler refused the step ({report['refused']})"
    line = f"{gib(report['total_bytes'])} per device (temporaries {gib(report['temp_bytes'])})"
    if report["device_bytes"]:
        free = 1 - report["total_bytes"] / report["device_bytes"]
        line += f" of {gib(report['device_bytes'])}: {100 * free:.1f} % headroom"
        if not report["fits"]:
            line += f", under the {100 * HEADROOM:.0f} % to keep free: does not fit"
    return line


def advice(cfg: Config, micro_batch: int, rows_split: int, platform: str) -> list[dict[str, Any]]:
    """What to change when a step does not fit, most effective first: ``{"set": [key=value,
    ...], "why": ...}`` for each recipe lever the config leaves unused, the overrides to pass
    to ``train`` or ``plan`` and what they save (docs/memory.md measures each on the whole
    Llama-3.1-8B). The last has no overrides: more devices, or a device with more memory.
    ``platform`` ("tpu", "gpu", "cpu") names the measured saving of the tiled MLP."""
    t, out = cfg.train, []
    add = lambda why, *overrides: out.append({"set": list(overrides), "why": why})
    if cfg.quant.type == "none":
        add(
            "the frozen base in 4 bits (QLoRA): 3.9x fewer bytes than bf16 for every decoder "
            "linear (recipe=llama_qlora sets it with its LoRA settings)",
            "quant.type=nf4",
        )
    if t.remat in ("none", "dots"):
        temps = "21.00" if t.remat == "none" else "11.36"
        add(
            f"keep only each layer's input for the backward (8B, S = 2048: {temps} -> 2.06 "
            "GiB of temporaries)",
            "train.remat=full",
        )
    if micro_batch > rows_split:
        half = max(rows_split, micro_batch // 2 // rows_split * rows_split)
        add(
            "fewer rows per micro-batch, as many per optimizer step: activations scale with "
            "the micro-batch",
            f"train.batch_size={half}",
            f"train.grad_accum={t.grad_accum * micro_batch // half}",
        )
    if t.loss_chunk == 0:
        add(
            "the loss a chunk of tokens at a time, never the whole [tokens, vocab] logits "
            "(8B, S = 8192: 2.31 GiB less)",
            "train.loss_chunk=512",
        )
    if t.mlp_chunk == 0 and cfg.data.max_seq_len >= 4096:
        saved = "1.11 GiB less on a v5e" if platform == "tpu" else "1.23 GiB less on an H100"
        add(
            f"the MLP's backward a tile of tokens at a time (8B, S = 8192: {saved})",
            "train.mlp_chunk=2048",
        )
    if t.optimizer == "adamw":
        add(
            "Adam's moments in 8 bits, a quarter of the float32 state (8B, LoRA r 64: "
            "1.25 -> 0.32 GiB)",
            "train.optimizer=adamw_8bit",
        )
    add(
        "more devices (mesh.fsdp splits the base and the rows over them) or a device with "
        "more memory: python -m jaxlora.plan targets"
    )
    return out


def advice_lines(tries: list[dict[str, Any]]) -> list[str]:
    """One line per :func:`advice` entry: its overrides, then why."""
    return [" ".join([*a["set"], "--" if a["set"] else "", a["why"]]).strip() for a in tries]


SEARCH_LIMIT = 1024  # rows a step: search=batch compiles nothing larger


@dataclass
class BatchSearch:
    """What :func:`search_batch` found: ``largest`` rows a step (0: not even one per device
    fits), its ``plan``, the ``first`` plan (one row per device: the plan without a search),
    and every compile in order (``tried``: micro-batch, total bytes, fits, CPU seconds)."""

    largest: int
    plan: Plan | None
    first: Plan | None
    tried: list[dict[str, Any]] = field(default_factory=list)

    @property
    def at_limit(self) -> bool:
        """``largest`` is a lower bound, not the boundary: no larger micro-batch was compiled
        (every one fitted up to the search's limit, past which it compiles nothing)."""
        return bool(self.largest) and all(t["micro_batch"] <= self.largest for t in self.tried)

    def to_json(self) -> dict[str, Any]:
        return {
            "largest_micro_batch": self.largest,
            "at_limit": self.at_limit,
            "tried": self.tried,
            "first": None if self.first is None else self.first.to_json(),
        }


def search_batch(cfg: Config, target: str, *, limit: int = SEARCH_LIMIT) -> BatchSearch:
    """The largest micro-batch whose step fits ``target`` with :data:`HEADROOM` to spare, in
    multiples of the devices the rows split over, with its plan (:class:`BatchSearch`: largest
    0 and plan None when even the smallest does not fit). The first compile, one row per
    device, is the plan without a search, and comes back too (``first``).

    Every try is a compile (minutes for an 8B step on a TPU target), so the search guesses
    before it bisects. A step's bytes grow about linearly with its micro-batch (activations
    and temporaries per row; weights and optimizer state fixed): the line through the totals
    of the two largest micro-batches known to fit predicts the largest that does, and that
    guess, then the one above it (or below it, when the guess did not fit), are compiled to
    pin the boundary. Where the growth is not linear, or a total is unknown (the compiler
    refused the step), the search doubles until a micro-batch does not fit, then bisects.
    Whether a micro-batch fits does not decrease as it shrinks, so the answer is the boundary
    a plain doubling-and-bisecting search finds, in 4 compiles where growth is linear instead
    of about 2·log2 of the answer (tests/targets/test_targets.py counts them)."""
    verdicts: dict[int, bool] = {}
    plans: dict[int, Plan] = {}
    tried: list[dict[str, Any]] = []
    m = cfg.mesh
    mesh = targets.compile_mesh(
        targets.get_target(target), data=m.data, fsdp=m.fsdp, tensor=m.tensor
    )
    unit = mesh.shape["data"] * mesh.shape["fsdp"]
    most = limit // unit  # in units of `unit` rows

    def ok(k: int) -> bool:
        cpu = time.process_time()
        plan = compile_step(cfg, target, micro_batch=k * unit)
        d = plan.per_device
        tried.append(
            {
                "micro_batch": k * unit,
                "total_bytes": d.get("total_bytes"),
                "fits": bool(d["fits"]),
                "cpu_s": round(time.process_time() - cpu, 1),
            }
        )
        plans[k] = plan
        verdicts[k] = bool(d["fits"])
        return verdicts[k]

    def guesses() -> list[int]:
        fits = {k: p for k, p in plans.items() if verdicts[k]}
        known = [k for k in sorted(fits) if fits[k].per_device.get("total_bytes") is not None]
        if len(known) < 2 or not fits[known[-1]].per_device.get("device_bytes"):
            return []
        (a, b), per = known[-2:], fits[known[-1]].per_device
        slope = (per["total_bytes"] - fits[a].per_device["total_bytes"]) / (b - a)
        if slope <= 0:
            return []
        budget = (1 - HEADROOM) * per["device_bytes"]
        g = b + math.floor((budget - per["total_bytes"]) / slope)
        return [g, g + 1] if verdicts.get(g, True) else [g - 1]

    if most < 1:
        return BatchSearch(0, None, None, tried)
    if not ok(1):
        return BatchSearch(0, None, plans[1], tried)
    lo, hi = 1, most + 1  # lo fits; hi does not (most + 1: past the limit, never compiled)
    while hi - lo > 1:
        tries = [k for k in guesses() if lo < k < hi and k not in verdicts]
        if tries:
            k = tries[0]
        elif hi > most:  # no micro-batch known to be too big yet: double
            k = min(2 * lo, most)
        else:
            k = (lo + hi) // 2
        lo, hi = (k, hi) if ok(k) else (lo, k)
    return BatchSearch(lo * unit, plans[lo], plans[1], tried)
