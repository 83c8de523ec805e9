"""The chunked cross-entropy equals the whole-logits one: loss and every gradient, float32."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

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


def _value_and_grad(cfg, frozen, trainable, chunk, batch=None):
    batch = _batch() if batch is None else batch
    module = LlamaForCausalLM(cfg)
    combine = lora.combine if frozen is not None else (lambda f, t: t)
    fn = lambda t: loss_sum(module, combine(frozen, t), batch, chunk=chunk)[0]
    return jax.jit(jax.value_and_grad(fn))(trainable)


def _head_terms(cfg, params, batch=None):
    """``G [T, vocab]`` (the loss's gradient w.r.t. the logits: (softmax − onehot)·mask) and
    ``H [T, hidden]`` (the final hidden states): the head's gradient is ``Σ_t G_tᵀ H_t``."""
    batch = _batch() if batch is None else batch
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
    # within 2(n−1)·u of each other (n = 13 trained tokens: 1.4e-6; n = 0: both exactly 0).
    rtol = 2 * max(n - 1, 0) * U
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=rtol, atol=0)


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


# ---- only the tokens that carry loss go through the head ---------------------------------------

# Three rows of 11 positions (1 = carries loss): packed (two documents, each a masked prompt
# and its answer) then padding; a row with no loss token (a prompt cut by max_seq_len, or all
# padding); a row of one long answer, twice the first row's loss tokens.
UNEQUAL = [[0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0], [0] * 11, [0] + [1] * 10]
MASKS = {"unequal": UNEQUAL, "all masked": [[0] * 11] * 3, "every token": [[1] * 11] * 3}


def _plain_ce_sum(h, head, targets, mask, softcap=None):
    """The reference: whole ``[B, S, vocab]`` logits, no chunks, no compaction."""
    logits = jnp.einsum("bsd,vd->bsv", h, head)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask)


def _rows_data(mask):
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(3, 11, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(29, 16)) / 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 29, (3, 11)), jnp.int32)
    return h, head, targets, jnp.asarray(mask, jnp.float32)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("chunk", [7, 12, 3, 64])
@pytest.mark.parametrize("masks", list(MASKS))
def test_loss_tokens_only_equal_to_whole_logits(masks, chunk, softcap):
    """Three rows: chunks of 7 and 12 tokens (2 and 4 positions of each row, a tail of 1 and
    3), of 3 (one position, no tail), of 64 (longer than the rows: the tail alone, walked in
    quarters of 5 positions); rows of unequal loss-token counts (0, 5, 10: chunks computed
    whole, walked in quarters and skipped), every token masked, every token trained. Loss and
    the gradients w.r.t. ``h`` and a trained head equal the whole-logits reference, at the
    bounds of the model-level tests (``dL/dh`` of masked tokens: exactly 0)."""
    h, head, targets, mask = _rows_data(MASKS[masks])
    chunked = lambda h, w: chunked_ce_sum(h, w, targets, mask, chunk, softcap=softcap)
    plain = lambda h, w: _plain_ce_sum(h, w, targets, mask, softcap)
    loss, (dh, dw) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, head)
    ref, (ref_dh, ref_dw) = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(h, head)
    n = int(mask.sum())
    _assert_loss_equal(loss, ref, n)
    # dL/dh_t: the same per-token dot products over the vocabulary (1e-6 of the scale, as
    # _assert_rest_equal); 0 wherever the mask is
    np.testing.assert_allclose(dh, ref_dh, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(ref_dh))))
    assert not np.any(np.asarray(dh)[np.asarray(mask) == 0])
    # the head's gradient Σ_t G_tᵀ h_t (G: dL/dlogits, 0 on masked tokens) in another order
    G = jax.grad(lambda z: _plain_ce_sum_of_logits(z, targets, mask, softcap))(
        jnp.einsum("bsd,vd->bsv", h, head)
    )
    G, H = (np.asarray(x, np.float64).reshape(-1, x.shape[-1]) for x in (G, h))
    bound = 2 * max(n - 1, 0) * U * (np.abs(G).T @ np.abs(H))
    assert np.all(np.abs(np.asarray(dw) - np.asarray(ref_dw)) <= bound)
    # the forward alone (eval) takes the same path
    assert float(jax.jit(chunked)(h, head)) == float(loss)


def _plain_ce_sum_of_logits(logits, targets, mask, softcap):
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask)


def test_frozen_head_gets_no_gradient_and_rows_keep_their_tokens():
    """One row much longer in loss tokens than the others, the head frozen (only ``dL/dh``):
    each row's gradient lands on its own tokens, equal to the reference row by row."""
    h, head, targets, mask = _rows_data(UNEQUAL)
    dh = jax.jit(jax.grad(lambda h: chunked_ce_sum(h, head, targets, mask, 7)))(h)
    ref = jax.jit(jax.grad(lambda h: _plain_ce_sum(h, head, targets, mask)))(h)
    np.testing.assert_allclose(dh, ref, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(ref))))
    assert np.all(np.any(np.asarray(dh) != 0, axis=-1) == (np.asarray(mask) != 0))


SKIPS = {  # name: (loss positions of each of the 3 rows, chunk, a position to add a loss token)
    # 4 loss tokens a row, chunks of 2 positions: chunks 0-1 whole, 2-4 and the tail skipped
    "whole chunks": ([[1, 2, 3, 9], [0, 4, 5, 6], [7, 8, 9, 10]], 6, (2, 6)),
    # 5 a row, chunks of 4 positions: chunk 0 whole, chunk 1 (4-7) across the end, walked in
    # quarters (position 4 computed, 5-7 skipped), the tail (8-10) skipped
    "quarters": ([[0, 1, 2, 3, 9], [0, 4, 5, 6, 8], [6, 7, 8, 9, 10]], 12, (2, 5)),
}


@pytest.mark.parametrize("case", list(SKIPS))
def test_chunks_past_the_loss_tokens_are_skipped(case):
    """After compaction the loss tokens fill each row's first positions and the rest hold only
    masked tokens, whose hidden states are NaN here: were any of those positions computed,
    0 · NaN would poison the loss and the head's gradient. One more loss token in one row
    brings the next position's work, and the NaNs of the other rows there, back."""
    positions, chunk, extra = SKIPS[case]
    mask = np.zeros((3, 11), np.float32)
    for row, cols in enumerate(positions):
        mask[row, cols] = 1
    h, head, targets, mask = _rows_data(mask)
    clean = jnp.where(mask[..., None] != 0, h, 0.0)
    finite = (mask != 0).at[extra].set(True)  # the token the check at the end adds
    h = jnp.where(finite[..., None], h, jnp.nan)
    chunked = lambda h, w, m: chunked_ce_sum(h, w, targets, m, chunk)
    loss, (dh, dw) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, head, mask)
    ref, (ref_dh, ref_dw) = jax.value_and_grad(_plain_ce_sum, argnums=(0, 1))(
        clean, head, targets, mask
    )
    assert np.isfinite(float(loss)) and np.all(np.isfinite(dw)) and np.all(np.isfinite(dh))
    _assert_loss_equal(loss, ref, int(mask.sum()))
    np.testing.assert_allclose(dh, ref_dh, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(ref_dh))))
    np.testing.assert_allclose(dw, ref_dw, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(ref_dw))))
    forward = jax.jit(chunked)
    assert np.isfinite(float(forward(h, head, mask)))  # the forward alone skips them too
    assert np.isnan(float(forward(h, head, mask.at[extra].set(1))))


def _rows_batch(masks: str) -> dict[str, jax.Array]:
    """Three rows of 9 for the model: ``MASKS[masks]`` cut to 9 positions; row 1 of
    ``unequal`` is padding after a masked prompt, the others one or two documents."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 61, size=(3, 10)).astype(np.int32)
    seg = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0, 0], [1] * 9], np.int32)
    pos = np.array([[0, 1, 2, 3, 4, 5, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0, 0], list(range(9))])
    mask = np.asarray(MASKS[masks], np.float32)[:, :9]
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}
    batch |= {"segment_ids": seg, "positions": pos.astype(np.int32)}
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("masks", list(MASKS))
def test_model_rows_of_unequal_loss(masks):
    """The model's loss (:func:`loss_sum`) over three rows, a tied head trained with every
    other parameter, chunks of 7 tokens (2 positions of each row, a tail of 1): rows with 0, 4
    and 8 loss tokens, every token masked, every token trained — loss and every gradient equal
    the whole-logits ones at the bounds of :func:`test_equal_to_whole_logits`."""
    cfg = dataclasses.replace(tiny_config(), tie_word_embeddings=True)
    params = init_params(cfg, jax.random.key(0))
    batch = _rows_batch(masks)
    n = int(batch["loss_mask"].sum())
    ref_loss, ref = _value_and_grad(cfg, None, params, 0, batch)
    loss, g = _value_and_grad(cfg, None, params, 7, batch)
    _assert_loss_equal(loss, ref_loss, n)
    head = "['model']['embed_tokens']['weight']"
    G, H = _head_terms(cfg, params, batch)
    bound = 2 * max(n - 1, 0) * U * (np.abs(G).T @ np.abs(H))
    a, b = _at(g, _path(head)), _at(ref, _path(head))
    assert np.all(np.abs(a - b) <= bound), np.max(np.abs(a - b) - bound)
    _assert_rest_equal(g, ref, {head})


@pytest.mark.multidevice
def test_rows_sharded_over_devices_stay_on_them(tmp_path):
    """Rows over ``data × fsdp`` of 4 fake CPU devices (tests/training/loss_sharded_run.py):
    the same loss and gradients as one device, and no token crosses devices — the compiled
    step's only collectives are all-reduces (the loss, the longest row's count, the head's
    gradient), no all-gather, all-to-all or collective-permute of the hidden states."""
    out = tmp_path / "r.json"
    script = Path(__file__).parent / "loss_sharded_run.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["devices"] == 4 and set(res["results"]) == {"fsdp4", "data2_fsdp2"}
    for mesh, r in res["results"].items():
        assert r["collectives"] == ["all-reduce"], (mesh, r)
        # the per-device partial sums, then an all-reduce: the loss's terms regrouped (bound of
        # _assert_loss_equal); dL/dh is each token's own dot products (1e-6 of the scale, as
        # _assert_rest_equal), the head's gradient the token sum regrouped (the same)
        _assert_loss_equal(r["loss"], res["ref_loss"], res["trained_tokens"])
        assert r["dh_err"] <= 1e-6 and r["dw_err"] <= 1e-6, (mesh, r)
        assert "data" in r["dh_spec"] and "fsdp" in r["dh_spec"], (mesh, r)
