"""Orbax checkpoints of what cannot be recomputed: trainable params, optimizer state, step,
data-iterator position, RNG, and the run's LoRA/quant config with a fingerprint of the base.

The frozen base is never written. Trees are stored as flat ``{index: array}`` dicts and rebuilt
with the treedef of a freshly initialised state, so custom weight types (``LoRAWeight``) and
optax states round-trip exactly without Orbax having to know them. Orbax writes each step to a
temporary directory and renames it on commit, so a kill during a save leaves nothing that
``latest_step`` would read as valid.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class ResumeError(ValueError):
    """A checkpoint does not belong to this run (other base model, incompatible LoRA config)."""


def _flat(tree: Any) -> dict[str, Any]:
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(tree))}


def _unflat(like: Any, flat: dict[str, Any]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    if len(flat) != len(leaves):
        raise ResumeError(f"checkpoint holds {len(flat)} arrays, this run has {len(leaves)}")
    restored = [flat[f"{i:05d}"] for i in range(len(leaves))]
    for i, (a, b) in enumerate(zip(restored, leaves, strict=True)):
        if tuple(a.shape) != tuple(b.shape):
            raise ResumeError(f"checkpoint array {i} has shape {a.shape}, this run needs {b.shape}")
    return jax.tree_util.tree_unflatten(treedef, restored)


class Checkpointer:
    """``save(step, ...)`` every N steps (async), keep the last K, ``restore_latest(...)``."""

    def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, trainable, opt_state, data_state: dict, rng, meta: dict) -> None:
        state = {
            "trainable": _flat(trainable),
            "opt_state": _flat(opt_state),
            "rng": np.asarray(jax.random.key_data(rng)),
        }
        meta = {**meta, "step": step, "data_state": data_state}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def read_meta(self, step: int) -> dict:
        """The step's ``meta`` item (the run's config fingerprint, layer layout); a missing or
        damaged one is a :class:`ResumeError` naming the step directory."""
        with self._readable(step, "its meta item cannot be read"):
            return self._read_meta(step)

    def _read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, step: int, trainable_like, opt_state_like, expect_meta: dict):
        """Restore into the structure (and shardings) of ``*_like``; refuse a foreign checkpoint.

        A checkpoint that cannot be read (damaged files, a missing part) or that holds state of
        other shapes than this run's is a :class:`ResumeError` naming the step directory."""
        with self._readable(
            step, "the checkpoint holds state that cannot be restored into this run"
        ):
            return self._restore(step, trainable_like, opt_state_like, expect_meta)

    @contextlib.contextmanager
    def _readable(self, step: int, what: str):
        try:
            yield
        except ResumeError:
            raise
        except (KeyError, ValueError, OSError) as e:  # Orbax, tensorstore and json errors
            detail = " ".join(str(e).split())
            detail = detail if len(detail) <= 300 else detail[:300] + " ..."
            raise ResumeError(
                f"{self.directory / str(step)}: {what} ({type(e).__name__}: {detail}); remove "
                "that step to resume from an earlier one"
            ) from e

    def _restore(self, step: int, trainable_like, opt_state_like, expect_meta: dict):
        meta = self._read_meta(step)
        check_compatible(meta, expect_meta, self.directory / str(step))
        abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, _flat(t))
        target = {
            "trainable": abstract(trainable_like),
            "opt_state": abstract(opt_state_like),
            "rng": np.zeros_like(np.asarray(jax.random.key_data(jax.random.key(0)))),
        }
        state = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
        trainable = _unflat(trainable_like, state["trainable"])
        opt_state = _unflat(opt_state_like, state["opt_state"])
        rng = jax.random.wrap_key_data(np.asarray(state["rng"]))
        return trainable, opt_state, meta["data_state"], rng, meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_compatible(saved: dict, expected: dict, where: Path) -> None:
    """Refuse to resume when the base model or the LoRA/quant config differ; say what differs."""
    if saved.get("base_fingerprint") != expected.get("base_fingerprint"):
        raise ResumeError(
            f"{where} was trained on a different base model "
            f"({saved.get('base_model')!r}, fingerprint {saved.get('base_fingerprint')}) than "
            f"this run ({expected.get('base_model')!r}, fingerprint "
            f"{expected.get('base_fingerprint')}); refusing to resume"
        )
    if saved.get("layers", "unrolled") != expected.get("layers", "unrolled"):
        raise ResumeError(
            f"{where} holds layers {saved.get('layers', 'unrolled')} but this run has "
            f"{expected.get('layers')} (model.scan_layers differs); resume with the setting "
            "it was trained with"
        )
    for section in ("lora", "quant"):
        a, b = saved.get(section, {}), expected.get(section, {})
        diffs = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diffs:
            detail = ", ".join(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diffs)
            raise ResumeError(
                f"{where}: incompatible {section} config ({detail}); refusing to resume"
            )
    if saved.get("init_seed") != expected.get("init_seed"):
        raise ResumeError(
            f"{where}: its randomized PiSSA base (lora.init=pissa_niter_K) was drawn with "
            f"train.seed={saved.get('init_seed')}, this run has train.seed="
            f"{expected.get('init_seed')}, which draws another base; resume with the seed it "
            "was trained with"
        )


def meta_json(obj: Any) -> Any:
    """Make a config section JSON-safe (tuples -> lists) for checkpoint metadata."""
    return json.loads(json.dumps(obj, default=list))
