"""The chunked cross-entropy equals the whole-logits one: loss and every gradient, float32."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlora import lora
from jaxlora.lora import LoraConfig
from jaxlora.models.llama import LlamaForCausalLM, init_params
from jaxlora.training.loss import chunked_ce_sum
from jaxlora.training.step import loss_sum
from jaxlora.weights.nf4 import quantize
from tests.hf_models import tiny_config

U = 2.0**-24  # float32 unit roundoff


def _batch() -> dict[str, jax.Array]:
    """Two rows of 9: one packed (two documents, positions restarting, the first document's
    prompt unmasked), one padded (the last three slots are segment 0, out of the loss)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 61, size=(2, 10)).astype(np.int32)
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0, 0]], np.int32)
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 0, 0]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0, 0]], np.float32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}
    return {k: jnp.asarray(v) for k, v in (batch | {"segment_ids": seg, "positions": pos}).items()}


def _value_and_grad(cfg, frozen, trainable, chunk):
    module = LlamaForCausalLM(cfg)
    combine = lora.combine if frozen is not None else (lambda f, t: t)
    fn = lambda t: loss_sum(module, combine(frozen, t), _batch(), chunk=chunk)[0]
    return jax.jit(jax.value_and_grad(fn))(trainable)


def _head_terms(cfg, params):
    """``G [T, vocab]`` (the loss's gradient w.r.t. the logits: (softmax − onehot)·mask) and
    ``H [T, hidden]`` (the final hidden states): the head's gradient is ``Σ_t G_tᵀ H_t``."""
    batch = _batch()
    module = LlamaForCausalLM(cfg)
    args = (batch["input_ids"], batch["positions"], batch["segment_ids"])

    @jax.jit
    def terms(params):
        h = module.apply({"params": params}, *args, return_hidden=True)[0]
        logits = module.apply({"params": params}, *args)[0].reshape(-1, cfg.vocab_size)
        onehot = jax.nn.one_hot(batch["targets"].reshape(-1), cfg.vocab_size)
        g = (jax.nn.softmax(logits) - onehot) * batch["loss_mask"].reshape(-1, 1)
        return g, h.reshape(-1, cfg.hidden_size)

    return tuple(np.asarray(x, np.float64) for x in terms(params))


def _assert_loss_equal(loss, ref_loss, n):
    # The same n per-token losses (each ≥ 0) summed in another order (per chunk, then across
    # chunks): each order's sum is within (n−1)·u of the exact one, relative, so the two are
    # within 2(n−1)·u of each other (n = 13 trained tokens: 1.4e-6).
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2 * (n - 1) * U, atol=0)


def _assert_rest_equal(g, ref, head_keys):
    # Everything below the head sees the same dL/dh: each token's row is the same dot products
    # over the vocabulary whatever its chunk, so these gradients are the same computation
    # (equal here; 1e-6 of the leaf's scale leaves room for a GEMM that blocks a chunk's
    # reduction differently on another host).
    for path, a in jax.tree_util.tree_leaves_with_path(g):
        if jax.tree_util.keystr(path) in head_keys:
            continue
        b = _at(ref, path)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))


def _at(tree, path):
    for k in path:
        tree = getattr(tree, k.name) if hasattr(k, "name") else tree[k.key]
    return np.asarray(tree)


N_TRAINED = 13  # loss-mask ones in _batch()


@pytest.mark.parametrize(("tied", "chunk"), [(False, 7), (True, 5), (False, 64)])
def test_equal_to_whole_logits(tied, chunk):
    """Untied and tied heads; chunks of 7 and 5 over 18 tokens (a shorter last chunk), and one
    chunk longer than the batch. Every parameter trains (the tied embedding gets both its
    lookup's and its head's gradient)."""
    cfg = dataclasses.replace(tiny_config(), tie_word_embeddings=tied)
    params = init_params(cfg, jax.random.key(0))
    ref_loss, ref = _value_and_grad(cfg, None, params, 0)
    loss, g = _value_and_grad(cfg, None, params, chunk)
    _assert_loss_equal(loss, ref_loss, N_TRAINED)
    head = "['model']['embed_tokens']['weight']" if tied else "['lm_head']['weight']"
    # The head's gradient Σ_t G_tᵀ H_t over the n trained tokens (G is 0 elsewhere) in another
    # order: elementwise within 2(n−1)·u·Σ_t |G_t|ᵀ|H_t| (the lookup's part, if tied, is the
    # same computation both ways).
    G, H = _head_terms(cfg, params)
    bound = 2 * (N_TRAINED - 1) * U * (np.abs(G).T @ np.abs(H))
    a, b = _at(g, _path(head)), _at(ref, _path(head))
    assert np.all(np.abs(a - b) <= bound), np.max(np.abs(a - b) - bound)
    _assert_rest_equal(g, ref, {head})


def _path(keystr):
    return tuple(jax.tree_util.DictKey(k) for k in keystr[2:-2].split("']['"))


@pytest.mark.parametrize("quant", [False, True])
def test_lora_on_lm_head(quant):
    """LoRA on ``lm_head`` over a float32 and over an NF4 base (the frozen base gets no
    gradient); chunks of 5 over 18 tokens."""
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))
    if quant:
        params = jax.tree_util.tree_map_with_path(
            lambda p, v: quantize(v, blocksize=32) if v.ndim == 2 and "embed" not in str(p) else v,
            params,
        )
    lcfg = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "lm_head"), init="random")
    frozen, trainable = lora.partition(lora.inject(params, lcfg, jax.random.key(1)), lcfg)
    ref_loss, ref = _value_and_grad(cfg, frozen, trainable, 0)
    loss, g = _value_and_grad(cfg, frozen, trainable, 5)
    _assert_loss_equal(loss, ref_loss, N_TRAINED)
    # dB = s·Σ_t G_tᵀ (H_t Aᵀ), dA = s·Σ_t (G_t B)ᵀ H_t: token sums in another order, bounded
    # as the plain head's with the adapter's factors in place of H and G.
    G, H = _head_terms(cfg, lora.combine(frozen, trainable))
    w = trainable["lm_head"]["weight"]
    a, b, s = np.asarray(w.a, np.float64), np.asarray(w.b, np.float64), w.scale
    k = 2 * (N_TRAINED - 1) * U * s
    bounds = {"b": k * (np.abs(G).T @ np.abs(H @ a.T)), "a": k * (np.abs(G @ b).T @ np.abs(H))}
    for name, bound in bounds.items():
        got = np.asarray(getattr(g["lm_head"]["weight"], name))
        want = np.asarray(getattr(ref["lm_head"]["weight"], name))
        assert np.all(np.abs(got - want) <= bound), (name, np.max(np.abs(got - want) - bound))
    head = {"['lm_head']['weight'].a", "['lm_head']['weight'].b"}
    _assert_rest_equal(g, ref, head)


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_ce_sum(jnp.ones((3, 2)), jnp.ones((5, 2)), jnp.zeros(3, int), jnp.ones(3), 0)


def test_final_soft_cap_is_applied_chunk_by_chunk():
    """Gemma 2's ``final_logit_softcapping``: the chunked loss caps each chunk's logits as the
    model's forward does; loss and both gradients equal the whole-logits reference (one
    reduction order apart, as :func:`_assert_loss_equal` bounds; gradients: each entry is the
    same per-token terms, summed per chunk then across chunks, 1e-6 of the array's scale)."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(13, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(29, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 29, 13), jnp.int32)
    mask = jnp.asarray(rng.random(13) < 0.8, jnp.float32)
    cap = 2.0  # the logits here are ~N(0, 16): most are bent

    def reference(h, head):
        logits = cap * jnp.tanh(h @ head.T / cap)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask)

    chunked = lambda h, head: chunked_ce_sum(h, head, targets, mask, 5, softcap=cap)
    loss, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, head)
    ref, ref_grads = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))(h, head)
    _assert_loss_equal(loss, ref, int(mask.sum()))
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(r))))
    uncapped = jax.jit(chunked_ce_sum, static_argnums=4)(h, head, targets, mask, 5)
    assert abs(float(uncapped) - float(ref)) > 1.0  # the cap bites
