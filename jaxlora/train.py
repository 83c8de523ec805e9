"""``python -m jaxlora.train recipe=<name|path.yaml> key.sub=value ...``

The whole run, top to bottom: config -> model (NF4 while streaming) -> data -> LoRA -> partition
(gradients and optimizer state exist only for the trainable part) -> sharded, jitted step ->
loop (metrics, eval, samples, checkpoints) -> PEFT adapter in ``output_dir/adapter``.
With no arguments it runs the built-in demo recipe: a QLoRA fine-tune of the shipped tiny model.
The run itself is :func:`jaxlora.training.loop.run` (also ``jaxlora.train.run``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import jax

from jaxlora.config import ConfigError, LoraError, config_from_argv, print_config
from jaxlora.data import DataError
from jaxlora.interop.safetensors import CheckpointError
from jaxlora.models.config import UnsupportedConfigError
from jaxlora.training.checkpoint import ResumeError
from jaxlora.training.distributed import maybe_initialize
from jaxlora.training.host import tune_allocator
from jaxlora.training.loop import TrainingDiverged, run
from jaxlora.training.plan import StepTooLarge
from jaxlora.weights import KernelUnavailableError

__all__ = ["TrainingDiverged", "main", "run"]


def main(argv: Sequence[str] | None = None) -> int:
    # force: absl (imported by orbax) has already configured the root logger
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    tune_allocator()  # before the first JAX computation (see jaxlora.host)
    try:
        cfg = config_from_argv(argv)
    except ConfigError as e:
        print(f"jaxlora.train: {e}", file=sys.stderr)
        return 2
    maybe_initialize()
    if jax.process_index() == 0:
        print_config(cfg)
    try:
        run(cfg)
    except TrainingDiverged as e:
        print(f"jaxlora.train: training diverged: {e}", file=sys.stderr)
        return 3
    except (
        ConfigError,
        DataError,
        CheckpointError,
        ResumeError,
        UnsupportedConfigError,
        LoraError,
        StepTooLarge,
        KernelUnavailableError,
    ) as e:
        print(f"jaxlora.train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
