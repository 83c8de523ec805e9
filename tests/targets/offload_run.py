"""Compile the real train step for one TPU chip with each memory option and print what the
compiler reports as JSON; run by tests/targets/test_offload_plan.py in its own process, with
the compile toolchain on ``PYTHONPATH``::

    JAX_PLATFORMS=cpu python tests/targets/offload_run.py --model DIR --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from jaxlora.config import load_config  # noqa: E402
from jaxlora.training.plan import compile_step  # noqa: E402

OPTIONS = {
    "base": [],
    "optimizer_offload": ["train.optimizer_offload=host"],
    "remat_dots": ["train.remat=dots"],
    "remat_offload": ["train.remat=offload"],
}

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a directory with config.json (no weights)")
parser.add_argument("--target", default="tpu-v5e-1")
parser.add_argument("--out", required=True)
args = parser.parse_args()

out = {}
for name, extra in OPTIONS.items():
    cfg = load_config(
        "demo",
        [
            f"model.path={args.model}",
            "model.tokenizer=null",
            "model.dtype=bfloat16",
            "model.compute_dtype=bfloat16",
            "quant.type=nf4",
            "lora.target_modules=all-linear",
            "lora.r=64",
            "data.max_seq_len=256",
            "train.batch_size=4",
            *extra,
        ],
    )
    out[name] = compile_step(cfg, args.target).to_json()
with open(args.out, "w") as f:
    json.dump(out, f)
