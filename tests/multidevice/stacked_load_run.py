"""Load a QLoRA base stacked for scan onto a mesh of fake CPU devices (``load_base(cfg,
mesh)``) and check it against the base loaded on one device and stacked afterwards; writes what
it found as JSON (tests/test_multidevice.py asserts on it).

Run in its own process (the device count is fixed at JAX start-up)::

    python tests/multidevice/stacked_load_run.py --model DIR --mesh 1,4,2 --devices 8 --out r.json

With JAXLORA_COORDINATOR / JAXLORA_NUM_PROCESSES / JAXLORA_PROCESS_ID set, several processes
form the mesh through ``jax.distributed``; each reads the whole checkpoint and keeps its shards,
and process 0 writes the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a checkpoint directory (make_deep_model)")
parser.add_argument("--mesh", default="1,4,2", help="data,fsdp,tensor")
parser.add_argument("--devices", type=int, default=8, help="fake CPU devices in this process")
parser.add_argument("--out", required=True)
args = parser.parse_args()

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.processes import with_host_devices  # noqa: E402

os.environ["XLA_FLAGS"] = with_host_devices(args.devices)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxlora.config import load_config  # noqa: E402
from jaxlora.models import stacking  # noqa: E402
from jaxlora.training import run, sharding  # noqa: E402
from jaxlora.training.distributed import maybe_initialize  # noqa: E402

maybe_initialize()


def main():
    data, fsdp, tensor = args.mesh.split(",")
    cfg = load_config(
        "demo",
        [
            f"model.path={args.model}",
            "quant.type=nf4",
            "lora.target_modules=[q_proj,v_proj,down_proj]",
            "lora.layers_to_transform=[1,2]",
            f"mesh.data={data}",
            f"mesh.fsdp={fsdp}",
            f"mesh.tensor={tensor}",
        ],
    )
    mesh = run.make_mesh(cfg)
    stacked = run.load_base(cfg, mesh)
    runs = stacking.stacked_runs(stacked.params)
    want = stacking.stack_layers(run.load_base(cfg).params, runs)  # one device, then stacked
    same_tree = jax.tree.structure(stacked.params) == jax.tree.structure(want)
    got = multihost_utils.process_allgather(stacked.params, tiled=True)
    equal = same_tree and all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )
    # the step's shardings, as the train CLI computes them after LoRA: the loaded leaves
    # already have them, so placing the base copies nothing
    model, frozen, trainable = run.init_lora(cfg, stacked, jax.random.key(0))
    frozen, trainable, runs = run.stack_for_scan(frozen, trainable, model.config, True)
    _, frozen = run.for_mesh(cfg, mesh, frozen, model.config)
    sh = run.step_shardings(cfg, mesh, frozen, trainable, {}, model.config)
    pairs = list(zip(jax.tree.leaves(frozen), jax.tree.leaves(sh.frozen), strict=True))
    on_step_shardings = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in pairs)
    placed = sharding.place(frozen, sh.frozen)
    leaves = zip(jax.tree.leaves(placed), jax.tree.leaves(frozen), strict=True)
    no_copy = all(a is b for a, b in leaves)
    stacked_specs = {
        str(x.sharding.spec)
        for path, x in jax.tree_util.tree_flatten_with_path(frozen)[0]
        if any(stacking.parse_run_key(str(getattr(k, "key", ""))) for k in path)
    }
    if jax.process_index() == 0:
        out = {
            "runs": runs,
            "equal": bool(equal),
            "on_step_shardings": on_step_shardings,
            "no_copy": no_copy,
            "stacked_specs": sorted(stacked_specs),
            "devices": jax.device_count(),
            "processes": jax.process_count(),
        }
        with open(args.out, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
