"""Compile the real train step (``jaxlora.training.plan.compile_step``) for one platform's
targets and print what the compiler reports as JSON; run by tests/targets/test_plan.py in its
own process, with the compile toolchain on ``PYTHONPATH``::

    JAX_PLATFORMS=cpu python tests/targets/plan_run.py --platform tpu --model DIR --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from jaxlora.config import load_config  # noqa: E402
from jaxlora.targets import flops, hlo  # noqa: E402
from jaxlora.training.plan import compile_step  # noqa: E402

# (target, data, fsdp, tensor, model.scan_layers): the one-device step unrolled (the reference
# the meshes' FLOPs are checked against), fsdp=8 scanned as a TPU or GPU run is by default, and
# data=2 x fsdp=2 x tensor=2 unrolled. Each compile costs about a minute of one CI
# core; fsdp=8 unrolled is not compiled: its FLOPs per device are exactly 1/8 of the one-device
# step's on both platforms (checked when it was), so the scanned step is compared with that.
RUNS = {
    "tpu": [
        ("tpu-v5e-1", 1, 1, 1, "false"),
        ("tpu-v5e-8", 2, 2, 2, "false"),
        ("tpu-v5e-8", 1, 8, 1, "true"),
    ],
    "gpu": [
        ("h100-1", 1, 1, 1, "false"),
        ("h100-8", 2, 2, 2, "false"),
        ("h100-8", 1, 8, 1, "true"),
    ],
}

# and, on both platforms, LoRA with a bf16 base over fsdp=8 scanned: XLA partitions its dense
# matmuls itself, and could move activations to where an adapter factor lies (FactorUse)
BF16_RUN = {"tpu": ("tpu-v5e-8", 1, 8, 1, "true"), "gpu": ("h100-8", 1, 8, 1, "true")}

ACCUM = 3  # micro-batches a step: its loop's trip count differs from the layers' (2)
PROJECTION = re.compile(r"[qkvo]_proj/")


def for_attention(gather_line: str) -> bool:
    """Whether an all-gather was made for attention itself (its inputs or outputs) rather than
    for a projection's weights: its op_name has ``self_attn/`` followed by anything but a
    q/k/v/o projection (XLA writes a combined op's paths as ``self_attn/(a:b:...)``)."""
    name = re.search(r'op_name="([^"]*)"', gather_line)
    for rest in (name.group(1) if name else "").split("self_attn/")[1:]:
        paths = rest[1 : rest.index(")")].split(":") if rest.startswith("(") else [rest]
        if not all(PROJECTION.match(p) for p in paths):
            return True
    return False


def in_layers(gather_line: str) -> bool:
    """Whether an all-gather belongs to a decoder layer (its op_name runs through
    ``model/layers/``), where every 4-bit weight is, rather than to the embedding, the head or
    the loss."""
    name = re.search(r'op_name="([^"]*)"', gather_line)
    return bool(name) and "model/layers/" in name.group(1)


parser = argparse.ArgumentParser()
parser.add_argument("--platform", choices=sorted(RUNS), required=True)
parser.add_argument("--model", required=True, help="a directory with config.json (no weights)")
parser.add_argument("--seq", type=int, nargs="+", default=[128])
parser.add_argument("--out", required=True)
args = parser.parse_args()

out = []
for seq in args.seq:
    runs = [(*r, "nf4") for r in RUNS[args.platform]] + [(*BF16_RUN[args.platform], "none")]
    for target, data, fsdp, tensor, scan, quant in runs:
        cfg = load_config(
            "demo",
            [
                f"model.path={args.model}",
                "model.tokenizer=null",
                f"quant.type={quant}",
                "quant.kernel=fused",  # the Pallas NF4 kernel (auto dequantizes on GPUs)
                "lora.target_modules=all-linear",
                "lora.r=8",
                "lora.alpha=16",
                "data.max_seq_len=" + str(seq),
                "train.batch_size=8",
                f"train.grad_accum={ACCUM}",
                "train.remat=full",
                f"mesh.data={data}",
                f"mesh.fsdp={fsdp}",
                f"mesh.tensor={tensor}",
                f"model.scan_layers={scan}",
            ],
        )
        plan = compile_step(cfg, target)
        gathers = hlo.collectives(plan.hlo_text, "all-gather")
        gathered: dict[str, int] = {}
        for g in gathers:
            for dt, n in g.bytes_by_dtype().items():
                gathered[dt] = gathered.get(dt, 0) + n
        out.append(
            plan.to_json()
            | {
                "quant": quant,
                "seq": seq,
                "gathered_in_layers": sorted(
                    {(a.dtype, a.dims) for g in gathers if in_layers(g.line) for a in g.results}
                ),
                "custom_calls": plan.custom_calls,
                "pallas_kernels": hlo.pallas_kernels(plan.hlo_text),
                "accum": ACCUM,
                "flops_by_kind": flops.flops_by_kind(plan.hlo_text),
                "loops": [
                    {"name": lp.name, "known": lp.known, "derived": lp.derived}
                    for lp in flops.loops(plan.hlo_text)
                ],
                "gathered_bytes": gathered,
                "gathered_16bit": sorted(
                    {
                        (a.dims, in_layers(g.line))
                        for g in gathers
                        for a in g.results
                        if a.dtype in ("bf16", "f16")
                    }
                ),
                "attention_gathers": [g.line[:300] for g in gathers if for_attention(g.line)],
                # what the embedding lookup gathers: table rows, or the batch's embeddings
                "lookup_gathered": sorted(
                    {
                        (a.dtype, a.dims)
                        for g in gathers
                        if "jit(_take)" in g.line
                        for a in g.results
                    }
                ),
            }
        )
with open(args.out, "w") as f:
    json.dump(out, f)
