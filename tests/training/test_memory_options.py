"""What the memory options change and what they must not: float16 with dynamic loss scaling
(an overflowing step is skipped and the scale lowered), optimizer state in host memory (the
same numbers as without). Activations offloaded to host memory (``train.remat=offload``) are
checked beside the other remat policies in tests/training/test_train_step.py."""

from __future__ import annotations

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlora import lora
from jaxlora.config import ConfigError, load_config
from jaxlora.lora import LoraConfig
from jaxlora.models.llama import LlamaForCausalLM, init_params
from jaxlora.training import run as run_builder
from jaxlora.training.offload import streamed_update
from jaxlora.training.optim import (
    LossScaleState,
    dynamic_loss_scale,
    make_optimizer,
    param_groups,
)
from jaxlora.training.step import make_train_step
from jaxlora.weights.nf4 import quantize
from tests.hf_models import tiny_config
from tests.training.test_train_step import _batch

CFG = tiny_config()


def _lora_trees():
    params = init_params(CFG, jax.random.key(0))
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random")
    return lora.partition(lora.inject(params, cfg, jax.random.key(1)), cfg)


def _batches(n: int, accum: int = 2, micro: int = 2):
    out = []
    for s in range(n):
        b = _batch(accum * micro, seed=s)
        out.append({k: v.reshape(accum, micro, *v.shape[1:]) for k, v in b.items()})
    return out


def test_float16_overflow_is_skipped_the_scale_halves_then_grows():
    """Step 1 at scale 2^40: the float16 backward overflows (the logits' cotangent is ~2^40 /
    tokens), so nothing moves but the scale (halved, the optimizer state kept). From a sane
    scale, two finite steps (growth_interval=2) double it and the adapters train."""
    frozen, trainable = _lora_trees()
    module = LlamaForCausalLM(CFG, dtype=jnp.float16)
    inner = make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.0, max_grad_norm=1.0)
    tx = dynamic_loss_scale(inner, init_scale=2.0**40, growth_interval=2)
    step = jax.jit(make_train_step(module, lora.combine, tx, dropout=False))
    state = tx.init(trainable)
    batches = _batches(3)

    new, new_state, m = step(trainable, state, frozen, batches[0], jax.random.key(0))
    assert not bool(m["finite"]) and np.isfinite(float(m["loss"]))
    assert float(m["loss_scale"]) == 2.0**40
    assert float(new_state.scale) == 2.0**39 and int(new_state.good_steps) == 0
    chex.assert_trees_all_equal(new, trainable)
    chex.assert_trees_all_equal(new_state.inner, state.inner)

    state = LossScaleState(jnp.float32(2.0**10), jnp.zeros([], jnp.int32), state.inner)
    params = trainable
    for i, b in enumerate(batches[1:]):
        params, state, m = step(params, state, frozen, b, jax.random.key(i))
        assert bool(m["finite"])
    assert float(state.scale) == 2.0**11 and int(state.good_steps) == 0
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, trainable)
    assert all(d > 0 for d in jax.tree.leaves(moved))


def test_scaled_float16_gradients_are_the_unscaled_ones():
    """Loss scaling only moves the float16 backward's range: at a scale where nothing
    overflows, the update equals float16 training without scaling to float16 precision of the
    backward (the grads pass through float16 activations: 2^-10 relative per rounding; the
    scaled and unscaled backward round differently, compared after AdamW's normalization)."""
    frozen, trainable = _lora_trees()
    module = LlamaForCausalLM(CFG, dtype=jnp.float16)
    sgd = lambda: make_optimizer(
        optax.constant_schedule(1.0), name="sgd", weight_decay=0.0, max_grad_norm=0
    )
    plain = jax.jit(make_train_step(module, lora.combine, sgd(), dropout=False))
    tx = dynamic_loss_scale(sgd(), init_scale=2.0**8, growth_interval=100)
    scaled = jax.jit(make_train_step(module, lora.combine, tx, dropout=False))
    b = _batches(1)[0]
    p1, _, m1 = plain(trainable, sgd().init(trainable), frozen, b, jax.random.key(0))
    p2, _, m2 = scaled(trainable, tx.init(trainable), frozen, b, jax.random.key(0))
    assert float(m1["loss"]) == float(m2["loss"])  # the forward is the same program
    g1 = jax.tree.map(jnp.subtract, trainable, p1)  # lr 1: the update is the gradient
    g2 = jax.tree.map(jnp.subtract, trainable, p2)
    # float16 has 11 significant bits: a gradient element summed over the batch's tokens in
    # float16 differs by a few 2^-11 relative between two scalings; elements near zero are
    # bounded by that of the largest element of their tensor.
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(c, a, rtol=0, atol=float(jnp.max(jnp.abs(a))) * 2**-7)


def _step_losses(memory: bool, remat: str = "none"):
    frozen, trainable = _lora_trees()
    module = LlamaForCausalLM(CFG, remat=remat)
    tx = make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.01, max_grad_norm=1.0)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state_sh = jax.tree.map(lambda _: dev, tx.init(trainable))
    host_sh = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), state_sh)
    mem = (state_sh, host_sh) if memory else None
    step = jax.jit(
        make_train_step(module, lora.combine, tx, dropout=False, state_memory=mem),
        out_shardings=(None, host_sh if memory else state_sh, None),
    )
    state = jax.device_put(tx.init(trainable), host_sh if memory else state_sh)
    losses, first = [], None
    for i, b in enumerate(_batches(3)):
        trainable, state, m = step(trainable, state, frozen, b, jax.random.key(i))
        losses.append(float(m["loss"]))
        first = first or (trainable, jax.tree.map(np.asarray, state))
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state)}
    return losses, first, kinds


def test_optimizer_state_in_host_memory_trains_the_same():
    """The state lives in pinned_host between steps and is updated one parameter's state at a
    time (jaxlora.training.offload); losses equal the device-resident run's (1e-6), and after
    step 1 the state exactly, the adapters to a bound derived below."""
    ref_losses, (ref, ref_state), kinds = _step_losses(memory=False)
    losses, (got, state), host_kinds = _step_losses(memory=True)
    assert host_kinds == {"pinned_host"} and kinds == {"device"}
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    chex.assert_trees_all_equal(state, ref_state)
    # The staged program makes XLA (CPU) compute Adam's bias corrections m/(1-b1^t), v/(1-b2^t)
    # as m·(1/(1-b1^t)): one more rounding (2^-24 relative) in m̂ and v̂, so m̂/(√v̂+eps) moves
    # by at most ~2^-22 relative (≤ 2.4e-7 at step 1, where |m̂/√v̂| ≤ 1) and lr=1e-2 times
    # that is ≤ 2.4e-9; the new parameter then rounds to a neighbouring float32 at worst
    # (|p| < 1: 6e-8). atol 1e-7 covers both; later steps amplify it through Adam's
    # normalization, so the comparison is at step 1 (the losses are compared at every step).
    chex.assert_trees_all_close(got, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("key", ["model.compute_dtype", "quant.compute_dtype"])
def test_float16_is_refused_on_a_tpu_naming_bfloat16(key):
    cfg = load_config("demo", [f"{key}=float16"])
    tpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="tpu")]))
    with pytest.raises(ConfigError, match=f"{key}=float16.*{key}=bfloat16"):
        run_builder.for_mesh(cfg, tpu, {}, None)


@pytest.mark.parametrize(
    "overrides, dtype",
    [
        ([], "float32"),  # the demo's model.compute_dtype
        (["model.compute_dtype=bfloat16"], "bfloat16"),
        (["quant.compute_dtype=bfloat16"], "bfloat16"),  # float32 activations, bf16 4-bit
        (["quant.compute_dtype=float16"], "float16"),  # PEFT's QLoRA on a T4
    ],
)
def test_quant_compute_dtype_reaches_every_4bit_weight(overrides, dtype):
    """``quant.compute_dtype`` (unset: ``model.compute_dtype``) is what the run's 4-bit weights
    multiply in: it is in the kernels ``for_mesh`` writes into the frozen tree; a float16 one
    has a float16 backward, so the loss is scaled as for float16 activations."""
    cfg = load_config("demo", overrides)
    w = quantize(np.ones((CFG.hidden_size, CFG.intermediate_size), np.float32))
    frozen = {"model": {"layers": {"0": {"mlp": {"down_proj": {"weight": w}}}}}}
    kernels, frozen = run_builder.for_mesh(cfg, run_builder.make_mesh(cfg), frozen, CFG)
    assert kernels.nf4_dtype == dtype
    assert frozen["model"]["layers"]["0"]["mlp"]["down_proj"]["weight"].run.kernels == kernels
    tx, _ = run_builder.make_tx(cfg, 10, {"w": jnp.zeros((2, 2))})
    assert isinstance(tx.init({"w": jnp.zeros((2, 2))}), LossScaleState) == (dtype == "float16")


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("name", ["adamw_8bit", "adafactor", "lion", "sgd"])
def test_streamed_update_is_the_update_for_every_optimizer(name, stacked):
    """Each optimizer's state split by parameter (8-bit codes and absmax, Adafactor's factors,
    LoRA+ groups' masks; the loss scale shared) and streamed stage by stage gives tx.update's
    updates and state: one update from a non-zero state (a first tx.update), compared after one
    more; every optimizer here updates a leaf from its own state, so the arithmetic is the same
    up to XLA's choice of x/c or x·(1/c) for a scalar c (one rounding: rtol 1e-6)."""
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "q": {"a": jax.random.normal(keys[0], (8, 600)), "b": jax.random.normal(keys[1], (600, 8))},
        "norm": jax.random.normal(keys[2], (24,)),
    }
    if stacked:  # two layers scanned: the 8-bit and Adafactor states are vmapped per layer
        params = {"model": {"layers": {"0:2": jax.tree.map(lambda x: jnp.stack([x, -x]), params)}}}
    grads = jax.tree.map(lambda p: 0.1 * jnp.sin(3 * p + 1), params)
    groups = param_groups(params, loraplus_lr_ratio=4.0)
    inner = make_optimizer(
        optax.constant_schedule(1e-2),
        name=name,
        weight_decay=0.01,
        max_grad_norm=1.0,
        momentum=0.9,
        min_8bit_size=4096,
        groups=groups,
    )
    tx = dynamic_loss_scale(inner, init_scale=4.0, growth_interval=2)
    _, state = tx.update(grads, tx.init(params), params)  # moments no longer zero
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    device_sh = jax.tree.map(lambda _: dev, state)
    host_sh = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), device_sh)
    streamed = jax.jit(
        lambda g, s, p: streamed_update(tx, g, s, p, (device_sh, host_sh)),
        out_shardings=(None, host_sh),
    )
    want_updates, want_state = jax.jit(tx.update)(grads, state, params)
    updates, got_state = streamed(grads, jax.device_put(state, host_sh), params)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(got_state)} == {"pinned_host"}
    chex.assert_trees_all_close(updates, want_updates, rtol=1e-6, atol=0)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, got_state), want_state, rtol=1e-6, atol=0)
