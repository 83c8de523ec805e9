"""Layers stacked for ``scan``: ``model/layers/{0..N-1}`` <-> ``model/layers/{start:stop}``.

Compiling ``N`` unrolled decoder layers costs ``N`` times one layer (128 s for 2 of Llama-3-8B's
32 layers for a TPU here); scanning one layer over stacked parameters compiles the layer once
(MaxText's ``scan_layers``). Hugging Face names stay the tree everywhere else: LoRA matching,
adapters and exports see ``layers/0 ... layers/N-1``; the train step stacks them, and a run
that scans has its base stacked as the checkpoint streams in (:class:`StackingSink`), so the
base is never on the device twice.

A *run* is consecutive layers whose subtrees have the same structure, static data (an NF4
tensor's run, a LoRA weight's scale), leaf shapes and dtypes, and the same attention window:
only such layers can share one scanned body. LoRA's ``layers_to_transform``, Qwen2's
``max_window_layers`` or any other per-layer difference just splits the runs. A run of layers
``start .. stop-1`` is stored under the key ``"start:stop"`` with a leading layer axis on every
leaf; :func:`stack_layers` and :func:`unstack_layers` are exact inverses.

The functions take any parameter-shaped tree (arrays, ``ShapeDtypeStruct`` s, weight-type
pytrees, ``None`` holes of :func:`jaxlora.lora.partition`) with the layers where its family
keeps them (:data:`LAYER_PATHS`: ``model/layers``, Falcon's ``transformer/h``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict
from jax.sharding import NamedSharding, PartitionSpec

Runs = tuple[tuple[int, int], ...]

_RUN_KEY = re.compile(r"^(\d+):(\d+)$")

# Where each family's tree holds its decoder layers (Hugging Face's names).
LAYER_PATHS = (("model", "layers"), ("transformer", "h"))


def run_key(start: int, stop: int) -> str:
    """The key of layers ``start .. stop-1`` stacked (``"0:32"``)."""
    return f"{start}:{stop}"


def parse_run_key(key: str) -> tuple[int, int] | None:
    """``(start, stop)`` of a stacked run's key, None for any other key."""
    m = _RUN_KEY.match(key)
    return None if m is None else (int(m[1]), int(m[2]))


def run_of(names: Sequence[str | None]) -> str | None:
    """The ``start:stop`` key of the stacked run a tree path lies in, wherever in the path
    (an optimizer state's leaf carries the parameter's path below its own keys); None when
    the path is not in a stacked run."""
    return next((n for n in names if n is not None and parse_run_key(n) is not None), None)


def _layers_path(params: dict) -> tuple[str, str]:
    for first, second in LAYER_PATHS:
        if isinstance(params, dict) and second in (params.get(first) or {}):
            return first, second
    paths = " or ".join("/".join(p) for p in LAYER_PATHS)
    raise ValueError(f"expected a parameter tree with {paths}")


def _layers(params: dict) -> dict:
    first, second = _layers_path(params)
    return params[first][second]


def _signature(subtree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(subtree)
    return treedef, tuple((tuple(np.shape(x)), jnp.dtype(x.dtype)) for x in leaves)


def layer_runs(params: dict, windows: Sequence[int | None] | None = None) -> Runs:
    """The runs of an unstacked tree: maximal spans of consecutive layers that can share one
    scanned body (same structure, static data, leaf shapes and dtypes, and ``windows[i]``, each
    layer's sliding window, when given)."""
    layers = _layers(params)
    n = len(layers)
    if set(layers) != {str(i) for i in range(n)}:
        raise ValueError(f"model/layers must be 0..{n - 1} (unstacked), got keys {sorted(layers)}")
    sig = [(_signature(layers[str(i)]), None if windows is None else windows[i]) for i in range(n)]
    runs, start = [], 0
    for i in range(1, n + 1):
        if i == n or sig[i] != sig[start]:
            runs.append((start, i))
            start = i
    return tuple(runs)


def common_runs(*trees: dict, windows: Sequence[int | None] | None = None) -> Runs:
    """The runs every one of ``trees`` (unstacked, same layers) can be stacked into: a run
    ends wherever it ends in any of them (a step's frozen and trainable halves, which differ
    where one layer's module is trained whole: ``modules_to_save``)."""
    starts = sorted({s for tree in trees for s, _ in layer_runs(tree, windows)})
    n = len(_layers(trees[0]))
    return tuple(zip(starts, [*starts[1:], n], strict=True))


def stacked_runs(params: dict) -> Runs | None:
    """The runs a stacked tree holds, in order; None when its layers are unstacked."""
    keys = list(_layers(params))
    runs = [parse_run_key(k) for k in keys]
    if all(r is None for r in runs):
        return None
    if any(r is None for r in runs):
        raise ValueError(f"model/layers mixes stacked and unstacked keys: {keys}")
    return tuple(sorted(runs))


def _stack(*xs: Any) -> Any:
    x = xs[0]
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype)
    if isinstance(x, np.ndarray):
        return np.stack(xs)
    return jnp.stack(xs)


def stack(subtrees: Sequence[Any]) -> Any:
    """Alike subtrees stacked leaf by leaf along a new leading axis (shapes stay shapes)."""
    return jax.tree.map(_stack, *subtrees)


def stack_layers(params: dict, runs: Runs) -> dict:
    """``params`` with ``model/layers/i`` for ``i`` in each run ``(start, stop)`` stacked along a
    new leading axis under ``"start:stop"``. ``runs`` must tile ``0..N-1`` (take them from
    :func:`layer_runs` of the whole tree, so a frozen and a trainable half stack alike)."""
    layers = _layers(params)
    n = len(layers)
    if [i for r in runs for i in range(*r)] != list(range(n)):
        raise ValueError(f"runs {runs} do not cover layers 0..{n - 1} in order")
    stacked = {}
    for start, stop in runs:
        subtrees = [layers[str(i)] for i in range(start, stop)]
        sigs = {_signature(t) for t in subtrees}
        if len(sigs) != 1:
            raise ValueError(f"layers {start}..{stop - 1} differ in structure; cannot stack them")
        stacked[run_key(start, stop)] = stack(subtrees)
    return _with_layers(params, stacked)


def unstack_layers(params: dict) -> dict:
    """Inverse of :func:`stack_layers`: the Hugging Face ``model/layers/0 ... N-1`` (an
    unstacked tree comes back as it is)."""
    runs = stacked_runs(params)
    if runs is None:
        return params
    layers = _layers(params)
    out = {}
    for start, stop in runs:
        sub = layers[run_key(start, stop)]
        for i in range(stop - start):
            out[str(start + i)] = jax.tree.map(lambda x, i=i: _index(x, i), sub)
    return _with_layers(params, out)


def _index(x: Any, i: int) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[i]


def _with_layers(params: dict, layers: dict) -> dict:
    first, second = _layers_path(params)
    return params | {first: params[first] | {second: layers}}


# ---- between the two namings: one layer's path <-> its run's path and slot ----------------------


def layer_slot(path: Sequence[str], runs: Runs) -> tuple[tuple[str, ...], int] | None:
    """``(stacked path, slot)`` of a path inside layer ``i`` (``("model", "layers", "3",
    ...)`` -> ``(("model", "layers", "2:5", ...), 1)``), None for a path outside the layers."""
    if len(path) < 3 or tuple(path[:2]) not in LAYER_PATHS or not path[2].isdigit():
        return None
    i = int(path[2])
    for start, stop in runs:
        if start <= i < stop:
            return (*path[:2], run_key(start, stop), *path[3:]), i - start
    raise ValueError(f"layer {i} ({'.'.join(path)}) is in none of the runs {runs}")


def run_layer_paths(path: Sequence[str]) -> list[tuple[str, ...]] | None:
    """The Hugging Face paths a stacked path holds, one per slot (``("model", "layers",
    "2:4", "mlp")`` -> ``[("model", "layers", "2", "mlp"), ("model", "layers", "3", "mlp")]``);
    None for a path outside the stacked runs."""
    run = parse_run_key(path[2]) if len(path) >= 3 and tuple(path[:2]) in LAYER_PATHS else None
    if run is None:
        return None
    return [(*path[:2], str(i), *path[3:]) for i in range(*run)]


# ---- writing a streamed checkpoint straight into stacked arrays --------------------------------

# ``sharding_of(path, leaf)``: where the leaf at ``path`` of the finished tree lives (a sharding,
# or a pytree of them for a weight type such as an NF4 tensor), given its shape as
# ``ShapeDtypeStruct`` leaves (a stacked leaf with its layer axis); None leaves it where it is.
ShardingOf = Callable[[tuple[str, ...], Any], Any]


@functools.cache
def _slot_writer(sharding: NamedSharding | None) -> Callable:
    write = lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0)
    if sharding is None:
        return jax.jit(write, donate_argnums=0)
    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


def _write_slot(buf: jax.Array, x: Any, i: int) -> jax.Array:
    """``buf`` with ``x`` written at ``buf[i]``, in place: ``buf`` is donated, so the update
    allocates nothing but ``x`` (sent to one slot's sharding first, on a mesh)."""
    sharding = buf.sharding if isinstance(buf.sharding, NamedSharding) else None
    if sharding is not None:
        x = jax.device_put(x, NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:])))
    return _slot_writer(sharding)(buf, x, i)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


class StackingSink:
    """Takes a checkpoint's leaves one at a time, by Hugging Face path, and builds the tree
    with the layers of ``runs`` already stacked (what :func:`stack_layers` would make of the
    loaded tree, leaf for leaf).

    The first layer of a run to arrive with a leaf allocates that leaf's stacked array
    ``[stop - start, ...]`` (zeros, on its sharding: ``sharding_of`` with an unsharded layer
    axis); every layer then writes its slot in place (a jitted update with the stacked array
    donated). The whole base is therefore on the device once, plus the one tensor in
    flight — loading then stacking holds it twice — and the host holds one tensor at a time,
    whatever order the checkpoint stores its layers in (a host-side stack would have to keep
    each stacked leaf until its last layer arrived: with sorted keys, the whole base). Leaves
    outside the layers go to their sharding as they arrive. A layer leaf whose shape, dtype
    or weight type differs from its run's is refused naming the key; :meth:`tree` refuses a
    slot never written.
    """

    def __init__(self, runs: Runs, sharding_of: ShardingOf | None = None):
        self.runs = runs
        self.sharding_of = sharding_of or (lambda path, leaf: None)
        self.flat: dict[tuple[str, ...], Any] = {}
        self.signature: dict[tuple[str, ...], tuple] = {}
        self.filled: dict[tuple[str, ...], set[int]] = {}

    def put(self, path: Sequence[str], leaf: Any) -> None:
        path = tuple(path)
        at = layer_slot(path, self.runs)
        if at is None:
            shardings = self.sharding_of(path, jax.tree.map(_abstract, leaf))
            self.flat[path] = leaf if shardings is None else jax.device_put(leaf, shardings)
            return
        stacked_path, slot = at
        if stacked_path not in self.flat:
            self._allocate(stacked_path, leaf)
        sig = _signature(leaf)
        if sig != self.signature[stacked_path]:
            raise ValueError(
                f"{'.'.join(path)}: {sig[1]} differs from the other layers of its run "
                f"{stacked_path[2]} ({self.signature[stacked_path][1]}); they cannot be stacked"
            )
        if slot in self.filled[stacked_path]:
            raise ValueError(f"{'.'.join(path)} arrived twice")
        buf, treedef = jax.tree.flatten(self.flat[stacked_path])
        new = [_write_slot(b, x, slot) for b, x in zip(buf, jax.tree.leaves(leaf), strict=True)]
        self.flat[stacked_path] = jax.tree.unflatten(treedef, new)
        self.filled[stacked_path].add(slot)

    def _allocate(self, stacked_path: tuple[str, ...], leaf: Any) -> None:
        start, stop = parse_run_key(stacked_path[2])
        n = stop - start
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *np.shape(x)), x.dtype), leaf)
        shardings = self.sharding_of(stacked_path, shapes)
        zeros = lambda s, sh=None: jnp.zeros(s.shape, s.dtype, device=sh)
        self.flat[stacked_path] = (
            jax.tree.map(zeros, shapes)
            if shardings is None
            else jax.tree.map(zeros, shapes, shardings)
        )
        self.signature[stacked_path] = _signature(leaf)
        self.filled[stacked_path] = set()

    def tree(self) -> dict:
        """The loaded tree, its layers stacked; every slot of every run must have arrived."""
        for path, slots in self.filled.items():
            start, stop = parse_run_key(path[2])
            missing = sorted(set(range(stop - start)) - slots)
            if missing:
                layers = ", ".join(str(start + j) for j in missing[:8])
                raise ValueError(f"{'.'.join(path)}: layer(s) {layers} never arrived")
        return unflatten_dict(self.flat)
