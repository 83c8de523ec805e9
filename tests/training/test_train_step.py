"""The train step's arithmetic: schedules, token-weighted grad accumulation, the NaN guard."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlora.models.llama import LlamaForCausalLM, init_params
from jaxlora.training.optim import make_optimizer, make_schedule
from jaxlora.training.step import make_train_step
from tests.hf_models import tiny_config

CFG = tiny_config()


def _batch(rows: int, seq: int = 9, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 61, size=(rows, seq + 1)).astype(np.int32)
    # uneven padding so per-micro-batch token counts differ (a mean of means would be wrong)
    mask = np.ones((rows, seq), np.float32)
    for r in range(rows):
        mask[r, seq - r % 5 :] = 0
    seg = (mask > 0).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": mask,
        "segment_ids": np.maximum(seg, 1),
        "positions": np.broadcast_to(np.arange(seq), (rows, seq)).astype(np.int32),
    }


def _run(accum: int, micro: int, steps: int = 2):
    module = LlamaForCausalLM(CFG)
    params = init_params(CFG, jax.random.key(0))
    tx = make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.01, max_grad_norm=1.0)
    step = jax.jit(make_train_step(module, lambda f, t: t, tx, dropout=False))
    opt = tx.init(params)
    losses = []
    for s in range(steps):
        b = _batch(accum * micro, seed=s)
        b = {k: v.reshape(accum, micro, *v.shape[1:]) for k, v in b.items()}
        params, opt, m = step(params, opt, None, b, jax.random.key(s))
        losses.append(float(m["loss"]))
    return params, losses


def test_grad_accumulation_equals_big_batch():
    p_big, l_big = _run(accum=1, micro=8)
    p_acc, l_acc = _run(accum=4, micro=2)
    np.testing.assert_allclose(l_acc, l_big, rtol=1e-5)
    chex.assert_trees_all_close(p_acc, p_big, atol=1e-5, rtol=1e-5)


def test_nonfinite_step_leaves_state_unchanged():
    module = LlamaForCausalLM(CFG)
    params = init_params(CFG, jax.random.key(0))
    params["model"]["norm"]["weight"] = params["model"]["norm"]["weight"].at[0].set(jnp.nan)
    tx = make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.0, max_grad_norm=1.0)
    opt = tx.init(params)
    b = {k: v[None] for k, v in _batch(2).items()}
    new, new_opt, m = jax.jit(make_train_step(module, lambda f, t: t, tx, dropout=False))(
        params, opt, None, b, jax.random.key(0)
    )
    assert not bool(m["finite"])
    chex.assert_trees_all_equal(new, params)
    chex.assert_trees_all_equal(new_opt, opt)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay(kind):
    sched = make_schedule(1e-3, total_steps=100, warmup_ratio=0.05, kind=kind)
    lrs = np.array([float(sched(i)) for i in range(100)])
    assert np.all(np.diff(lrs[:6]) > 0) and lrs[0] > 0  # 5 warmup steps, rising
    assert lrs[5] == pytest.approx(1e-3)  # the peak, where the decay starts
    if kind == "constant":
        assert np.allclose(lrs[5:], 1e-3)
    else:
        assert np.all(np.diff(lrs[5:]) < 0) and lrs[-1] < 1e-4
    if kind == "cosine":  # half-way through the decay the cosine is at half the peak
        assert float(sched(5 + 47)) == pytest.approx(5e-4, rel=0.05)


def test_schedule_rejects_unknown_kind():
    with pytest.raises(ValueError, match="train.schedule"):
        make_schedule(1e-3, 10, 0.1, "exponential")


@pytest.mark.parametrize("quant", [False, True])
def test_remat_policies_give_the_same_gradients(quant):
    """Recomputing layers (remat full / dots / offload) changes memory, not the numbers: loss
    and LoRA gradients equal the no-remat step's, with LoRA over a dense and over an NF4 base.
    ``offload`` keeps exactly what ``dots`` keeps, in host memory instead of on the device:
    equal to ``dots``' to 1e-6 (the same values saved); against no remat, the bound of the
    other policies (1e-5: recomputing the norms and activations in the backward fuses them
    differently, a few roundings apart; the loss, computed before any recompute, to 1e-6)."""
    from jaxlora import lora
    from jaxlora.lora import LoraConfig
    from jaxlora.training.step import loss_sum
    from jaxlora.weights.nf4 import quantize

    params = init_params(CFG, jax.random.key(0))
    if quant:  # every decoder projection as NF4 (in-features 32 or 37: 2-D and flat layouts)
        params = jax.tree_util.tree_map_with_path(
            lambda p, v: quantize(v, blocksize=32) if v.ndim == 2 and "layers" in str(p) else v,
            params,
        )
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random")
    frozen, trainable = lora.partition(lora.inject(params, cfg, jax.random.key(1)), cfg)
    batch = {k: jnp.asarray(v) for k, v in _batch(4, seq=12).items()}

    def grads(remat):
        module = LlamaForCausalLM(CFG, remat=remat)
        fn = lambda t: loss_sum(module, lora.combine(frozen, t), batch)[0]
        return jax.jit(jax.value_and_grad(fn))(trainable)

    ref_loss, ref = grads("none")
    results = {remat: grads(remat) for remat in ("full", "dots", "offload")}
    for loss, g in results.values():
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
        chex.assert_trees_all_close(g, ref, atol=1e-5, rtol=1e-5)
    (dots_loss, dots), (loss, g) = results["dots"], results["offload"]
    np.testing.assert_allclose(float(loss), float(dots_loss), rtol=1e-6)
    chex.assert_trees_all_close(g, dots, rtol=1e-6, atol=1e-7)
