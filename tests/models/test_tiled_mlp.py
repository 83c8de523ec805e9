"""``train.mlp_chunk``: every layer's MLP run a tile of tokens at a time
(:func:`jaxlora.models.llama.tiled_mlp`) gives the whole-sequence logits and LoRA gradients,
unrolled or scanned, with or without remat, for Llama's and Falcon's MLPs, on an NF4 base; a
sequence that is not a whole number of tiles is padded and cut back; LoRA dropout draws the
same masks scanned or unrolled; and the compiled backward no longer holds the MLP's
``[tokens, intermediate]`` activations whole.

Tolerances, from the computation: the tiles compute every token's MLP with the same matmuls as
the whole sequence, so the logits agree to a few ulps of their scale (``1e-6`` of it, as
tests/models/test_scan.py). A weight's gradient is a sum over the ``n`` tokens of per-token
terms, which the tiles add in another order (per-tile partial sums): within
``2(n-1)·u·Σ_t|g_t|`` elementwise (``u = 2⁻²⁴``), the per-token gradients ``g_t`` taken one
token at a time, plus the same ``1e-6`` of scale for the forward's last bits.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxlora import lora
from jaxlora.config import load_config
from jaxlora.config.lora import LoraConfig
from jaxlora.model import Model
from jaxlora.models import registry, stacking
from jaxlora.models.falcon_config import FalconConfig
from jaxlora.models.llama import LlamaForCausalLM, init_params
from jaxlora.weights import Kernels, NF4Tensor, prepare, quantize
from jaxlora.weights.dispatch import staged
from jaxlora.weights.nf4 import StagedNF4
from tests.hf_models import make_hf_falcon, tiny_config


def assert_close(actual, expected):
    def one(a, b):
        b = np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, float(np.abs(b).max())))

    jax.tree.map(one, actual, expected)


CFG = dataclasses.replace(tiny_config(), num_hidden_layers=3, sliding_windows=(None,) * 3)
# Widths that are whole NF4 blocks (64), so the decoder layers' linears are 4-bit
CFG64 = dataclasses.replace(CFG, hidden_size=64, intermediate_size=128, head_dim=16)
# The Mosaic (TPU) kernels, interpreted on this CPU: tiles multiply codes laid out once a layer
MOSAIC = Kernels(platform="cpu", nf4="mosaic", interpret=True)


def _batch(B=2, S=11):
    """Two rows of 11 tokens: a packed row (two segments) and a padded one."""
    rng = np.random.default_rng(0)
    seg = np.array([[1] * 5 + [2] * 6, [1] * 8 + [0] * 3], np.int32)[:B, :S]
    pos = np.array([[*range(5), *range(6)], [*range(8), 0, 0, 0]], np.int32)[:B, :S]
    ids = rng.integers(0, CFG.vocab_size, seg.shape).astype(np.int32)
    return ids, pos, seg


def _falcon_config():
    hf = make_hf_falcon("falcon40b_gqa", num_hidden_layers=2)
    return FalconConfig.from_hf(json.loads(hf.config.to_json_string()))


def _params(config, targets, lora_dropout=0.0):
    flat = flatten_dict(registry.init_params(config, jax.random.key(0)), sep=".")
    quant = lambda k: ".layers." in k or ".h." in k
    flat = {
        k: quantize(v, blocksize=64) if quant(k) and v.ndim == 2 and v.shape[1] % 64 == 0 else v
        for k, v in flat.items()
    }
    lcfg = LoraConfig(r=4, alpha=8, target_modules=targets, init="random", dropout=lora_dropout)
    params = lora.inject(unflatten_dict(flat, sep="."), lcfg, jax.random.key(1))
    return lora.partition(params, lcfg)


def _is_nf4(w) -> bool:
    return isinstance(w, NF4Tensor) or isinstance(getattr(w, "base", None), NF4Tensor)


TARGETS = {
    "llama": ("q_proj", "gate_proj", "up_proj", "down_proj"),
    "falcon": ("query_key_value", "dense_h_to_4h", "dense_4h_to_h"),
}


@pytest.mark.parametrize("family", ["llama", "falcon", "llama-mosaic"])
def test_tiles_give_the_whole_sequence_logits_and_gradients(family):
    """``llama-mosaic``: a 4-bit base through the Mosaic kernels (interpreted), whose tiles
    multiply the codes laid out once a layer (:class:`StagedNF4`)."""
    config = {"llama": CFG, "falcon": None, "llama-mosaic": CFG64}[family] or _falcon_config()
    frozen, trainable = _params(config, TARGETS[family.split("-")[0]])
    if family == "llama-mosaic":
        frozen = prepare(frozen, MOSAIC)
        nf4 = [w for w in jax.tree.leaves(frozen, is_leaf=_is_nf4) if _is_nf4(w)]
        ready = [staged(w) for w in nf4]
        assert len(nf4) == 3 * 7 and all(
            isinstance(getattr(w, "base", w), StagedNF4) for w in ready
        )
    ids, pos, seg = _batch()
    runs = stacking.layer_runs(lora.combine(frozen, trainable), config.sliding_windows)
    stacked = stacking.stack_layers(frozen, runs), stacking.stack_layers(trainable, runs)

    def loss(t, f, remat, chunk, scanned):
        m = Model(config=config, params=lora.combine(f, t))
        logits, _ = m.module(remat=remat, mlp_chunk=chunk).apply(
            {"params": m.params}, ids, pos, seg
        )
        return jnp.sum(logits * (seg > 0)[..., None] ** 2), logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(2, 3, 4))
    (_, whole), g_whole = grad(trainable, frozen, "none", 0, False)
    assert float(jnp.max(jnp.abs(whole))) > 0.1  # not vacuous

    def token_loss(t, i):  # token i's term of the loss
        m = Model(config=config, params=lora.combine(frozen, t))
        logits, _ = m.module().apply({"params": m.params}, ids, pos, seg)
        logits = logits.reshape(-1, logits.shape[-1])
        return jnp.sum(logits[i] ** 2) * (jnp.asarray(seg).reshape(-1)[i] > 0)

    n = ids.size
    per_token = jax.jit(jax.vmap(jax.grad(token_loss), in_axes=(None, 0)))(trainable, jnp.arange(n))
    spread = jax.tree.map(lambda g: jnp.sum(jnp.abs(g), axis=0), per_token)

    def assert_grads_close(actual, expected):
        def one(a, b, s):
            scale = max(1.0, float(np.abs(b).max()))
            bound = 2 * (n - 1) * 2.0**-24 * np.asarray(s) + 1e-6 * scale
            assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= bound)

        jax.tree.map(one, actual, expected, spread)

    # tokens per tile over the 2 rows: 2 (1 position, 11 tiles), 8 (4 positions: 3 tiles, the
    # last one padded by 1), 22 (all 11 positions: one tile, the whole)
    for remat, chunk in [("none", 2), ("full", 8), ("none", 22)]:
        (_, logits), g = grad(trainable, frozen, remat, chunk, False)
        assert_close(logits, whole)
        assert_grads_close(g, g_whole)
    (_, logits), g = grad(stacked[1], stacked[0], "full", 8, True)
    assert_close(logits, whole)
    assert_grads_close(stacking.unstack_layers(g), g_whole)


def test_lora_dropout_in_tiles_is_the_same_scanned_or_unrolled():
    """Each tile folds its index into the layer's key: scanned layers draw the unrolled layers'
    masks, tile by tile; another key draws other masks."""
    frozen, trainable = _params(CFG, TARGETS["llama"], lora_dropout=0.1)
    ids, pos, seg = _batch()
    runs = stacking.layer_runs(lora.combine(frozen, trainable), CFG.sliding_windows)

    def logits(t, f, key):
        m = Model(config=CFG, params=lora.combine(f, t))
        module = m.module(remat="full", mlp_chunk=8)
        return module.apply({"params": m.params}, ids, pos, seg, rngs={"dropout": key})[0]

    run = jax.jit(logits)
    unrolled = run(trainable, frozen, jax.random.key(5))
    scanned = run(
        stacking.stack_layers(trainable, runs),
        stacking.stack_layers(frozen, runs),
        jax.random.key(5),
    )
    assert_close(scanned, unrolled)
    other = run(trainable, frozen, jax.random.key(6))
    assert float(jnp.max(jnp.abs(other - unrolled))) > 1e-3


def test_the_backward_holds_tiles_not_the_whole_mlp_activations():
    """Compiled for this CPU, the gradient of one layer with a wide MLP (intermediate 2048,
    1024 tokens): tiled, its temporaries drop by at least two whole ``[tokens, intermediate]``
    float32 buffers, the gate and up outputs the whole MLP's backward must hold (measured: four,
    32 of 64 MiB; what stays is mostly eager attention's ``[heads, S, S]`` scores)."""
    config = dataclasses.replace(
        CFG,
        num_hidden_layers=1,
        sliding_windows=(None,),
        hidden_size=64,
        intermediate_size=2048,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    lcfg = LoraConfig(r=4, alpha=8, target_modules=("gate_proj", "up_proj", "down_proj"))
    params = lora.inject(init_params(config, jax.random.key(0)), lcfg, jax.random.key(1))
    frozen, trainable = lora.partition(params, lcfg)
    S = 1024
    ids = jnp.zeros((1, S), jnp.int32)
    pos, seg = jnp.arange(S)[None], jnp.ones((1, S), jnp.int32)

    def temp_bytes(chunk: int) -> int:
        module = LlamaForCausalLM(config, remat="full", mlp_chunk=chunk)

        def loss(t):
            p = {"params": lora.combine(frozen, t)}
            h, _ = module.apply(p, ids, pos, seg, return_hidden=True)
            return jnp.sum(h**2)

        compiled = jax.jit(jax.grad(loss)).lower(trainable).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, tiled = temp_bytes(0), temp_bytes(128)
    mlp_buffer = S * config.intermediate_size * 4
    assert whole - tiled >= 2 * mlp_buffer, (whole, tiled)


def test_mlp_chunk_is_a_recipe_key_with_a_range():
    cfg = load_config("demo", ["train.mlp_chunk=2048"])
    assert cfg.train.mlp_chunk == 2048
    assert load_config("demo", []).train.mlp_chunk == 0
    with pytest.raises(Exception, match="train.mlp_chunk"):
        load_config("demo", ["train.mlp_chunk=-1"])
