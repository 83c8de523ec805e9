"""The optimizer update with its state in host memory (``train.optimizer_offload=host``),
streamed to the device one parameter's state at a time.

Moving the whole state with one ``device_put`` inside the step leaves the schedule to XLA, and
its scheduler starts every host -> device copy at the top of the program (it has no input but
the parameter): the whole state is on the device through the forward and backward, so the
compiled peak does not drop (docs/memory.md has the HLO). Here each parameter's state leaves
(Adam's ``mu`` and ``nu`` of that leaf, 8-bit codes and absmax, Adafactor's factors) are
fetched, updated and written back in turn, and :func:`jax.lax.optimization_barrier` makes
each fetch wait for the gradients and for the previous write-back, so the state comes to the
device one stage at a time (old and new) after the backward. Not quite all of it: XLA's host
offloader traces the first stage's copies through the barrier to the parameter and may still
start them early (docs/memory.md has the measurements).

The update of stage ``i`` calls the whole ``tx.update`` with the other stages' state as device
zeros: every optimizer here updates a leaf from that leaf's state, gradient and parameter only
(plus scalar counts and the gradients' global norm), so XLA drops the unused leaves' arithmetic
and the zeros with it. Traced once per stage: stages are capped at :data:`MAX_STAGES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

MAX_STAGES = 32  # trace cost: tx.update is traced once per stage


def streamed_update(
    tx,
    grads: Any,
    state: Any,
    params: Any,
    shardings: tuple[Any, Any],
    settle: Callable[[Any, Any], Any] | None = None,
) -> tuple[Any, Any]:
    """``tx.update(grads, state, params)`` for ``state`` in host memory: ``(updates, new
    state in host memory)``, the same values. ``shardings = (device, host)``: trees of
    ``state``'s shardings in each memory. ``settle(new, old)`` (per array) picks what is
    written back, e.g. the old state after a non-finite step."""
    settle = settle or (lambda new, old: new)
    paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    host = [leaf for _, leaf in paths]
    on_device = treedef.flatten_up_to(shardings[0])
    to_host = treedef.flatten_up_to(shardings[1])
    param_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if not param_paths:
        raise ValueError("train.optimizer_offload=host: there are no trainable parameters")
    owner = _owner([p for p, _ in paths], param_paths)
    # Leaves no parameter owns (step counts, the loss scale) are scalars: every stage fetches
    # its own copy, and the first writes them back.
    shared = [i for i, o in enumerate(owner) if o is None]
    after = grads  # the first fetch waits for the backward
    new_host: list[Any] = [None] * len(host)
    update_leaves: list[Any] = [None] * len(param_paths)
    for n, stage in enumerate(_stages(len(param_paths))):
        mine = [i for i, o in enumerate(owner) if o in stage]
        current = _fetch(host, on_device, mine + shared, after)
        zeros = lambda x: jnp.zeros(x.shape, x.dtype)  # other stages' state: never read
        leaves = [current[i] if i in current else zeros(x) for i, x in enumerate(host)]
        updates, new = tx.update(grads, treedef.unflatten(leaves), params)
        new = treedef.flatten_up_to(new)
        written = mine + shared if n == 0 else mine
        for i in written:
            new_host[i] = jax.device_put(settle(new[i], current[i]), to_host[i])
        after = [new_host[i] for i in written]
        flat_updates = jax.tree.leaves(updates)
        for p in stage:
            update_leaves[p] = flat_updates[p]
    updates = jax.tree.unflatten(jax.tree.structure(params), update_leaves)
    return updates, treedef.unflatten(new_host)


def _fetch(host: list, on_device: list, which: list[int], after: Any) -> dict[int, jax.Array]:
    """``{i: host[i] on the device}`` for ``which``, copied only once ``after`` exists."""
    moved, _ = jax.lax.optimization_barrier(([host[i] for i in which], after))
    return {i: jax.device_put(x, on_device[i]) for i, x in zip(which, moved, strict=True)}


def _owner(state_paths: Sequence[tuple], param_paths: Sequence[tuple]) -> list[int | None]:
    """For each state leaf, the index of the parameter whose path it contains (optax nests a
    params-shaped tree per moment: ``[1][0].mu['model']…['a']``); the longest wins; None
    for leaves of no parameter."""

    def contains(path: tuple, sub: tuple) -> bool:
        k = len(sub)
        return any(path[i : i + k] == sub for i in range(len(path) - k + 1))

    out = []
    for path in state_paths:
        hits = [j for j, p in enumerate(param_paths) if contains(tuple(path), tuple(p))]
        out.append(max(hits, key=lambda j: len(param_paths[j])) if hits else None)
    return out


def _stages(n: int) -> list[set[int]]:
    """Parameter indices in at most :data:`MAX_STAGES` contiguous stages of near-equal count."""
    k = min(n, MAX_STAGES)
    return [set(range(n * s // k, n * (s + 1) // k)) for s in range(k)]
