"""Multi-host start-up: ``jax.distributed`` is the engine; nothing home-made.

* TPU pod slices: ``jax.distributed.initialize()`` discovers everything from the TPU metadata;
  we call it when the environment shows more than one TPU worker.
* GPU clusters (and localhost tests on CPU): set ``JAXLORA_COORDINATOR=host:port``,
  ``JAXLORA_NUM_PROCESSES`` and ``JAXLORA_PROCESS_ID`` on every process (SLURM and Open MPI
  launches are auto-detected by JAX itself when ``JAXLORA_DISTRIBUTED=auto``).

After initialisation ``jax.devices()`` lists every device of every process; each process feeds
only its rows of the global batch and only process 0 writes logs, metrics and checkpoints'
metadata (Orbax coordinates the array writes itself).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def maybe_initialize() -> bool:
    """Initialise ``jax.distributed`` when the environment asks for it; True if it did."""
    coordinator = os.environ.get("JAXLORA_COORDINATOR")
    if coordinator:
        try:
            n = int(os.environ["JAXLORA_NUM_PROCESSES"])
            pid = int(os.environ["JAXLORA_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise SystemExit(
                "JAXLORA_COORDINATOR is set, so JAXLORA_NUM_PROCESSES and JAXLORA_PROCESS_ID "
                f"must be integers on every process ({e})"
            ) from None
        if (
            jax.config.jax_platforms in (None, "", "cpu")
            and os.environ.get("JAX_PLATFORMS", "") == "cpu"
        ):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid)
    elif os.environ.get("JAXLORA_DISTRIBUTED") == "auto" or "," in os.environ.get(
        "TPU_WORKER_HOSTNAMES", ""
    ):
        jax.distributed.initialize()
    else:
        return False
    log.info(
        "jax.distributed: process %d of %d, %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )
    return True
