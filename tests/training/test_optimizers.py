"""The optimizers against their references: 8-bit AdamW against bitsandbytes' ``AdamW8bit``
(its CPU path), LoRA+ groups against PEFT's ``create_loraplus_optimizer``, the optax ones by
name, and the state sizes."""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxlora.training import adam8bit
from jaxlora.training.optim import (
    OPTIMIZERS,
    Group,
    decays,
    group_table,
    make_optimizer,
    param_groups,
)
from jaxlora.weights.nf4_format import DYNAMIC_MAP, UNSIGNED_DYNAMIC_MAP

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

LR, WD, B1, B2, EPS = 1e-3, 0.01, 0.9, 0.999, 1e-8


def test_unsigned_dynamic_map_is_bnbs():
    ref = F.create_dynamic_map(signed=False).numpy()
    np.testing.assert_array_equal(UNSIGNED_DYNAMIC_MAP.view(np.uint32), ref.view(np.uint32))


def _bnb_adamw8bit(p0: np.ndarray):
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = bnb.optim.AdamW8bit([p], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    # Our tables (checked against bnb above on this host; bnb builds them with torch.linspace,
    # whose rounding differs between CPUs), so the update is compared, not the table.
    opt.name2qmap = {
        "dynamic": torch.from_numpy(DYNAMIC_MAP.copy()),
        "udynamic": torch.from_numpy(UNSIGNED_DYNAMIC_MAP.copy()),
    }
    return p, opt


def _bnb_step(p, opt, g: np.ndarray):
    p.grad = torch.from_numpy(g.copy())
    opt.step()
    st = opt.state[p]
    m = adam8bit.Quantized8bit(
        st["state1"].numpy().reshape(-1).copy(), st["absmax1"].numpy().copy()
    )
    v = adam8bit.Quantized8bit(
        st["state2"].numpy().reshape(-1).copy(), st["absmax2"].numpy().copy()
    )
    return p.detach().numpy().copy(), m, v


def _check_moment(ours, ref, exact: np.ndarray, table: np.ndarray, keep_sign=False) -> float:
    """``ours`` is the nearest code to ``exact / absmax`` everywhere (with ``keep_sign``, the
    first moment: the nearest of the codes with the value's sign bit, as bnb's CUDA kernel
    stores it); bnb's equals it wherever bnb's is that code too. Returns the fraction of values
    where bnb's CPU kernel stored a code farther from the value than ours (its approximate
    search)."""
    # absmax is a max of float32 moments computed by the same operations in the same order
    # (b·m then + (1-b)·g, one rounding each), except that torch's vectorized add_ with alpha
    # is one FMA: at most 1 ulp (2^-23 relative) apart.
    np.testing.assert_allclose(ours.absmax, ref.absmax, rtol=2**-23, atol=0)
    absmax = np.repeat(np.asarray(ours.absmax), adam8bit.BLOCKSIZE)[: exact.size]
    live = absmax > 0  # an all-zero block's codes are free: code × 0 = 0
    scaled = exact.reshape(-1)[live] / absmax[live]
    dist = np.abs(scaled[:, None] - table[None, :])
    if keep_sign:
        dist = np.where(np.signbit(scaled)[:, None] == np.signbit(table)[None, :], dist, np.inf)
    best = dist.min(axis=1)
    ours_d = dist[np.arange(scaled.size), np.asarray(ours.codes)[live]]
    ref_d = dist[np.arange(scaled.size), np.asarray(ref.codes)[live]]
    # nearest, up to ties within the float32 rounding of `scaled` and of the midpoint test
    assert np.all(ours_d <= best + 2**-22), "a code is not the nearest"
    differ = np.asarray(ours.codes)[live] != np.asarray(ref.codes)[live]
    assert np.all(ref_d[differ] >= ours_d[differ] - 2**-22), "bnb chose a nearer code"
    return float(np.mean(differ & (ref_d > ours_d + 2**-22)))


def test_adamw_8bit_moments_equal_bitsandbytes_after_one_and_two_updates():
    """One parameter of 37 × 211 (7807 values, odd: a partial last block), random gradients
    with one all-zero block (absmax 0). Step 2 starts both from bnb's step-1 state, so the
    comparison is of one update each time, not of accumulated differences."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((37, 211)).astype(np.float32)
    g1 = (rng.standard_normal(p0.shape) * 1e-2).astype(np.float32)
    g1.reshape(-1)[256:512] = 0.0
    g2 = (rng.standard_normal(p0.shape) * 1e-2).astype(np.float32)

    p, opt = _bnb_adamw8bit(p0)
    ref_p1, ref_m1, ref_v1 = _bnb_step(p, opt, g1)
    tx = make_optimizer(
        optax.constant_schedule(LR), name="adamw_8bit", weight_decay=WD, max_grad_norm=0
    )
    state = tx.init(jnp.asarray(p0))
    upd, state = jax.jit(tx.update)(jnp.asarray(g1), state, jnp.asarray(p0))
    p1 = np.asarray(optax.apply_updates(jnp.asarray(p0), upd))
    m1, v1 = state[0].mu, state[0].nu
    far_m = _check_moment(m1, ref_m1, (1 - B1) * g1, DYNAMIC_MAP, keep_sign=True)
    far_v = _check_moment(v1, ref_v1, (1 - B2) * g1 * g1, UNSIGNED_DYNAMIC_MAP)
    assert np.all(np.asarray(m1.absmax)[1] == 0)  # the zero block
    # Parameters: p·(1-lr·wd) + (-lr/c1)·m/denom in bnb (two roundings at |p|), p + (-lr)·
    # (m/denom/c1 + wd·p) here (one): 1.5 ulp of |p| (<= 2^-23·|p| each) plus a few roundings
    # of the update itself (~lr · 2^-23).
    np.testing.assert_allclose(p1, ref_p1, rtol=2**-22, atol=8 * LR * 2**-23)

    # step 2 from bnb's state, through our dequantization
    mine = state[0]._replace(mu=ref_m1, nu=ref_v1)
    state = (mine, *state[1:])
    upd, state = jax.jit(tx.update)(jnp.asarray(g2), state, jnp.asarray(ref_p1))
    ref_p2, ref_m2, ref_v2 = _bnb_step(p, opt, g2)
    deq = lambda q, table: np.asarray(adam8bit.dequantize(q, table, p0.shape))
    m2 = deq(ref_m1, DYNAMIC_MAP) * np.float32(B1) + np.float32(1 - B1) * g2
    v2 = deq(ref_v1, UNSIGNED_DYNAMIC_MAP) * np.float32(B2) + np.float32(1 - B2) * g2 * g2
    far_m2 = _check_moment(state[0].mu, ref_m2, m2, DYNAMIC_MAP, keep_sign=True)
    far_v2 = _check_moment(state[0].nu, ref_v2, v2, UNSIGNED_DYNAMIC_MAP)
    p2 = np.asarray(optax.apply_updates(jnp.asarray(ref_p1), upd))
    np.testing.assert_allclose(p2, ref_p2, rtol=2**-22, atol=8 * LR * 2**-23)
    print(
        f"bnb CPU farther codes: m {far_m:.4%} v {far_v:.4%}, step 2 m {far_m2:.4%} v {far_v2:.4%}"
    )


def test_first_moment_keeps_its_sign_second_rounds_to_nearest():
    """bnb's CUDA 8-bit optimizer kernel (``kOptimizerStatic8bit2StateBlockwise``) stores the
    nearest code, then "make sure state1 term has still the same sign after quantization": a
    negative first moment whose nearest code is 0.0 takes the next code down (-5.5e-7 of the
    block's absmax). Positive and zero values keep 0.0; the second moment (unsigned) has no such
    rule. One block: its absmax 1, then values far below the smallest non-zero codes."""
    tiny = np.array([1.0, -1e-8, 1e-8, 0.0, -2e-7, 2e-7, -4e-7], np.float32)
    m = adam8bit.quantize(jnp.asarray(tiny), DYNAMIC_MAP, keep_sign=True)
    got = DYNAMIC_MAP[np.asarray(m.codes)]
    neg = DYNAMIC_MAP[DYNAMIC_MAP < 0].max()  # -5.5e-7: the smallest negative code
    np.testing.assert_array_equal(got, np.array([1.0, neg, 0, 0, neg, 0, neg], np.float32))
    nearest = adam8bit.quantize(jnp.asarray(tiny), DYNAMIC_MAP)  # without the rule: 0.0
    np.testing.assert_array_equal(DYNAMIC_MAP[np.asarray(nearest.codes)][1:6], 0.0)
    v = adam8bit.quantize(jnp.asarray(np.abs(tiny)), UNSIGNED_DYNAMIC_MAP)  # 1e-8 and 0 -> 0
    np.testing.assert_array_equal(UNSIGNED_DYNAMIC_MAP[np.asarray(v.codes)][1:4], 0.0)


def test_adamw_8bit_state_is_a_quarter_of_float32_adamw():
    params = {"a": jnp.zeros((16, 4096)), "b": jnp.zeros((4096, 16)), "small": jnp.zeros((64,))}
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    sched = optax.constant_schedule(1e-3)
    full = nbytes(make_optimizer(sched, weight_decay=0, max_grad_norm=0).init(params))
    q8 = make_optimizer(sched, name="adamw_8bit", weight_decay=0, max_grad_norm=0).init(params)
    # 2 moments × (1 byte + 4/256 bytes of absmax) per value, vs 2 × 4 bytes; the 64-value
    # leaf stays float32 (bnb's min_8bit_size)
    big = 2 * 16 * 4096
    assert nbytes(q8) == 2 * (big + 4 * big // 256) + 2 * 4 * 64 + 2 * 4  # + 2 step counts
    assert 0.25 <= nbytes(q8) / full < 0.26


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_lowers_a_quadratic(name):
    target = jnp.linspace(-1.0, 1.0, 5000).reshape(50, 100)
    loss = lambda p: jnp.sum((p["w"] - target) ** 2)
    # Adafactor's steps are relative to the parameters' RMS (here 0.1)
    lr = {"adamw": 1e-2, "adamw_8bit": 1e-2, "adafactor": 0.5, "lion": 1e-2, "sgd": 0.1}[name]
    tx = make_optimizer(optax.constant_schedule(lr), name=name, weight_decay=0, max_grad_norm=0)
    start = {"w": jnp.full((50, 100), 0.1)}
    params = start
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(50):
        upd, state = step(params, state)
        params = optax.apply_updates(params, upd)
    assert float(loss(params)) < 0.5 * float(loss(start))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_is_times_the_learning_rate(name):
    """With a zero gradient every optimizer's update is the decay alone, -lr·wd·p (torch's
    AdamW and HF's Adafactor: ``p -= lr·wd·p``); a zero learning rate leaves p as it is."""
    params = {"w": jnp.linspace(-1.0, 1.0, 256).reshape(16, 16)}
    zero = jax.tree.map(jnp.zeros_like, params)
    for lr in (1e-3, 0.0):
        tx = make_optimizer(
            optax.constant_schedule(lr), name=name, weight_decay=0.1, max_grad_norm=0
        )
        updates, _ = tx.update(zero, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], -lr * 0.1 * params["w"], rtol=1e-6, atol=0)
    # biases are not decayed, with or without LR groups (HF's Trainer leaves them out too)
    params = {"w": params["w"], "bias": jnp.ones(16)}
    groups = param_groups(params, loraplus_lr_ratio=None)
    for g in (None, groups):
        tx = make_optimizer(
            optax.constant_schedule(1e-3), name=name, weight_decay=0.1, max_grad_norm=0, groups=g
        )
        zero = jax.tree.map(jnp.zeros_like, params)
        updates, _ = tx.update(zero, tx.init(params), params)
        np.testing.assert_array_equal(updates["bias"], 0.0)
        np.testing.assert_allclose(updates["w"], -1e-4 * params["w"], rtol=1e-6, atol=0)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="adamw, adamw_8bit, adafactor, lion, sgd"):
        make_optimizer(optax.constant_schedule(1e-3), name="adam", weight_decay=0, max_grad_norm=0)


def test_groups_scale_the_update_like_a_param_group_lr():
    """SGD (no momentum) makes the update linear in the LR: a leaf with factor 16 moves 16 ×."""
    params = {"x": {"a": jnp.ones((3, 5)), "b": jnp.ones((5, 3)), "bias": jnp.ones((5,))}}
    groups = param_groups(params, loraplus_lr_ratio=16.0)
    tx = make_optimizer(
        optax.constant_schedule(0.1), name="sgd", weight_decay=0.5, max_grad_norm=0, groups=groups
    )
    grads = jax.tree.map(jnp.ones_like, params)
    upd, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_close(
        upd,
        {
            "x": {
                "a": -0.1 * 1.5 * jnp.ones((3, 5)),
                "b": -1.6 * 1.5 * jnp.ones((5, 3)),
                "bias": -1.6 * jnp.ones((5,)),
            }
        },  # fmt: skip
        rtol=1e-6,
    )


# Tiny models whose trainable tensors cover every kind a group rule tells apart: LoRA A/B on
# every linear, LoRA biases, DoRA magnitudes, a saved head and saved norms (RMSNorm in Llama,
# Qwen3's q/k norms, LayerNorm with a bias in Falcon's new decoder architecture).
_SAVED = {
    "llama_bias": ["lm_head", "model.norm"],
    "qwen3": ["lm_head", "q_norm"],
    "falcon40b_gqa": ["lm_head", "ln_attn", "transformer.ln_f"],
}


def _peft_and_ours(family, directory, **groups_kw):
    """``(peft model, {PEFT tensor name: our Group})`` for ``family`` with LoRA r=4 on every
    linear (``bias="lora_only"``, DoRA, ``_SAVED[family]`` saved); ``groups_kw`` go to
    :func:`param_groups` (``None``: the groups are :func:`decays` as :class:`Group` (1, d)).
    Tensors are matched by their PEFT names (``interop.peft.adapter_tensors``)."""
    import peft

    import jaxlora
    from jaxlora import lora
    from jaxlora.interop.peft import adapter_tensors
    from jaxlora.interop.peft_config import config_from_peft
    from tests.hf_models import make_hf_falcon, make_hf_model

    kw = dict(
        r=4,
        target_modules="all-linear",
        bias="lora_only",
        use_dora=True,
        modules_to_save=_SAVED[family],
    )
    make = make_hf_falcon if family.startswith("falcon") else make_hf_model
    pm = peft.get_peft_model(make(family, directory), peft.LoraConfig(**kw))
    cfg = config_from_peft(peft.LoraConfig(**kw).to_dict())
    model = jaxlora.load_model(directory).apply_lora(cfg, key=jax.random.key(0))
    frozen, trainable = lora.partition(model.params, cfg)
    if groups_kw:
        groups = param_groups(trainable, modules_to_save=cfg.modules_to_save, **groups_kw)
    else:
        groups = jax.tree.map(lambda d: Group(1.0, d), decays(trainable))
    # mark each trainable tensor with its index, find it under its PEFT name
    table = list(group_table(groups).values())
    marked = jax.tree.map(
        lambda x, i: jnp.full(x.shape, i, jnp.float32),
        trainable,
        jax.tree.unflatten(jax.tree.structure(trainable), list(range(len(table)))),
    )
    ours = {}
    for key, arr in adapter_tensors(lora.combine(frozen, marked), cfg).items():
        ours[key] = table[int(arr.reshape(-1)[0])]
    return pm, ours


def _peft_key(name: str) -> str:
    """A PEFT model's parameter name as ``adapter_tensors`` names the tensor."""
    name = name.replace(".default", "").replace(".modules_to_save.", ".")
    return name.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")


@pytest.mark.parametrize("saved_lr", [None, 3e-4])
@pytest.mark.parametrize("family", list(_SAVED))
def test_loraplus_groups_are_peft_create_loraplus_optimizer_groups(tmp_path, family, saved_lr):
    """Every trainable tensor's LR and weight decay equal those of its param group in PEFT's
    ``create_loraplus_optimizer`` (which decays RMSNorm weights but not ``nn.LayerNorm`` ones);
    with ``train.modules_to_save_lr`` the saved modules take that LR instead."""
    from peft.optimizers import create_loraplus_optimizer

    lr, ratio, wd = 1e-3, 16.0, 0.1
    scale = None if saved_lr is None else saved_lr / lr
    pm, ours = _peft_and_ours(
        family, tmp_path, loraplus_lr_ratio=ratio, modules_to_save_lr_scale=scale
    )
    opt = create_loraplus_optimizer(
        pm, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=wd
    )
    names = {id(p): n for n, p in pm.named_parameters()}
    theirs = {}
    for group in opt.param_groups:
        for p in group["params"]:
            saved = ".modules_to_save." in names[id(p)]
            theirs[_peft_key(names[id(p)])] = (
                saved_lr if saved and saved_lr else group["lr"],
                group["weight_decay"] > 0,
            )
    assert ours.keys() == theirs.keys()
    for key, g in ours.items():
        assert g.lr_scale * lr == pytest.approx(theirs[key][0], rel=1e-12), key
        assert g.decay == theirs[key][1], key


@pytest.mark.parametrize("saved_lr", [None, 3e-4])
@pytest.mark.parametrize("family", list(_SAVED))
def test_weight_decay_without_loraplus_is_hf_trainers(tmp_path, family, saved_lr):
    """Without LoRA+ (no groups, or ``train.modules_to_save_lr`` groups) weight decay applies to
    exactly the trainable tensors in HF's ``Trainer.get_decay_parameter_names``: not biases,
    not norm weights (RMSNorm by name, LayerNorm by type)."""
    from transformers import Trainer

    kw = {} if saved_lr is None else dict(loraplus_lr_ratio=None, modules_to_save_lr_scale=3.0)
    pm, ours = _peft_and_ours(family, tmp_path, **kw)
    decayed = set(Trainer.get_decay_parameter_names(None, pm))
    theirs = {_peft_key(n): n in decayed for n, p in pm.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    assert {k: g.decay for k, g in ours.items()} == theirs
    assert not all(theirs.values()) and any(theirs.values())


@pytest.mark.parametrize("loraplus", [None, 16.0])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_stacked_layers_are_updated_as_the_unrolled_layers(name, loraplus):
    """A step that scans its layers hands the optimizer stacked leaves (a leading layer axis
    per run of layers, :mod:`jaxlora.models.stacking`); the groups, the weight decay and two
    updates are those of the unrolled tree, layer by layer: 8-bit Adam's blocks and
    ``min_8bit_size``, Adafactor's factors and block RMS are per layer, and a stacked DoRA
    magnitude or norm weight is still 1-D to LoRA+. Two runs (layers 0 and 1:3) of three layers
    whose tensors differ; per-layer sizes not a multiple of 256 (8-bit blocks would straddle
    layers) and under 4096 (float32 moments, though 4096+ stacked)."""
    from jaxlora.models.stacking import stack_layers

    keys = iter(jax.random.split(jax.random.key(0), 64))
    normal = lambda *shape: jax.random.normal(next(keys), shape)
    layer = lambda: {
        "mlp": {
            "up_proj": {"weight": {"a": normal(8, 300), "b": normal(600, 8)}},
            "down_proj": {"weight": normal(130, 300)},  # factored by Adafactor
        },
        "self_attn": {"k_proj": {"bias": normal(1500), "weight": {"magnitude": normal(300)}}},
        "post_attention_layernorm": {"weight": normal(300)},
    }
    params = {"model": {"layers": {str(i): layer() for i in range(3)}}}
    params["lm_head"] = {"weight": normal(61, 40)}
    runs = ((0, 1), (1, 3))
    stacked = stack_layers(params, runs)

    def updates(tree):
        groups = param_groups(tree, loraplus_lr_ratio=loraplus) if loraplus else None
        tx = make_optimizer(
            optax.constant_schedule(1e-2),
            name=name,
            weight_decay=0.1,
            max_grad_norm=1.0,
            momentum=0.9,
            groups=groups,
        )
        grads = jax.tree.map(lambda p: 0.1 * jnp.sin(3 * p + 1), tree)
        state = tx.init(tree)
        first, state = tx.update(grads, state, tree)
        second, _ = tx.update(grads, state, optax.apply_updates(tree, first))
        table = group_table(groups) if groups else group_table(decays(tree))
        return table, first, second

    table, *want = updates(params)
    stacked_table, *got = updates(stacked)
    assert len(stacked_table) == 1 + 2 * 6
    for path, g in stacked_table.items():  # "model.layers.1:3.x" is layers 1 and 2's "x"
        a, b = next((a, b) for a, b in runs if f".{a}:{b}." in path) if ":" in path else (0, 1)
        for i in range(a, b):
            assert table[path.replace(f".{a}:{b}.", f".{i}.")] == g, path
    # the same arithmetic, vmapped: reductions (block RMS, absmax) may be ordered otherwise
    for w, g in zip(want, got, strict=True):
        chex.assert_trees_all_close(stack_layers(w, runs), g, rtol=1e-6, atol=1e-9)
