"""The hand-written backward passes (attention core, SwiGLU, fused LoRA matmul) against
autodiff of the plain formulas they replace: values and every input gradient, float32, 1e-5."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models.attention import attend, swiglu
from jaxlora.models.llama import attention_mask
from jaxlora.weights.lora import _lora_branch, _lora_dense

TOL = 1e-5


def _close(ours, ref):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        scale = max(float(jnp.max(jnp.abs(b))), 1.0)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL * scale, rtol=0)


def _attend_autodiff(q, k, v, mask, scale):
    # The composition transformers' eager attention computes, differentiated by JAX.
    s = jnp.einsum("bkgsd,bktd->bkgst", q, k).astype(jnp.float32) * scale
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgst,bktd->bkgsd", p, v)


@pytest.mark.parametrize(
    "kv, g, window, padded",
    [(2, 2, None, False), (1, 4, 3, False), (4, 1, None, True), (2, 3, 5, True)],
)
def test_attend_matches_autodiff(kv, g, window, padded):
    B, S, D = 2, 11, 8  # S not a multiple of anything
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, kv, g, S, D))
    k = jax.random.normal(ks[1], (B, kv, S, D))
    v = jax.random.normal(ks[2], (B, kv, S, D))
    do = jax.random.normal(ks[3], (B, kv, g, S, D))
    seg = np.ones((B, S), np.int32)
    seg[0, 5:] = 2  # two packed documents in row 0
    if padded:
        seg[1, :3] = 0  # left padding in row 1: fully masked query rows
    seg = jnp.asarray(seg)
    slots = jnp.arange(S)
    mask = attention_mask(slots, slots, seg, seg, window)
    scale = D**-0.5

    def vjp(fn):
        out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, mask, scale), q, k, v)
        return out, pull(do)

    _close(vjp(attend), vjp(_attend_autodiff))


def test_swiglu_matches_autodiff():
    ks = jax.random.split(jax.random.key(1), 3)
    g, u, dy = (4 * jax.random.normal(k, (3, 7, 13)) for k in ks)
    ours = jax.vjp(swiglu, g, u)
    ref = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u)
    _close((ours[0], ours[1](dy)), (ref[0], ref[1](dy)))


@pytest.mark.parametrize("same_input", [True, False])
def test_fused_lora_matmul_matches_autodiff(same_input):
    T, n_in, n_out, r, s = 9, 13, 7, 3, 1.7
    ks = jax.random.split(jax.random.key(2), 6)
    x, w = jax.random.normal(ks[0], (T, n_in)), jax.random.normal(ks[1], (n_out, n_in))
    a, b = jax.random.normal(ks[2], (r, n_in)), jax.random.normal(ks[3], (n_out, r))
    xl = x if same_input else jax.random.normal(ks[4], (T, n_in))  # xl: after dropout
    dy = jax.random.normal(ks[5], (T, n_out))

    def plain(x, xl, w, a, b):
        return x @ w.T + s * (xl @ a.T) @ b.T

    ours = jax.vjp(lambda *p: _lora_dense(*p, s), x, xl, w, a, b)
    ref = jax.vjp(plain, x, xl, w, a, b)
    _close((ours[0], ours[1](dy)), (ref[0], ref[1](dy)))
    branch = jax.vjp(lambda x, a, b: _lora_branch(x, a, b, s), xl, a, b)
    ref_branch = jax.vjp(lambda x, a, b: s * (x @ a.T) @ b.T, xl, a, b)
    _close((branch[0], branch[1](dy)), (ref_branch[0], ref_branch[1](dy)))
