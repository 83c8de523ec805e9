"""Layers stacked for ``scan``: ``model/layers/{0..N-1}`` <-> ``model/layers/{start:stop}``.

Compiling ``N`` unrolled decoder layers costs ``N`` times one layer (128 s for 2 of Llama-3-8B's
32 layers for a TPU here); scanning one layer over stacked parameters compiles the layer once
(MaxText's ``scan_layers``). Hugging Face names stay the tree everywhere else: loading, LoRA
matching, adapters and exports see ``layers/0 ... layers/N-1``; the train step stacks them.

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

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
        stacked[run_key(start, stop)] = jax.tree.map(_stack, *subtrees)
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
