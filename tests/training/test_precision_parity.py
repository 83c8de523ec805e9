"""bf16 numerics against transformers + PEFT + bitsandbytes on a tiny QLoRA model: the logits
and the LoRA gradients of a summed cross-entropy.

The base is a tiny random Llama quantized by transformers + bitsandbytes (NF4, double quant,
``bnb_4bit_compute_dtype=bfloat16``) and read by jaxlora as stored; the adapter has a random B
(so the A gradients are not zero) and float32 A/B on both sides (PEFT's
``autocast_adapter_dtype``). Two bf16 setups:

* QLoRA as the paper and PEFT's ``prepare_model_for_kbit_training`` run it: everything that is
  not 4-bit (embeddings, norms, head, so every activation) in float32; only the 4-bit matmuls in
  bf16, ``bnb.nn.Linear4bit`` casting its input to bf16 and the product back to float32. jaxlora:
  ``model.compute_dtype=float32 quant.compute_dtype=bfloat16``. The two round at the same points
  (the input to bf16, the 4-bit product to bf16, and the same again for the product's input
  gradient in the backward), so they can differ only where their float32 accumulations (MKL's
  and XLA's orders) fall on two sides of a bf16 rounding midpoint: that element then lands one
  bf16 ulp (2^-8 of itself at most) away. Such flips hit a fraction of about K·2^-24 / 2^-9
  (0.3 % for K = 40..64) of the products' elements, with random signs, so downstream they stay
  below one ulp of the largest entry: the bound is 2^-8 of each tensor's largest magnitude. A
  float32 4-bit matmul instead (what jaxlora did before it honoured ``quant.compute_dtype``) moves
  every element by up to half an ulp in each of the 14 products: measured 1.8e-2 on the logits
  and 2e-2 on the gradients, far outside the bound (checked below, so the test can tell).
* Everything in bf16 (``model.compute_dtype=bfloat16``; PEFT on a bf16 model without
  ``prepare_model_for_kbit_training``). Most rounding points are shared (each matmul's output,
  RMSNorm's, RoPE's, the residual adds, bf16 logits), a few are not: PEFT's bnb LoRA layer
  rounds the float32 LoRA branch to bf16 before adding it (jaxlora adds in float32 and rounds
  once), transformers rounds the attention scores again after scaling them (jaxlora scales in
  float32), torch's SiLU rounds once where ``x·sigmoid(x)`` rounds twice. With every activation
  in bf16 the matmuls' accumulation-order flips compound through the layers too, so the two
  sides end as far apart as each is from float32 (~2e-2): no elementwise bound separates them.
  What must hold is that jaxlora loses no precision PEFT keeps: its RMS error against the
  float32 model is at most PEFT's, plus 25 % for the spread of one draw of rounding errors
  (measured: 0.97 of PEFT's on the logits, 0.94 on the gradients). This catches a systematic
  loss (a bf16 LoRA branch or bf16 gradients, rounding the residual stream twice), not a
  single extra rounding, which the first test's bound does.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

import jaxlora
from jaxlora import lora
from jaxlora.interop.peft import adapter_tensors
from jaxlora.lora import LoraConfig
from jaxlora.training.step import loss_sum
from tests.hf_models import make_hf_model, save_bnb_nf4
from tools.bench_common import packed_batches

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb
    import peft

# Weights with std 0.2 (as test_curve_parity.py): the adapter then moves the loss visibly.
MODEL = dict(num_key_value_heads=2, num_hidden_layers=2, initializer_range=0.2)
BATCH = packed_batches(1, 3, 19, 61, seed=5, min_doc=3)[0]
ULP_BF16 = 2.0**-8  # one bf16 ulp, relative to the value (8 significant bits)


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """``(bnb checkpoint dir, adapter dir)``: the tiny base in NF4 (bf16 compute dtype) and a
    random adapter on every linear."""
    root = tmp_path_factory.mktemp("precision")
    make_hf_model("llama2_mha", root / "dense", seed=3, **MODEL)
    save_bnb_nf4(root / "dense", root / "bnb", compute_dtype="bfloat16")
    model = jaxlora.load_model(root / "dense", tokenizer=False)
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random")
    model.apply_lora(cfg, key=jax.random.key(7)).save_adapter(root / "adapter")
    return root / "bnb", root / "adapter"


def _peft_model(qlora, activations: torch.dtype, matmul: torch.dtype):
    """PEFT's trainable model with the non-4-bit weights, hence the activations, in
    ``activations`` and the 4-bit matmuls in ``matmul``."""
    from transformers import AutoModelForCausalLM

    bnb_dir, adapter_dir = qlora
    base = AutoModelForCausalLM.from_pretrained(
        bnb_dir, dtype=torch.float32, device_map="cpu", attn_implementation="eager"
    )
    if activations == torch.float32:
        base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:  # a bf16 model as loaded with dtype=bfloat16 (transformers keeps a bnb file's dtype)
        for p in base.parameters():
            if p.dtype == torch.float32 and type(p).__name__ != "Params4bit":
                p.data = p.data.to(activations)
    model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = matmul
            m.support_avx512bf16_for_cpu = False  # its inference-only bf16 fast path
    return model.train()


def _peft_forward(model):
    b = {k: torch.as_tensor(v) for k, v in BATCH.items()}
    return model(
        input_ids=b["input_ids"].long(), position_ids=b["positions"].long(), use_cache=False
    ).logits


@functools.cache
def peft_run(qlora, activations: torch.dtype, matmul: torch.dtype):
    """PEFT's logits and LoRA gradients (PEFT key names) of the summed cross-entropy."""
    model = _peft_model(qlora, activations, matmul)
    logits = _peft_forward(model)
    ce = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        torch.as_tensor(BATCH["targets"]).long().reshape(-1),
        reduction="none",
    )
    (ce * torch.as_tensor(BATCH["loss_mask"]).reshape(-1).float()).sum().backward()
    grads = {
        n.replace(".default", ""): p.grad.float().numpy()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return logits.detach().float().numpy(), grads


def _ours_model(qlora, compute_dtype: str, quant_compute_dtype: str):
    """jaxlora's model with activations in ``compute_dtype`` and the 4-bit matmuls in
    ``quant_compute_dtype``, prepared as a train run prepares it (its kernels)."""
    bnb_dir, adapter_dir = qlora
    model = jaxlora.load_model(
        bnb_dir, compute_dtype=compute_dtype, adapter=adapter_dir, tokenizer=False
    )
    kernels = dataclasses.replace(model.kernels, nf4_dtype=quant_compute_dtype)
    model = model.replace(kernels=kernels)
    return model.replace(params=model.prepared_params())


@functools.cache
def jaxlora_run(qlora, compute_dtype: str, quant_compute_dtype: str):
    """jaxlora's logits and LoRA gradients (PEFT key names) of the summed cross-entropy."""
    model = _ours_model(qlora, compute_dtype, quant_compute_dtype)
    frozen, trainable = lora.partition(model.params, model.lora)
    module = model.module()
    batch = {k: jnp.asarray(v) for k, v in BATCH.items()}
    args = (batch["input_ids"], batch["positions"], batch["segment_ids"])
    logits, _ = module.apply({"params": model.params}, *args)
    grads = jax.grad(lambda t: loss_sum(module, lora.combine(frozen, t), batch)[0])(trainable)
    grads = adapter_tensors(lora.combine(frozen, grads), model.lora)
    return np.asarray(logits.astype(jnp.float32)), {k: np.asarray(v) for k, v in grads.items()}


def _max_rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _rms(a, ref) -> float:
    """RMS of ``a − ref`` over RMS of ``ref``, for an array or a dict of arrays (all entries)."""
    if isinstance(ref, dict):
        num = sum(np.sum((a[k] - ref[k]) ** 2) for k in ref)
        return float(np.sqrt(num / sum(np.sum(ref[k] ** 2) for k in ref)))
    return float(np.sqrt(np.mean((a - ref) ** 2) / np.mean(ref**2)))


def _bf16(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _check_bf16_product(ours, theirs, x, w, what: str) -> None:
    """``ours`` and ``theirs`` (float32 arrays) are ``bf16(x @ wᵀ)`` for bf16-valued ``x
    [M, K]`` and ``w [N, K]``, each summed in float32 in some order: equal wherever every
    float32 sum within the accumulation bound ``γ_K·Σ|x·w|`` (``γ_K = K·2^-24 / (1 − K·2^-24)``,
    any order, FMA or not) of the exact one rounds to the same bf16, and one bf16 ulp apart at
    most elsewhere (a sum straddling a rounding midpoint)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    exact = x @ w.T
    k = x.shape[-1]
    gamma = k * 2.0**-24 / (1 - k * 2.0**-24)
    err = gamma * (np.abs(x) @ np.abs(w).T) + 1e-37  # + flushed float32 denormals
    lo = np.nextafter(np.float32(exact - err), np.float32(-np.inf))
    hi = np.nextafter(np.float32(exact + err), np.float32(np.inf))
    forced = _bf16(lo) == _bf16(hi)
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    np.testing.assert_array_equal(ours[forced], _bf16(exact)[forced], err_msg=what)
    np.testing.assert_array_equal(theirs[forced], _bf16(exact)[forced], err_msg=what)
    ulp = np.abs(_bf16(hi) - _bf16(lo))  # the two candidates' spacing where not forced
    assert np.all(np.abs(ours - theirs)[~forced] <= ulp[~forced]), what
    assert forced.mean() > 0.9, (what, forced.mean())  # the check has teeth


def _rows(a) -> np.ndarray:
    """Any array (jax, torch, numpy) as float32 rows ``[-1, last dim]``."""
    if isinstance(a, torch.Tensor):
        a = a.detach().float().numpy()
    return np.asarray(jnp.asarray(a, jnp.float32)).reshape(-1, a.shape[-1])


def _layer_inputs(model) -> dict[str, torch.Tensor]:
    """``{module path: input}`` of every bnb LoRA layer in one forward pass of ``model``."""
    inputs = {}

    def keep(name):
        def hook(module, args, out):
            inputs[name] = args[0]  # returns None: the output stays

        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in _lora_layers(model).items()]
    with torch.no_grad():
        _peft_forward(model)
    for h in hooks:
        h.remove()
    return inputs


def _lora_layers(model) -> dict:
    return {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if isinstance(m, peft.tuners.lora.bnb.Linear4bit)
    }


@pytest.mark.parametrize("mode", ["qlora", "bf16"])
def test_each_lora_layer_rounds_where_peft_does(qlora, mode):
    """Every LoRA layer of the model, on the input PEFT's own forward gives it and a random
    output cotangent: the 4-bit product and its input gradient round to bf16 where
    bitsandbytes' do (:func:`_check_bf16_product`); the LoRA gradients are float32 as PEFT's
    (1e-5 of each tensor's largest). ``qlora`` (float32 activations, bf16 4-bit matmuls): the
    layer's output is the base's plus the float32 LoRA branch, as PEFT's, to 1e-5. ``bf16``
    (every activation bf16): PEFT's bnb layer rounds the LoRA branch to bf16 before adding it,
    jaxlora adds in float32 and rounds once, so the outputs may differ by that rounding and a
    flip of the base's: two bf16 ulps (2^-6 of the larger of the base and the output)."""
    activations = {"qlora": torch.float32, "bf16": torch.bfloat16}[mode]
    model = _peft_model(qlora, activations, torch.bfloat16)
    ours = _ours_model(qlora, {"qlora": "float32", "bf16": "bfloat16"}[mode], "bfloat16")
    weights = flatten_dict(ours.params, sep=".")
    inputs = _layer_inputs(model)
    assert len(inputs) == 7 * MODEL["num_hidden_layers"]
    rng = np.random.default_rng(0)
    for name, layer in _lora_layers(model).items():
        w = weights[f"{name}.weight"]
        x = inputs[name].detach().clone().requires_grad_(True)
        y, base = layer(x), layer.base_layer(x)  # PEFT's output and the bnb layer's
        g = torch.as_tensor(rng.normal(size=y.shape).astype(np.float32)).to(y.dtype)
        theirs_dx = torch.autograd.grad(base, x, g)[0]
        lora_ab = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        theirs_da, theirs_db = torch.autograd.grad(y, lora_ab, g)

        xj = jnp.asarray(x.detach().float().numpy(), ours.dtype)
        gj = jnp.asarray(g.float().numpy(), ours.dtype)
        ours_base, base_vjp = jax.vjp(w.base.matmul, xj)
        (ours_dx,) = base_vjp(gj)
        ours_y, ab_vjp = jax.vjp(lambda a, b, w=w, x=xj: w.replace(a=a, b=b).matmul(x), w.a, w.b)
        ours_da, ours_db = ab_vjp(gj)

        w16 = np.asarray(w.base.dequantize(jnp.bfloat16).astype(jnp.float32))
        x16, g16 = _bf16(_rows(x)), _bf16(_rows(g))
        _check_bf16_product(_rows(ours_base), _rows(base), x16, w16, f"{name} forward")
        _check_bf16_product(_rows(ours_dx), _rows(theirs_dx), g16, w16.T, f"{name} dx")
        for o, t in ((ours_da, theirs_da), (ours_db, theirs_db)):
            t = t.numpy()
            np.testing.assert_allclose(o, t, rtol=0, atol=1e-5 * np.abs(t).max(), err_msg=name)
        ours_lora = _rows(ours_y) - _rows(ours_base)
        theirs_lora = _rows(y) - _rows(base)
        if mode == "qlora":
            scale = np.abs(_rows(y)).max()
            np.testing.assert_allclose(ours_lora, theirs_lora, rtol=0, atol=1e-5 * scale)
        else:
            bound = 2.0**-6 * np.maximum(np.abs(_rows(y)), np.abs(_rows(base)))
            assert np.all(np.abs(_rows(ours_y) - _rows(y)) <= bound), name


def test_qlora_bf16_matmuls_match_peft_prepared_for_kbit_training(qlora):
    """The whole model, logits and LoRA gradients of the summed cross-entropy. The layers round
    where PEFT's do (test above); what is left are the flips of single bf16 roundings where the
    two sides' float32 sums straddle a midpoint, a small fraction of the elements, which the
    layers after them carry on (and amplify: the weights are large). Bound: half the difference
    that rounding differently at every 4-bit output makes, measured alongside as jaxlora with
    float32 4-bit matmuls (what it did before it honoured ``quant.compute_dtype``), which is
    then outside the bound by construction. Measured over 16 batches: 0.08 of it at most on the
    logits (most batches ~1e-4: no flip in the forward), 0.13 on the gradients."""
    theirs_logits, theirs = peft_run(qlora, torch.float32, torch.bfloat16)
    logits, grads = jaxlora_run(qlora, "float32", "bfloat16")
    f32_logits, f32 = jaxlora_run(qlora, "float32", "float32")
    assert set(grads) == set(theirs) and len(theirs) == 2 * 7 * MODEL["num_hidden_layers"]
    assert _rms(f32_logits, theirs_logits) > 1e-3 and _rms(f32, theirs) > 1e-3  # bf16 shows
    assert _rms(logits, theirs_logits) <= 0.5 * _rms(f32_logits, theirs_logits)
    assert _rms(grads, theirs) <= 0.5 * _rms(f32, theirs)


def test_all_bf16_loses_no_precision_peft_keeps(qlora):
    """Every activation in bf16, the whole model: the two sides round at nearly the same points
    (test above) but with every activation in bf16 the flips compound through the layers, so
    they end as far apart as each is from float32 (~2e-2) and no elementwise bound separates
    them. What must hold is that jaxlora loses no precision PEFT keeps: its RMS error against
    the float32 model is not far above PEFT's. The ratio of the two spreads with the draw of
    rounding errors: 0.83 to 1.22 over 16 batches; bound 1.5. A gross loss (rounding the
    residual stream or the gradients twice) is caught; a single extra rounding is not (a bf16
    adapter measured 1.14-1.21), which the layer test and the QLoRA test catch."""
    ref_logits, ref = peft_run(qlora, torch.float32, torch.float32)
    theirs_logits, theirs = peft_run(qlora, torch.bfloat16, torch.bfloat16)
    logits, grads = jaxlora_run(qlora, "bfloat16", "bfloat16")
    # float32 jaxlora is PEFT's float32 model to float32 rounding: the reference is common
    f32_logits, _ = jaxlora_run(qlora, "float32", "float32")
    assert _max_rel(f32_logits, ref_logits) < 1e-5
    assert _rms(logits, ref_logits) <= 1.5 * _rms(theirs_logits, ref_logits)
    assert _rms(grads, ref) <= 1.5 * _rms(theirs, ref)
