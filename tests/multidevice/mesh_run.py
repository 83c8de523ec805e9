"""Five sharded QLoRA/LoRA train steps on fake CPU devices, for each mesh asked; writes, per
mesh, the first step's loss and gradients, the per-step losses and the initial and final
adapters as JSON (``{"2,2,2": {...}, ...}``).

Run in its own process (the device count is fixed at JAX start-up); one process runs every mesh
it is given in turn, each on the first ``data × fsdp × tensor`` of its devices (``1,1,1``: the
one-device reference)::

    python tests/multidevice/mesh_run.py --mesh 1,1,1 2,2,2 --quant nf4 --devices 8 --out r.json

``--optimizer sgd`` (the default) takes plain gradient steps, whose result is a smooth function
of the gradients, so a float32 rounding difference stays a rounding difference;
``--optimizer adamw`` takes jaxlora's own AdamW steps (``jaxlora.training.optim``), which normalise every
entry of the update and so turn a rounding difference in a near-zero gradient into a full step.
Either way the first step's gradient is recorded in the same jitted step, with the same
shardings (an optax transform in front of the optimizer keeps it in the optimizer state).

XLA_FLAGS from the environment are kept (e.g. ``--xla_cpu_max_isa=AVX`` to emulate another
CPU); only the device count is set here. With JAXLORA_COORDINATOR / JAXLORA_NUM_PROCESSES /
JAXLORA_PROCESS_ID set, several processes form one mesh through ``jax.distributed`` (CPU
collectives over gloo); each feeds only its own rows of the global batch, and process 0 writes
the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--mesh", nargs="+", default=["1,1,1"], help="data,fsdp,tensor (each)")
parser.add_argument("--quant", default="none", choices=["none", "nf4"])
parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
parser.add_argument("--devices", type=int, default=8, help="fake CPU devices in this process")
parser.add_argument("--out", required=True)
args = parser.parse_args()

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.processes import with_host_devices  # noqa: E402

os.environ["XLA_FLAGS"] = with_host_devices(args.devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxlora import lora  # noqa: E402
from jaxlora.config import MeshConfig  # noqa: E402
from jaxlora.interop.bnb import is_quantized_weight, to_device  # noqa: E402
from jaxlora.models.config import LlamaConfig  # noqa: E402
from jaxlora.models.llama import LlamaForCausalLM, init_params  # noqa: E402
from jaxlora.training import sharding  # noqa: E402
from jaxlora.training.distributed import maybe_initialize  # noqa: E402
from jaxlora.training.optim import make_optimizer, make_schedule  # noqa: E402
from jaxlora.training.step import make_train_step  # noqa: E402
from jaxlora.weights import kernels_for, prepare, quantize  # noqa: E402

maybe_initialize()

CFG = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
)
STEPS, ACCUM, ROWS, SEQ = 5, 2, 8, 16
# Peak learning rates (warmup then cosine decay, gradients clipped at global norm 1): AdamW as
# the recipes use it. SGD: every adapter array moves by 0.4-23% of its largest entry over the
# 5 steps, and the steps stay small enough that two runs' rounding gap does not grow (measured:
# <= 10 ulps apart at lr 0.5; at lr 2 the gap grows to ~600 ulps).
LR = {"adamw": 1e-3, "sgd": 0.5}


def build():
    params = init_params(CFG, jax.random.key(0))
    if args.quant == "nf4":
        flat = flatten_dict(params, sep=".")
        for k, v in flat.items():
            if is_quantized_weight(k):
                flat[k] = to_device(quantize(np.asarray(v)))
        params = unflatten_dict(flat, sep=".")
    lcfg = lora.LoraConfig(r=8, alpha=16, target_modules="all-linear", init="random", dropout=0.1)
    return lora.partition(lora.inject(params, lcfg, jax.random.key(1)), lcfg)


def batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        ids = rng.integers(0, CFG.vocab_size, size=(ACCUM, ROWS, SEQ + 1)).astype(np.int32)
        positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ACCUM, ROWS, SEQ))
        yield {
            "input_ids": ids[..., :-1],
            "targets": ids[..., 1:],
            "loss_mask": (rng.random((ACCUM, ROWS, SEQ)) > 0.2).astype(np.float32),
            "segment_ids": np.ones((ACCUM, ROWS, SEQ), np.int32),
            "positions": positions.copy(),
        }


def record_gradients() -> optax.GradientTransformation:
    """Passes the gradient through unchanged and keeps it as its state (the step's raw
    gradient: token-mean over the whole batch, before clipping)."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda updates, state, params=None: (updates, updates),
    )


def make_tx():
    schedule = make_schedule(LR[args.optimizer], STEPS, 0.2, "cosine")
    if args.optimizer == "adamw":
        tx = make_optimizer(schedule, weight_decay=0.01, max_grad_norm=1.0)
    else:
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(schedule))
    return optax.chain(record_gradients(), tx)


def flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def to_lists(tree):
    """``{keystr: nested list}`` of a global tree, gathered onto every process."""
    gathered = multihost_utils.process_allgather(tree, tiled=True)
    return {k: np.asarray(v, np.float64).tolist() for k, v in flat(gathered).items()}


def run(mesh_arg: str) -> dict:
    data, fsdp, tensor = (int(x) for x in mesh_arg.split(","))
    size = data * fsdp * tensor
    mesh = sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:size])
    rules = MeshConfig().rules
    frozen, trainable = build()
    init = {k: np.asarray(v, np.float64).tolist() for k, v in flat(trainable).items()}
    tx = make_tx()
    # as the train CLI does (jaxlora.training.run.for_mesh): the mesh's kernels and each 4-bit
    # weight's mesh and spec written into the frozen tree, so its matmul runs on its own shards
    kernels = kernels_for(list(mesh.devices.flat))
    specs = sharding.tree_shardings(frozen, mesh, rules)
    # and where each LoRA factor lies while multiplied: gathered over fsdp (FactorUse)
    adapters = sharding.tree_shardings(trainable, mesh, rules)
    frozen = prepare(
        frozen, kernels, shardings=specs, batch_axes=sharding.BATCH_AXES, adapters=adapters
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
        assert bool(m["finite"])
        losses.append(float(m["loss"]))
        if s == 0:
            grads0 = to_lists(opt[0])
    return {
        "optimizer": args.optimizer,
        "losses": losses,
        "grads0": grads0,
        "init": init,
        "adapters": to_lists(trainable),
        "specs": sorted(specs),
        "devices": mesh.size,
        "processes": len({d.process_index for d in mesh.devices.flat}),
    }


def main():
    out = {m: run(m) for m in args.mesh}
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
