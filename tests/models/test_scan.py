"""Scanning the layers over stacked parameters computes what the unrolled layers compute.

One model exercises every way runs split: NF4 base weights, LoRA on layers 1-3 only
(``layers_to_transform``), a sliding window on layers 2-3, so the runs are
``0 | 1 | 2-3 | 4``; the batch is packed (two segments in a row, padding in the other).

Tolerance. Scan runs the same per-layer ops in the same order; only XLA's fusion of the loop
body differs from the unrolled program's, which can move a float32 result by an ulp or two
(a transcendental such as ``exp`` or ``rsqrt`` vectorised differently). Over 5 layers of O(1)
activations that stays below ``1e-6`` of the array's scale (measured: 7e-8 on logits of
magnitude 0.4). A gradient entry is a sum over tokens and features whose terms are bounded by
the largest entry, so its error scales with that, not with the entry (a small entry is
cancellation): every comparison is ``|x - ref| <= 1e-6 · max(1, max|ref|)`` per array — far
tighter than the 1e-4 model tolerance; a wrong layer, window or mask moves them by > 1e-2.
"""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxlora import lora
from jaxlora.config.lora import LoraConfig
from jaxlora.model import Model
from jaxlora.models import registry, stacking
from jaxlora.models.falcon_config import FalconConfig
from jaxlora.models.llama import LlamaForCausalLM, init_params
from jaxlora.sampling import generate_ids
from jaxlora.training.optim import make_optimizer
from jaxlora.training.step import make_train_step
from jaxlora.weights import NF4Tensor, quantize
from tests.hf_models import make_hf_falcon, tiny_config


def assert_close(actual, expected):
    """Every array within ``1e-6`` of its own scale (see the module docstring)."""

    def one(a, b):
        b = np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, float(np.abs(b).max())))

    jax.tree.map(one, actual, expected)


CFG = dataclasses.replace(
    tiny_config(), num_hidden_layers=5, sliding_windows=(None, None, 4, 4, None)
)
LORA = LoraConfig(
    r=4,
    alpha=8,
    target_modules=("q_proj", "v_proj", "down_proj"),
    layers_to_transform=(1, 2, 3),
    init="gaussian",  # B != 0, so every LoRA weight changes the output
)


@pytest.fixture(scope="module")
def halves():
    """``(frozen, trainable)`` unstacked, and both stacked into their runs."""
    flat = flatten_dict(init_params(CFG, jax.random.key(0)), sep=".")
    quant = lambda k: k.startswith("model.layers") and k.endswith("proj.weight")
    flat = {k: quantize(v, blocksize=64) if quant(k) else v for k, v in flat.items()}
    params = lora.inject(unflatten_dict(flat, sep="."), LORA, jax.random.key(1))
    frozen, trainable = lora.partition(params, LORA)
    runs = stacking.layer_runs(params, CFG.sliding_windows)
    stacked = stacking.stack_layers(frozen, runs), stacking.stack_layers(trainable, runs)
    return (frozen, trainable), stacked, runs


def _batch():
    rng = np.random.default_rng(0)
    seg = np.array([[1] * 5 + [2] * 6, [1] * 8 + [0] * 3], np.int32)
    pos = np.array([[*range(5), *range(6)], [*range(8), 0, 0, 0]], np.int32)
    ids = rng.integers(0, CFG.vocab_size, seg.shape).astype(np.int32)
    return {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=1),
        "loss_mask": (seg > 0).astype(np.float32),
        "segment_ids": seg,
        "positions": pos,
    }


def test_runs_split_on_lora_layers_and_windows(halves):
    _, (frozen, trainable), runs = halves
    assert runs == ((0, 1), (1, 2), (2, 4), (4, 5))
    assert stacking.stacked_runs(frozen) == runs == stacking.stacked_runs(trainable)
    q = frozen["model"]["layers"]["2:4"]["self_attn"]["q_proj"]["weight"].base
    assert isinstance(q, NF4Tensor) and q.shape == (32, 32) and q.codes.shape[0] == 2


def test_stack_unstack_round_trip_is_exact(halves):
    (frozen, trainable), (sf, st), runs = halves
    for tree, stacked in ((frozen, sf), (trainable, st)):
        back = stacking.unstack_layers(stacked)
        assert jax.tree.structure(back) == jax.tree.structure(tree)
        chex.assert_trees_all_equal(back, tree)
        chex.assert_trees_all_equal(stacking.stack_layers(back, runs), stacked)
    with pytest.raises(ValueError, match="do not cover"):
        stacking.stack_layers(frozen, ((0, 2), (3, 5)))
    with pytest.raises(ValueError, match="differ in structure"):
        stacking.stack_layers(frozen, ((0, 2), (2, 5)))  # layer 0 has no LoRA, layer 1 has


@pytest.mark.parametrize("remat", ["full"])  # none: the train step and generation below
def test_scanned_logits_and_lora_grads_equal_unrolled(halves, remat):
    (frozen, trainable), (sf, st), runs = halves
    b = _batch()
    args = (b["input_ids"], b["positions"], b["segment_ids"])

    def loss(t, f, module):
        logits, _ = module.apply({"params": lora.combine(f, t)}, *args)
        return jnp.sum(logits * b["loss_mask"][..., None] ** 2), logits

    unrolled = LlamaForCausalLM(CFG, remat=remat)
    scanned = LlamaForCausalLM(CFG, remat=remat, runs=runs)
    (_, lu), gu = jax.value_and_grad(loss, has_aux=True)(trainable, frozen, unrolled)
    (_, ls), gs = jax.value_and_grad(loss, has_aux=True)(st, sf, scanned)
    assert_close(ls, lu)
    assert float(jnp.max(jnp.abs(lu))) > 0.1  # not vacuous
    assert_close(stacking.unstack_layers(gs), gu)


def test_train_step_scanned_equals_unrolled_at_step_1(halves):
    """One AdamW step from the same state: at step 1 Adam's update is ``lr·g/(|g|+eps)``, so
    gradients equal to an ulp give updates equal to an ulp of ``lr`` (A's gradients are
    nonzero here since B starts gaussian)."""
    (frozen, trainable), (sf, st), runs = halves
    tx = make_optimizer(optax.constant_schedule(1e-3), weight_decay=0.01, max_grad_norm=1.0)
    batch = {k: v[None] for k, v in _batch().items()}  # [accum=1, B, S]
    key = jax.random.key(3)

    def one(module, t, f):
        step = jax.jit(make_train_step(module, lora.combine, tx, dropout=False))
        return step(t, tx.init(t), f, batch, key)

    tu, _, mu = one(LlamaForCausalLM(CFG), trainable, frozen)
    ts, _, ms = one(LlamaForCausalLM(CFG, runs=runs), st, sf)
    assert_close((ms["loss"], ms["grad_norm"]), (mu["loss"], mu["grad_norm"]))
    assert_close(stacking.unstack_layers(ts), tu)


def test_generation_with_stacked_layers_equals_unrolled(halves):
    """Decoding scans the KV caches too (one cache per run, a leading layer axis)."""
    (frozen, trainable), (sf, st), _ = halves
    unrolled = Model(config=CFG, params=lora.combine(frozen, trainable))
    scanned = Model(config=CFG, params=lora.combine(sf, st))
    ids = jnp.asarray(_batch()["input_ids"][:, :6])
    mask = jnp.asarray([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], jnp.int32)
    gen = lambda m: generate_ids(
        m.module(),
        m.prepared_params(),
        ids,
        mask,
        jnp.asarray([-1]),
        jax.random.key(0),
        max_new_tokens=5,
    )
    assert scanned.module().runs is not None and unrolled.module().runs is None
    np.testing.assert_array_equal(gen(scanned), gen(unrolled))


def test_stacked_leaves_shard_like_one_layer_with_the_layer_axis_whole(halves):
    """Every stacked leaf gets one layer's logical axes behind an unsharded layer axis, so the
    mesh rules split each layer as they split it unrolled (NF4 codes and absmax included)."""
    from jaxlora.training.sharding import logical_axes_for

    (frozen, _), (sf, _), _ = halves
    one = dict(jax.tree_util.tree_flatten_with_path(frozen)[0])
    stacked = jax.tree_util.tree_flatten_with_path(sf)[0]
    sharded = 0
    for path, leaf in stacked:
        run = next(
            (k.key for k in path if stacking.parse_run_key(str(getattr(k, "key", "")))), None
        )
        if run is None:
            continue
        start = stacking.parse_run_key(run)[0]
        layer_path = tuple(
            jax.tree_util.DictKey(str(start)) if getattr(k, "key", None) == run else k for k in path
        )
        want = logical_axes_for(layer_path, np.ndim(one[layer_path]))
        assert logical_axes_for(path, np.ndim(leaf)) == (None, *want)
        sharded += any(a is not None for a in want)
    assert sharded >= 8  # the two norms of each of the 4 runs (flat-layout NF4 replicates)


# ---- LoRA dropout: the same masks whether the layers are scanned or not -------------------------


def _falcon_config():
    hf = make_hf_falcon("falcon40b_gqa", num_hidden_layers=4)
    return FalconConfig.from_hf(json.loads(hf.config.to_json_string()))


@pytest.mark.parametrize("family, remat", [("llama", "full"), ("falcon", "none")])
def test_lora_dropout_is_the_same_scanned_or_unrolled(family, remat):
    """``lora.dropout = 0.1``: layer ``i``'s masks are a function of the step's key, ``i`` and
    the module alone (``llama.Layers``), so scanned runs draw the unrolled layers' masks and
    logits and LoRA gradients agree within the dropout-0 tolerance above. LoRA on some layers
    only splits the runs (Llama ``0 | 1 | 2-3 | 4`` with its windows, Falcon ``0 | 1-2 | 3``);
    B starts random, so every adapter and its mask reach the logits."""
    config = CFG if family == "llama" else _falcon_config()
    lcfg = LoraConfig(
        r=4,
        alpha=8,
        target_modules=(
            ("q_proj", "o_proj", "down_proj")
            if family == "llama"
            else ("query_key_value", "dense", "dense_4h_to_h")
        ),
        layers_to_transform=(1, 2, 3) if family == "llama" else (1, 2),
        init="random",
        dropout=0.1,
    )
    params = lora.inject(registry.init_params(config, jax.random.key(0)), lcfg, jax.random.key(1))
    runs = stacking.layer_runs(params, config.sliding_windows)
    assert runs == (
        ((0, 1), (1, 2), (2, 4), (4, 5)) if family == "llama" else ((0, 1), (1, 3), (3, 4))
    )
    frozen, trainable = lora.partition(params, lcfg)
    stacked = stacking.stack_layers(frozen, runs), stacking.stack_layers(trainable, runs)
    b = _batch()
    args = (b["input_ids"], b["positions"], b["segment_ids"])

    def loss(t, f, key):
        m = Model(config=config, params=lora.combine(f, t))
        logits, _ = m.module(remat=remat).apply({"params": m.params}, *args, rngs={"dropout": key})
        return jnp.sum(logits * b["loss_mask"][..., None] ** 2), logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    key = jax.random.key(5)
    (_, lu), gu = grad(trainable, frozen, key)
    (_, ls), gs = grad(stacked[1], stacked[0], key)
    assert_close(ls, lu)
    assert_close(stacking.unstack_layers(gs), gu)
    # not vacuous: another key draws other masks, and they move the logits far beyond the bound
    (_, other), _ = grad(trainable, frozen, jax.random.key(6))
    assert float(jnp.max(jnp.abs(other - lu))) > 1e-2
