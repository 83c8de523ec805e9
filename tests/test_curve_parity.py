"""Training-curve parity: jaxlora's train step against transformers + PEFT (+ bitsandbytes).

Both sides start from the same random tiny Llama (float32, GQA, odd sizes) and the same adapter:
jaxlora initialises it with ``init="random"`` (PEFT's ``init_lora_weights=False``: B is not zero,
so the first steps are not a special case) and exports it with ``save_adapter``; PEFT loads that
file. No dropout. Both see the same packed batches in the same order (4 batches cycled, so the
loss really falls), the same token-mean cross-entropy, the same global-norm clipping (active on
some steps, checked) and AdamW with the same, non-default hyper-parameters at a constant LR.

AdamW semantics: torch's ``AdamW`` first decays ``p ← p·(1 − lr·wd)`` then takes the Adam step
``lr·m̂/(√v̂ + eps)``; ``optax.adamw`` adds ``wd·p`` to the Adam direction and scales the sum by
``lr``. Both are decoupled (Loshchilov & Hutter) and both multiply the decay by lr, so one step
is the same map; ``test_adamw_and_clipping_match_torch`` checks it in isolation. Clipping:
torch's ``clip_grad_norm_`` scales by ``max_norm / (norm + 1e-6)``, optax by ``max_norm / norm``
(relative difference 1e-6 / norm, far below the tolerances here).
"""

from __future__ import annotations

import numpy as np
import optax
import pytest
import torch

import jaxlora
from jaxlora import lora
from jaxlora.interop.peft import adapter_tensors
from jaxlora.lora import LoraConfig
from jaxlora.training.optim import make_optimizer
from tests.hf_models import make_hf_model, save_bnb_nf4
from tools.bench_common import packed_batches

STEPS = 32
# Step 1 is before any update: the two sides evaluate the same float32 function with different
# kernels (MKL vs XLA matmuls, their own softmax and reductions), a few ulps apart per op.
# Measured on an AMD EPYC: loss <= 1.0e-7, gradient norm <= 2.3e-7 relative. Bound 1e-5.
STEP1_RTOL = 1e-5
# The 32-step curve (losses, gradient norms) and the final adapter change: under AdamW two
# float32 runs drift apart, because m/(sqrt(v) + eps) turns a rounding difference in a
# near-zero gradient into a full-size step, and the drift grows along the trajectory (the
# loss gap is ~1e-7 for the first steps, ~1e-6 by step 32). Measured on an AMD EPYC with
# the default code paths and with other instruction sets emulated on either side
# (XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 or AVX; torch ATEN_CPU_CAPABILITY=avx2 or default,
# MKL_ENABLE_INSTRUCTIONS=AVX2, MKL_CBWR=COMPATIBLE with one thread): losses <= 1.4e-5,
# gradient norms <= 1.1e-4, adapter changes <= 1.1e-4 of each tensor's largest change.
# Bound 1e-3 for all three, ~9x the largest; a wrong scale, mask or optimizer step is off by
# far more.
CURVE_RTOL = 1e-3
HP = dict(lr=4e-3, b1=0.85, b2=0.98, eps=1e-7, weight_decay=0.05, max_grad_norm=2.0)
# Weights with std 0.2: at transformers' 0.02 the final RMSNorm caps the logits near 0.8, so a
# LoRA on the decoder barely moves the loss and the curve would test little.
MODEL = dict(num_key_value_heads=2, num_hidden_layers=2, initializer_range=0.2)
BATCHES = packed_batches(4, 3, 19, 61, seed=5, min_doc=3)


def _optax_adamw():
    """jaxlora's optimizer (clipping + AdamW) with :data:`HP`."""
    hp = {k: HP[k] for k in ("weight_decay", "max_grad_norm", "b1", "b2", "eps")}
    return make_optimizer(optax.constant_schedule(HP["lr"]), **hp)


def _torch_adamw(params):
    """torch's AdamW with :data:`HP` (clipping is a separate call on the torch side)."""
    betas = (HP["b1"], HP["b2"])
    return torch.optim.AdamW(
        params, lr=HP["lr"], betas=betas, eps=HP["eps"], weight_decay=HP["weight_decay"]
    )


def _bnb_exact(model):
    """bitsandbytes' CPU fast path computes in bf16 (inference only); float32 semantics."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """``{"dense": dir, "bnb": dir}``: the tiny base, and its NF4 + double-quant copy made by
    transformers + bitsandbytes (float32 compute), which jaxlora reads as stored."""
    dense = tmp_path_factory.mktemp("dense")
    make_hf_model("llama2_mha", dense, seed=3, **MODEL)
    bnb_dir = tmp_path_factory.mktemp("bnb")
    save_bnb_nf4(dense, bnb_dir)
    return {"dense": dense, "bnb": bnb_dir}


def train_jaxlora(base_dir, adapter_dir):
    """Losses, gradient norms and the final adapter tensors (PEFT key names)."""
    import jax

    from jaxlora.training.step import make_train_step

    model = jaxlora.load_model(base_dir, adapter=adapter_dir, tokenizer=False)
    frozen, trainable = lora.partition(model.params, model.lora)
    tx = _optax_adamw()
    opt_state = tx.init(trainable)
    step = jax.jit(make_train_step(model.module(), lora.combine, tx, dropout=False))
    losses, norms = [], []
    for i in range(STEPS):
        batch = {k: v[None] for k, v in BATCHES[i % len(BATCHES)].items()}
        trainable, opt_state, m = step(trainable, opt_state, frozen, batch, jax.random.key(0))
        assert bool(m["finite"])
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    final = adapter_tensors(lora.combine(frozen, trainable), model.lora)
    return np.array(losses), np.array(norms), final


def train_peft(base_dir, adapter_dir, quantized: bool):
    import peft
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, device_map="cpu", attn_implementation="eager"
    )
    model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    if quantized:
        _bnb_exact(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _torch_adamw(params)
    losses, norms = [], []
    for i in range(STEPS):
        b = {k: torch.as_tensor(v) for k, v in BATCHES[i % len(BATCHES)].items()}
        logits = model(
            input_ids=b["input_ids"].long(), position_ids=b["positions"].long(), use_cache=False
        ).logits
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), b["targets"].long().reshape(-1), reduction="none"
        )
        mask = b["loss_mask"].reshape(-1)
        loss = (ce * mask).sum() / mask.sum()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, HP["max_grad_norm"])))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    final = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}
    return np.array(losses), np.array(norms), final


def _adapter(base_dir, directory):
    model = jaxlora.load_model(base_dir, tokenizer=False)
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random")
    import jax

    model = model.apply_lora(cfg, key=jax.random.key(7))
    model.save_adapter(directory)
    return adapter_tensors(model.params, cfg)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_loss_curves_and_final_adapters_match_peft(base_dirs, tmp_path, mode):
    base = base_dirs["bnb" if mode == "qlora" else "dense"]
    init = _adapter(base_dirs["dense"], tmp_path / "adapter")
    ours_loss, ours_norm, ours = train_jaxlora(base, tmp_path / "adapter")
    ref_loss, ref_norm, ref = train_peft(base, tmp_path / "adapter", quantized=mode == "qlora")

    # the run is not trivial: the loss falls, and clipping acts on some steps and not others
    assert ref_loss[-4:].mean() < ref_loss[:4].mean() - 0.5, ref_loss
    clipped = ref_norm > HP["max_grad_norm"]
    assert clipped.any() and not clipped.all(), ref_norm
    # the first step, before any update, to float32 rounding; then the whole curve
    np.testing.assert_allclose(ours_loss[0], ref_loss[0], rtol=STEP1_RTOL, atol=0)
    np.testing.assert_allclose(ours_norm[0], ref_norm[0], rtol=STEP1_RTOL, atol=0)
    np.testing.assert_allclose(ours_loss, ref_loss, rtol=CURVE_RTOL, atol=0)
    np.testing.assert_allclose(ours_norm, ref_norm, rtol=CURVE_RTOL, atol=0)

    # final adapters: same keys; what training changed (final − initial) agrees to CURVE_RTOL
    # of its own size, for every tensor
    assert set(ours) == set(ref)
    for key in sorted(ref):
        delta_ref = ref[key] - init[key]
        delta_ours = ours[key] - init[key]
        scale = np.abs(delta_ref).max()
        assert scale > 1e-3, key  # every adapter tensor trained
        np.testing.assert_allclose(
            delta_ours, delta_ref, rtol=0, atol=CURVE_RTOL * scale, err_msg=key
        )


def test_adamw_and_clipping_match_torch():
    """One optimizer, isolated: 6 steps of random gradients (some clipped) on random params."""
    rng = np.random.default_rng(0)
    shapes = [(7, 11), (13,), (3, 5)]
    params = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [
        [rng.normal(size=s).astype(np.float32) * (0.05 if t % 2 else 1.0) for s in shapes]
        for t in range(6)
    ]
    tx = _optax_adamw()
    ours = [np.asarray(p) for p in params]
    state = tx.init(ours)
    tp = [torch.nn.Parameter(torch.tensor(p)) for p in params]
    opt = _torch_adamw(tp)
    norms = []
    for g in grads:
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
        for p, gi in zip(tp, g, strict=True):
            p.grad = torch.tensor(gi)
        norms.append(float(torch.nn.utils.clip_grad_norm_(tp, HP["max_grad_norm"])))
        opt.step()
    assert min(norms) < HP["max_grad_norm"] < max(norms)
    for a, p in zip(ours, tp, strict=True):
        np.testing.assert_allclose(np.asarray(a), p.detach().numpy(), rtol=0, atol=1e-6)
