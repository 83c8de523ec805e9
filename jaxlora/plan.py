"""``python -m jaxlora.plan recipe=<name|yaml> key=value ... target=<name> [search=batch]
[format=text|json]``

Compiles the recipe's real train step for a TPU or GPU target from this machine, with no
weights and no device: the model from ``config.json`` alone (a local directory or a hub id),
parameters abstract (4-bit where the recipe quantizes), the step built by the same code
``python -m jaxlora.train`` uses. Prints per-device memory (frozen base, trainable parameters,
optimizer state, temporaries, outputs, the total against the device's memory and the headroom
left), the kernels chosen, FLOPs per step and compile time. ``search=batch`` finds the largest
micro-batch that fits with 10 % headroom (with ``format=json``, ``search`` lists each
micro-batch compiled and carries the first one's plan, one row per device). These are the
compiler's figures, not a run's.
Targets: ``python -m jaxlora.plan targets``. Compiling needs libtpu / the CUDA PJRT plugin
(pyproject's ``aot`` extra, in the venv or in ``.aot-toolchain/``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import jax

from jaxlora.config import ConfigError, Section, config_from_argv, from_argv
from jaxlora.targets import TARGETS, ToolchainError
from jaxlora.targets.toolchain import add_side_directory
from jaxlora.training.plan import (
    HEADROOM,
    BatchSearch,
    Plan,
    advice_lines,
    compile_step,
    search_batch,
)

PLAN_KEYS = ("target", "search", "format")


@dataclass(frozen=True)
class PlanArgs(Section):
    """What ``python -m jaxlora.plan`` takes besides the recipe and its overrides."""

    target: str
    search: Literal["none", "batch"] = "none"
    format: Literal["text", "json"] = "text"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def render(plan: Plan) -> str:
    d = plan.per_device
    mesh = " × ".join(f"{k}={v}" for k, v in plan.mesh.items())
    head = (
        f"plan for {plan.target}: {plan.devices} device(s), mesh {mesh}, "
        f"micro-batch {plan.micro_batch} × {plan.seq_len} tokens (compiled figures, not a run)"
    )
    if d["total_bytes"] is None:  # refused by the compiler: larger than the device
        return "\n".join(
            [
                head,
                f"  DOES NOT FIT: the compiler refused the step: {d['refused']}",
                f"  frozen base       {_gib(d['frozen_bytes']):>12} per device",
                f"  trainable params  {_gib(d['trainable_bytes']):>12} per device",
                f"  optimizer state   {_gib(d['optimizer_bytes']):>12} per device",
                f"  device memory     {_gib(d['device_bytes']):>12} per device",
                f"  compile           {plan.compile_s:.1f} s (until refused)",
                *_advice(plan),
            ]
        )
    free = 1 - d["total_bytes"] / d["device_bytes"]
    rows = [
        ("frozen base", d["frozen_bytes"]),
        ("trainable params", d["trainable_bytes"]),
        ("optimizer state", d["optimizer_bytes"]),
        ("arguments (all)", d["arguments_bytes"]),
        ("temporaries", d["temp_bytes"]),
        ("outputs", d["output_bytes"]),
        ("total", d["total_bytes"]),
        ("device memory", d["device_bytes"]),
        ("in host memory", d["host_bytes"]),
    ]
    lines = [
        head,
        *(f"  {name:<17} {_gib(v):>12} per device" for name, v in rows),
        f"  headroom          {100 * free:>10.1f} %  "
        + ("fits" if d["fits"] else f"DOES NOT FIT (keep >= {100 * HEADROOM:.0f} % free)"),
        f"  kernels           matmul {plan.kernels['matmul']}, attention "
        f"{plan.kernels['attention']}",
        f"  flops per device  {_flops(plan)}",
        f"  compile           {plan.compile_s:.1f} s",
        *_advice(plan),
    ]
    return "\n".join(lines)


def _advice(plan: Plan) -> list[str]:
    if not plan.advice:
        return []
    lines = advice_lines(plan.advice)
    return ["  to make it fit, try (docs/memory.md):", *(f"    {a}" for a in lines)]


def _flops(plan) -> str:
    if plan.flops_per_device is None:  # flops_source says why
        return f"n/a ({plan.flops_source})"
    return f"{plan.flops_per_device:.3e} (matmuls in the HLO, each loop body × its trip count)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0 if argv else 2
    if argv == ["targets"]:
        for name, t in TARGETS.items():
            print(f"{name:<12} {t.num_devices} × {t.device_kind} ({t.memory_spec})")
        return 0
    jax.config.update("jax_platforms", "cpu")  # compile-only devices; no backend to start
    add_side_directory()
    ours = [a for a in argv if a.partition("=")[0] in PLAN_KEYS]
    try:
        args = from_argv(PlanArgs, ours)
        cfg = config_from_argv([a for a in argv if a not in ours])
        search = search_batch(cfg, args.target) if args.search == "batch" else None
        if search is not None and search.first is None:
            raise ValueError(
                f"search=batch: no micro-batch to try on {args.target} within the search's limit"
            )
        plan = compile_step(cfg, args.target) if search is None else search.plan or search.first
    except (ConfigError, ToolchainError, ValueError, KeyError) as e:
        # a KeyError's str() is the repr of its message: print the message itself
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"jaxlora.plan: {msg}", file=sys.stderr)
        return 2
    if args.format == "json":
        out = plan.to_json()
        if search is not None:  # the largest's plan (or, when none fits, the first's)
            out["search"] = search.to_json()
        print(json.dumps(out, indent=2))
    else:
        print(render(plan))
        if search is not None:
            print(_search_lines(search))
    return 0


def _search_lines(search: BatchSearch) -> str:
    tried = ", ".join(
        f"{t['micro_batch']} {'fits' if t['fits'] else 'does not'}" for t in search.tried
    )
    if not search.largest:
        head = "  no micro-batch fits: the plan above is the smallest (one row per device)"
    elif search.at_limit:
        head = (
            f"  largest micro-batch that fits: {search.largest} or more "
            f"(the search's limit: it compiles nothing larger)"
        )
    else:
        head = f"  largest micro-batch that fits: {search.largest}"
    return f"{head}\n  compiled micro-batches: {tried}"


if __name__ == "__main__":
    sys.exit(main())
