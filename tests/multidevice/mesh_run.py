"""Five sharded QLoRA/LoRA train steps on fake CPU devices; prints losses and adapters as JSON.

Run in its own process (the device count is fixed at JAX start-up)::

    python tests/multidevice/mesh_run.py --mesh 2,2,2 --quant nf4 --devices 8 --out r.json

With JAXLORA_COORDINATOR / JAXLORA_NUM_PROCESSES / JAXLORA_PROCESS_ID set, several processes
form one mesh through ``jax.distributed`` (CPU collectives over gloo); each feeds only its own
rows of the global batch, and process 0 writes the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor")
parser.add_argument("--quant", default="none", choices=["none", "nf4"])
parser.add_argument("--devices", type=int, default=8, help="fake CPU devices in this process")
parser.add_argument("--out", required=True)
args = parser.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxlora import lora, sharding  # noqa: E402
from jaxlora.config import MeshConfig  # noqa: E402
from jaxlora.distributed import maybe_initialize  # noqa: E402
from jaxlora.models.config import LlamaConfig  # noqa: E402
from jaxlora.models.llama import LlamaForCausalLM, init_params  # noqa: E402
from jaxlora.nf4 import quantize  # noqa: E402
from jaxlora.nf4_bnb import is_quantized_weight, to_device  # noqa: E402
from jaxlora.optim import make_optimizer, make_schedule  # noqa: E402
from jaxlora.step import make_train_step  # noqa: E402

maybe_initialize()

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6)  # fmt: skip
STEPS, ACCUM, ROWS, SEQ = 5, 2, 8, 16


def build():
    params = init_params(CFG, jax.random.key(0))
    if args.quant == "nf4":
        from jaxlora.hf import flatten, unflatten

        flat = flatten(params)
        for k, v in flat.items():
            if is_quantized_weight(k):
                flat[k] = to_device(quantize(np.asarray(v)))
        params = unflatten(flat)
    lcfg = lora.LoraConfig(r=8, alpha=16, target_modules="all-linear", init="random", dropout=0.1)
    return lora.partition(lora.inject(params, lcfg, jax.random.key(1)), lcfg)


def batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        ids = rng.integers(0, CFG.vocab_size, size=(ACCUM, ROWS, SEQ + 1)).astype(np.int32)
        yield {
            "input_ids": ids[..., :-1], "targets": ids[..., 1:],
            "loss_mask": (rng.random((ACCUM, ROWS, SEQ)) > 0.2).astype(np.float32),
            "segment_ids": np.ones((ACCUM, ROWS, SEQ), np.int32),
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ACCUM, ROWS, SEQ)).copy(),
        }  # fmt: skip


def main():
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = sharding.make_mesh(data, fsdp, tensor)
    rules = MeshConfig().rules
    frozen, trainable = build()
    tx = make_optimizer(
        make_schedule(1e-3, STEPS, 0.2, "cosine"), weight_decay=0.01, max_grad_norm=1.0
    )
    frozen_sh = sharding.tree_shardings(frozen, mesh, rules)
    train_sh = sharding.tree_shardings(trainable, mesh, rules)
    frozen, trainable = sharding.place(frozen, frozen_sh), sharding.place(trainable, train_sh)
    opt = tx.init(trainable)
    opt_sh = sharding.tree_shardings(opt, mesh, rules)
    opt = sharding.place(opt, opt_sh)
    batch_sh = sharding.batch_sharding(mesh, ndim=3, leading=1)
    repl = sharding.replicated(mesh)
    step = jax.jit(
        make_train_step(LlamaForCausalLM(CFG), lora.combine, tx, dropout=True),
        in_shardings=(train_sh, opt_sh, frozen_sh, batch_sh, repl),
        out_shardings=(train_sh, opt_sh, repl),
        donate_argnums=(0, 1),
    )
    specs = {str(s.spec) for s in jax.tree.leaves(frozen_sh) + jax.tree.leaves(train_sh)}
    pc, pi = jax.process_count(), jax.process_index()
    losses = []
    for s, b in enumerate(batches()):
        rows = ROWS // pc  # this process's contiguous share of the global batch
        local = {k: v[:, pi * rows : (pi + 1) * rows] for k, v in b.items()}
        batch = sharding.global_batch(local, batch_sh)
        trainable, opt, m = step(trainable, opt, frozen, batch, jax.random.key(100 + s))
        losses.append(float(m["loss"]))
    gathered = multihost_utils.process_allgather(trainable, tiled=True)
    leaves = jax.tree_util.tree_flatten_with_path(gathered)[0]
    if pi == 0:
        out = {
            "losses": losses,
            "adapters": {
                jax.tree_util.keystr(p): np.asarray(v, np.float64).tolist() for p, v in leaves
            },
            "specs": sorted(specs),
            "devices": jax.device_count(),
            "processes": pc,
        }
        with open(args.out, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
