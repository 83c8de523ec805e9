"""The chunked loss with its rows sharded over fake CPU devices against one device; prints JSON.

Run in its own process (the device count is fixed at JAX start-up)::

    python tests/training/loss_sharded_run.py --out r.json

Eight rows of 11 positions with unequal loss-token counts (one row with none), rows over
``data × fsdp`` of 4 devices (fsdp 4; data 2 × fsdp 2), the head replicated and trained,
chunks of 16 tokens (2 positions of each row, a tail of 1). It records the loss and the
gradients w.r.t. ``h`` and the head, the one-device run's, and the collectives of the compiled
step: compaction and scatter-back are per row, so no token should leave its device (no
all-gather, all-to-all or collective-permute; only all-reduces of the loss, the longest row's
count and the head's gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.processes import with_host_devices  # noqa: E402

os.environ["XLA_FLAGS"] = with_host_devices(4)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxlora.targets import hlo  # noqa: E402
from jaxlora.training.loss import chunked_ce_sum  # noqa: E402

B, S, HIDDEN, VOCAB, CHUNK = 8, 11, 16, 29, 16


def operands():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(B, S, HIDDEN)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(VOCAB, HIDDEN)) / 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, (B, S)), jnp.int32)
    mask = rng.random((B, S)) < 0.4
    mask[3] = False  # a row with no loss token
    mask[6, 1:] = True  # and one with 10
    return h, head, targets, jnp.asarray(mask, jnp.float32)


def value_and_grad(h, head, targets, mask):
    loss = lambda h, w: chunked_ce_sum(h, w, targets, mask, CHUNK)
    return jax.value_and_grad(loss, argnums=(0, 1))(h, head)


def main():
    ops = operands()
    ref_loss, (ref_dh, ref_dw) = jax.jit(value_and_grad)(*ops)
    results = {}
    for name, shape in {"fsdp4": (1, 4), "data2_fsdp2": (2, 2)}.items():
        mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp"))
        rows, rep = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())
        shardings = (rows, rep, rows, rows)
        step = jax.jit(value_and_grad, in_shardings=shardings, out_shardings=(rep, (rows, rep)))
        text = step.lower(*ops).compile().as_text()
        loss, (dh, dw) = step(*(jax.device_put(x, s) for x, s in zip(ops, shardings, strict=True)))
        results[name] = {
            "loss": float(loss),
            "dh_err": float(jnp.max(jnp.abs(dh - ref_dh)) / jnp.max(jnp.abs(ref_dh))),
            "dw_err": float(jnp.max(jnp.abs(dw - ref_dw)) / jnp.max(jnp.abs(ref_dw))),
            "dh_spec": str(dh.sharding.spec),
            "collectives": sorted({c.op for c in hlo.collectives(text)}),
        }
    out = {"devices": len(jax.devices()), "ref_loss": float(ref_loss), "results": results}
    out["trained_tokens"] = int(ops[3].sum())
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
