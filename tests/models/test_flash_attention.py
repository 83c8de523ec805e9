"""Flash attention (chunked jnp, splash and Pallas GPU in interpret mode) against eager attention:
outputs at real tokens and the gradients of a loss that masks padding, float32, 1e-5; padding
rows output 0. Then the model: logits at real tokens and LoRA gradients with a flash impl."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

from jaxlora.kernels.attention_chunked import block_pairs, chunked_attention
from jaxlora.kernels.attention_gpu import cudnn_attention
from jaxlora.lora import LoraConfig, combine, inject, partition
from jaxlora.models.attention import attention, attention_mask
from jaxlora.models.config import LlamaConfig
from jaxlora.models.llama import LlamaForCausalLM, init_params
from jaxlora.targets.toolchain import add_side_directory
from jaxlora.weights.dispatch import Kernels, attention_for, kernels_for
from tests.hf_models import tiny_config

TOL = 1e-5
# libtpu in the venv, or in the side directory .ci/run installs it to (put on sys.path by the
# test that compiles, only: see tests/targets/_toolchain.py)
SIDE = os.environ.get("JAXLORA_AOT_TOOLCHAIN") or os.path.abspath(".aot-toolchain")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None or os.path.isdir(f"{SIDE}/libtpu")


def _close(ours, ref, tol=TOL):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        scale = max(float(jnp.max(jnp.abs(b))), 1.0)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol * scale, rtol=0)


def _case(B, KV, G, S, D, segments, seed=0):
    """Random q, k, v, a cotangent that is 0 on padding rows (the loss masks padding), ids."""
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, KV, G, S, D))
    k = jax.random.normal(ks[1], (B, KV, S, D))
    v = jax.random.normal(ks[2], (B, KV, S, D))
    seg = np.ones((B, S), np.int32)
    if segments == "packed":  # three documents in row 0, two in the last row
        seg[0, S // 3 :] = 2
        seg[0, 2 * S // 3 :] = 3
        seg[-1, S // 2 :] = 2
    elif segments == "padded":  # right padding in row 0, left padding in the last row
        seg[0, S - 4 :] = 0
        seg[-1, :3] = 0
    elif segments == "packed+padded":
        seg[0, S // 2 :] = 2
        seg[0, S - 3 :] = 0
        seg[-1, :2] = 0
    seg = jnp.asarray(seg)
    do = jax.random.normal(ks[3], q.shape) * (seg != 0)[:, None, None, :, None]
    return q, k, v, do, seg


def _vjp(fn, q, k, v, do):
    out, pull = jax.vjp(jax.jit(fn), q, k, v)
    return out, pull(do)


def _impl(impl, seg, window, **kw):
    return lambda q, k, v: attention(
        q, k, v, segment_ids=seg, scale=q.shape[-1] ** -0.5, sliding_window=window, impl=impl, **kw
    )


def _check_against_eager(fn, q, k, v, do, seg, window, **kw):
    """``fn(q, k, v)`` against eager (``kw``: its other arguments, ``causal``, ``softcap``):
    real rows equal, padding rows 0, the same gradients."""
    out, grads = _vjp(fn, q, k, v, do)
    ref, ref_grads = _vjp(_impl("eager", seg, window, **kw), q, k, v, do)
    real = (seg != 0)[:, None, None, :, None]
    _close(jnp.where(real, out, 0), jnp.where(real, ref, 0))
    assert not np.any(np.asarray(jnp.where(real, 0, out))), "padding rows must output 0"
    _close(grads, ref_grads)


CASES = [  # (B, KV, G, S, D, segments, window)
    (2, 2, 2, 11, 8, "packed", None),
    (1, 1, 4, 19, 8, "padded", 5),  # MQA, odd length, window
    (2, 4, 1, 13, 16, "packed+padded", None),  # MHA
    (2, 2, 3, 23, 8, "packed+padded", 4),
]


@pytest.mark.parametrize("blocks", [(8, 8), (8, 16), (16, 8), (512, 512)])
@pytest.mark.parametrize("case", CASES)
def test_chunked_matches_eager(case, blocks):
    *shape, segments, window = case
    q, k, v, do, seg = _case(*shape, segments)
    bq, bkv = blocks
    kw = dict(scale=shape[-1] ** -0.5, sliding_window=window, block_q=bq, block_kv=bkv)
    _check_against_eager(
        lambda q, k, v: chunked_attention(q, k, v, seg, **kw), q, k, v, do, seg, window
    )


def test_chunked_entry_point_matches_eager():
    q, k, v, do, seg = _case(2, 2, 2, 37, 8, "packed+padded")
    _check_against_eager(_impl("chunked", seg, None), q, k, v, do, seg, None)


def test_block_pairs_skip_only_masked_blocks():
    # Brute force: a pair is listed iff its block holds an allowed (causal, in-window) entry.
    for bq, bkv, window in [(4, 4, None), (4, 8, 5), (8, 4, 3), (4, 4, 1)]:
        n = 32
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        allowed = (j <= i) & ((j > i - window) if window else True)
        want = {
            (a, b)
            for a in range(n // bq)
            for b in range(n // bkv)
            if allowed[a * bq : (a + 1) * bq, b * bkv : (b + 1) * bkv].any()
        }
        got = {tuple(p) for p in block_pairs(n // bq, n // bkv, bq, bkv, True, window).tolist()}
        assert got == want


@pytest.mark.parametrize("case", CASES)
def test_splash_interpret_matches_eager(case):
    *shape, segments, window = case
    q, k, v, do, seg = _case(*shape, segments)
    fn = _impl("splash", seg, window, interpret=True)
    _check_against_eager(fn, q, k, v, do, seg, window)


def _bf16_case():
    return tuple(
        x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x
        for x in _case(1, 2, 2, 40, 128, "packed+padded")
    )


def _close_bf16(fn, q, k, v, do, seg, window=None):
    # bf16 products, float32 softmax on both sides; they round differently (flash normalises
    # at the end): compared at bf16's resolution.
    out, grads = _vjp(fn, q, k, v, do)
    ref, ref_grads = _vjp(_impl("eager", seg, window), q, k, v, do)
    real = (seg != 0)[:, None, None, :, None]
    f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
    _close(f32(jnp.where(real, out, 0)), f32(jnp.where(real, ref, 0)), tol=2e-2)
    _close(f32(grads), f32(ref_grads), tol=2e-2)


def test_chunked_bf16():
    q, k, v, do, seg = _bf16_case()
    _close_bf16(_impl("chunked", seg, None), q, k, v, do, seg)


def test_splash_bf16():
    # The tests run with jax_default_matmul_precision="highest", which Mosaic cannot compile
    # for bf16 matmuls: the adaptor says so, and runs under the default precision.
    q, k, v, do, seg = _bf16_case()
    splash = _impl("splash", seg, None, interpret=True)
    with pytest.raises(ValueError, match="default_matmul_precision"):
        _vjp(splash, q, k, v, do)
    with jax.default_matmul_precision("default"):
        _close_bf16(splash, q, k, v, do, seg)


@pytest.mark.parametrize("case", CASES)
def test_pallas_gpu_interpret_matches_eager(case):
    *shape, segments, window = case
    q, k, v, do, seg = _case(*shape, segments)
    fn = _impl("pallas_gpu", seg, window, interpret=True)
    _check_against_eager(fn, q, k, v, do, seg, window)


@pytest.mark.parametrize(
    "case, causal, softcap",
    [
        ((2, 2, 2, 70, 8, "packed", None), True, None),  # 5 tiles of 16, D padded to 16
        ((1, 1, 4, 67, 8, "padded", 20), True, None),  # a window across tiles
        ((2, 2, 3, 50, 24, "packed+padded", 17), True, 1.5),  # D 24 -> 32, capped
        ((2, 2, 2, 50, 8, "padded", None), False, None),  # every tile visited
    ],
)
def test_pallas_gpu_tiles_match_eager(case, causal, softcap):
    """Several query and key tiles (16 rows), so the loops' bounds (tiles above the diagonal
    and outside the window skipped) and the rescaling between tiles are exercised."""
    from jaxlora.kernels.attention_gpu import pallas_gpu_attention

    *shape, segments, window = case
    q, k, v, do, seg = _case(*shape, segments)
    kw = dict(causal=causal, softcap=softcap)
    fn = lambda q, k, v: pallas_gpu_attention(
        q, k, v, seg, scale=shape[-1] ** -0.5, sliding_window=window, **kw, block=16, interpret=True
    )
    _check_against_eager(fn, q, k, v, do, seg, window, **kw)


@pytest.mark.parametrize("causal, window", [(True, None), (True, 1), (True, 20), (False, None)])
@pytest.mark.parametrize("tile", [16, 32])
def test_pallas_gpu_visits_exactly_the_tiles_with_a_visible_pair(causal, window, tile):
    """Each query tile's key tiles (forward, dq) and each key tile's query tiles (dk, dv) are
    exactly those holding a pair the causal mask and the window let through."""
    from jaxlora.kernels.attention_gpu import _Flash

    f = _Flash(1.0, causal, window, None, tile, tile, interpret=True)
    S = 8 * tile
    rows = np.arange(S)[:, None]
    visible = np.ones((S, S), bool) if not causal else rows >= np.arange(S)[None, :]
    if window is not None:
        visible &= np.arange(S)[None, :] > rows - window
    pairs = visible.reshape(8, tile, 8, tile).any(axis=(1, 3))  # [query tile, key tile]
    for i in range(8):
        lo, hi = (int(x) for x in f.key_tiles(i * tile, tile, tile, 8))
        assert list(range(lo, hi)) == list(np.flatnonzero(pairs[i])), (i, lo, hi)
        lo, hi = (int(x) for x in f.query_tiles(i * tile, tile, tile, 8))
        assert list(range(lo, hi)) == list(np.flatnonzero(pairs[:, i])), (i, lo, hi)


def _layouts(S):
    """Segment ids of three rows of ``S`` tokens: short packed documents then padding; left
    padding then one document; a document split in two runs around padding, and a third."""
    short = np.zeros(S, np.int32)
    ends = np.cumsum([5, 23, 9, 40, 17, 3, 30])
    for n, (a, b) in enumerate(zip([0, *ends[:-1]], ends, strict=True), 1):
        short[a : min(b, S - 10)] = n
    left = np.where(np.arange(S) >= S // 3, 1, 0)
    split = np.zeros(S, np.int32)
    split[:20], split[60:80], split[80:] = 1, 1, 2
    return jnp.asarray(np.stack([short, left, split]).astype(np.int32))


def test_segment_spans_give_each_tokens_segment_ends():
    from jaxlora.kernels.attention_chunked import segment_spans

    seg = np.asarray(_layouts(128))
    first, last = (np.asarray(x) for x in segment_spans(jnp.asarray(seg)))
    for b in range(seg.shape[0]):
        for p in range(seg.shape[1]):
            where = np.flatnonzero(seg[b] == seg[b, p])
            assert (first[b, p], last[b, p]) == (where[0], where[-1]), (b, p)


@pytest.mark.parametrize("causal, window", [(True, None), (True, 20), (False, None)])
def test_pallas_gpu_skips_only_tiles_of_other_documents(causal, window):
    """With segments, the tiles a loop visits hold every visible pair; for documents packed
    one after another (causal, no window) they are exactly the tiles holding one."""
    from jaxlora.kernels.attention_chunked import segment_spans
    from jaxlora.kernels.attention_gpu import _Flash

    f, tile, S = _Flash(1.0, causal, window, None, 16, 16, interpret=True), 16, 128
    n = S // tile
    seg = _layouts(S)
    first, last = segment_spans(seg)
    for b in range(seg.shape[0]):
        s = np.asarray(seg[b])
        rows = np.arange(S)[:, None]
        visible = (s[:, None] == s[None, :]) & (s[None, :] != 0)
        if causal:
            visible &= rows >= np.arange(S)[None, :]
        if window is not None:
            visible &= np.arange(S)[None, :] > rows - window
        pairs = visible.reshape(n, tile, n, tile).any(axis=(1, 3))  # [query tile, key tile]
        for i in range(n):
            at = slice(i * tile, (i + 1) * tile)
            spans = f.segment_tiles(seg[b, at], first[b, at], last[b, at], tile)
            keys = f.bounds(f.key_tiles(i * tile, tile, tile, n), spans)
            queries = f.bounds(f.query_tiles(i * tile, tile, tile, n), spans)
            for (lo, hi), want in [(keys, pairs[i]), (queries, pairs[:, i])]:
                got = set(range(int(lo), int(hi)))
                assert set(np.flatnonzero(want)) <= got, (b, i, lo, hi)
                if causal and window is None and b < 2:  # one run per document
                    assert got == set(np.flatnonzero(want)), (b, i, lo, hi)
        if causal and window is None and b == 0:  # the short documents: a band, not a triangle
            assert pairs.sum() < 0.5 * n * (n + 1) / 2


@pytest.mark.parametrize("impl", ["pallas_gpu", "chunked"])
@pytest.mark.parametrize("causal, window", [(True, None), (True, 20), (False, None)])
def test_flash_matches_eager_where_tiles_of_other_documents_are_skipped(impl, causal, window):
    """Short packed documents, left padding, and a document in two runs around tiles of
    padding alone (no key tile visited: output 0; reached by the dk, dv loop of its document's
    keys with its log-sum-exp 0): forward and gradients equal eager. Tiles of 16 (chunked:
    16 query rows, 32 keys, so a key block spans two query blocks' documents)."""
    from jaxlora.kernels.attention_gpu import pallas_gpu_attention

    seg = _layouts(128)
    q, k, v, do, _ = _case(3, 2, 2, 128, 8, "packed")
    do = do * (seg != 0)[:, None, None, :, None]
    kw = dict(causal=causal, softcap=None)
    common = dict(scale=8**-0.5, sliding_window=window, **kw)
    if impl == "pallas_gpu":
        fn = lambda q, k, v: pallas_gpu_attention(q, k, v, seg, **common, block=16, interpret=True)
    else:
        fn = lambda q, k, v: chunked_attention(q, k, v, seg, **common, block_q=16, block_kv=32)
    _check_against_eager(fn, q, k, v, do, seg, window, **kw)


@pytest.mark.parametrize("causal, window", [(True, None), (True, 20), (False, None)])
def test_chunked_walks_only_block_pairs_of_a_rows_own_documents(causal, window):
    """The live pairs hold every pair with a visible entry in some row; with one row of
    documents in one run each (causal, no window), exactly those; padding-only blocks none."""
    from jaxlora.kernels.attention_chunked import live_pairs

    S, bq, bkv = 128, 16, 32
    pairs = block_pairs(S // bq, S // bkv, bq, bkv, causal, window)
    seg = _layouts(S)
    for rows in ([0], [1], [2], [0, 1, 2]):
        s = np.asarray(seg[np.asarray(rows)])
        q_i = np.arange(S)[:, None]
        visible = (s[:, :, None] == s[:, None, :]) & (s[:, None, :] != 0)
        if causal:
            visible &= q_i >= np.arange(S)[None, :]
        if window is not None:
            visible &= np.arange(S)[None, :] > q_i - window
        blocks = visible.reshape(len(rows), S // bq, bq, S // bkv, bkv).any(axis=(0, 2, 4))
        order, count = live_pairs(pairs, jnp.asarray(s), bq, bkv)
        live = {tuple(p) for p in pairs[np.asarray(order)[: int(count)]].tolist()}
        want = {tuple(p) for p in pairs.tolist() if blocks[p[0], p[1]]}
        assert want <= live, (rows, want - live)
        assert np.all(np.diff(np.asarray(order)[: int(count)]) > 0)  # in the list's order
        if causal and window is None and rows in ([0], [1]):
            assert live == want, (rows, live - want)
    if causal and window is None:  # the short documents of row 0: a band, not the triangle
        order, count = live_pairs(pairs, seg[:1], bq, bkv)
        assert int(count) < 0.6 * len(pairs)


def _lowered_for(platform, impl, seq=256):
    """StableHLO of the attention forward and backward lowered for ``platform`` (any host)."""
    B, KV, G, D = 1, 2, 2, 128

    def fwd_bwd(q, k, v, seg, do):
        fn = lambda q, k, v: attention(q, k, v, segment_ids=seg, scale=D**-0.5, impl=impl)
        out, pull = jax.vjp(fn, q, k, v)
        return out, pull(do)

    q = jax.ShapeDtypeStruct((B, KV, G, seq, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, KV, seq, D), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((B, seq), jnp.int32)
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = export.export(jax.jit(fwd_bwd), platforms=[platform], disabled_checks=checks)
    with jax.default_matmul_precision("default"):  # bf16 on TPU: see test_splash_bf16
        return exp(q, kv, kv, seg, q).mlir_module()


def test_splash_lowers_for_tpu():
    # forward, dq and dkv kernels (compiling the Mosaic IR needs libtpu: see below)
    assert _lowered_for("tpu", "splash").count("tpu_custom_call") >= 3


def test_pallas_gpu_lowers_for_cuda():
    # the forward, dq and dk/dv kernels
    assert _lowered_for("cuda", "pallas_gpu").count("__gpu$xla.gpu.triton") >= 3


# Compiled on a GPU (tests/conftest.py skips `gpu` tests elsewhere). Lengths are not whole
# tiles and head_dim 8 is narrower than Triton's dot (the adaptor pads both).
GPU_CASES = [  # (B, KV, G, S, D, segments, window)
    (2, 2, 2, 37, 64, "packed", None),
    (1, 1, 4, 19, 16, "padded", 5),  # MQA, odd length, window
    (2, 4, 1, 130, 128, "packed+padded", None),  # MHA, several tiles
    (2, 2, 3, 300, 8, "packed+padded", 100),  # a window across tiles
]


def _one_sequence_a_row(q, do):
    """Segment ids for cuDNN's rows, one sequence each, right-padded (the first row by 4
    tokens), and ``do`` zeroed on the padding."""
    S = q.shape[3]
    seg = jnp.asarray((np.arange(S)[None, :] < np.array([S - 4, S])[: q.shape[0], None]) * 1)
    return seg, do * (seg != 0)[:, None, None, :, None].astype(do.dtype)


def _compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_pallas_gpu_compiled_matches_eager(case):
    *shape, segments, window = case
    q, k, v, do, seg = _case(*shape, segments)
    fn = _impl("pallas_gpu", seg, window)
    assert "triton" in _compiled_text(fn, q, k, v)
    _check_against_eager(fn, q, k, v, do, seg, window)


@pytest.mark.gpu
def test_pallas_gpu_compiled_bf16():
    q, k, v, do, seg = _bf16_case()
    _close_bf16(_impl("pallas_gpu", seg, None), q, k, v, do, seg)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", [(2, 2, 2, 40, 64, None), (1, 1, 4, 19, 64, 5), (2, 2, 3, 23, 128, 4)]
)
def test_cudnn_compiled_matches_eager(case):
    # cuDNN's flash attention runs bf16 (or fp16) only; rows are one sequence, right-padded.
    *shape, window = case
    q, k, v, do, _ = (
        x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in _case(*shape, "padded")
    )
    seg, do = _one_sequence_a_row(q, do)
    fn = lambda q, k, v: cudnn_attention(
        q, k, v, seg, scale=q.shape[-1] ** -0.5, sliding_window=window
    )
    assert "cudnn" in _compiled_text(fn, q, k, v)
    _close_bf16(fn, q, k, v, do, seg, window)


@pytest.mark.gpu
@pytest.mark.parametrize("remat", ["none", "full"])
def test_model_on_a_gpu_matches_dequantize_then_dot_and_eager(remat):
    """The model as ``kernels_for(..., "fused")`` builds it on an sm_80+ GPU (the Triton NF4
    matmul, Pallas flash attention) against the same GPU's dequantize-then-dot and eager attention: logits
    at real tokens, loss and LoRA gradients, float32, 1e-4 (a model)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    from jaxlora.model import Model
    from jaxlora.weights import NF4Tensor, prepare, quantize

    cfg = dataclasses.replace(tiny_config(), hidden_size=64, intermediate_size=128, head_dim=16)
    flat = flatten_dict(init_params(cfg, jax.random.key(0)), sep=".")
    flat = {
        k: quantize(v, blocksize=64) if ".layers." in k and v.ndim == 2 else v
        for k, v in flat.items()
    }
    assert sum(isinstance(v, NF4Tensor) for v in flat.values()) == 2 * 7
    lora_cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random")
    params = inject(unflatten_dict(flat, sep="."), lora_cfg, jax.random.key(1))
    frozen, trainable = partition(params, lora_cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 61, size=(2, 45)), jnp.int32)
    seg = np.ones((2, 45), np.int32)
    seg[0, 20:] = 2
    seg[1, 40:] = 0
    seg = jnp.asarray(seg)
    gpu = kernels_for(jax.devices(), "fused", seq_len=45)
    assert (gpu.nf4, gpu.attention) == ("triton", "pallas_gpu")

    def run(kernels):
        f = prepare(frozen, kernels)
        module = Model(config=cfg, params=combine(f, trainable), kernels=kernels).module(remat)
        loss = lambda t: _masked_loss(module, combine(f, t), ids, seg)
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        return step(trainable), step.lower(trainable).compile().as_text()

    ((loss, logits), grads), text = run(gpu)
    ((ref_loss, ref_logits), ref_grads), _ = run(Kernels("gpu", "dequant", attention="eager"))
    assert text.count("triton") >= 2  # the NF4 matmul's and the attention's kernels
    real = (seg != 0)[..., None]
    _close(jnp.where(real, logits, 0), jnp.where(real, ref_logits, 0), tol=1e-4)
    _close((loss, grads), (ref_loss, ref_grads), tol=1e-4)


@pytest.mark.aot
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install 'jax[tpu]')")
def test_splash_compiles_for_v5e_in_linear_memory():
    """Llama-3-8B attention (32 heads, 8 kv heads, head_dim 128, bf16) at S = 8192, forward
    and backward, compiled for one v5e chip: eager needs 16.3 GiB of temporaries there."""
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    add_side_directory()
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another compile may hold libtpu
    device = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
    sharding = SingleDeviceSharding(device)
    S, D = 8192, 128

    def fwd_bwd(q, k, v, seg, do):
        fn = lambda q, k, v: attention(q, k, v, segment_ids=seg, scale=D**-0.5, impl="splash")
        out, pull = jax.vjp(fn, q, k, v)
        return out, pull(do)

    sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    q, kv = sds((1, 8, 4, S, D)), sds((1, 8, S, D))
    with jax.default_matmul_precision("default"):  # the tests' "highest" fails for bf16
        compiled = jax.jit(fwd_bwd).lower(q, kv, kv, sds((1, S), jnp.int32), q).compile()
    # 0.19 GiB measured: splash's float32 logsumexp residual, (32, S, 128 lanes), and copies of it
    assert compiled.memory_analysis().temp_size_in_bytes < 2**30


@pytest.mark.parametrize("case", CASES)
def test_cudnn_adaptor_through_xla_matches_eager(case):
    # cuDNN needs a GPU; jax.nn.dot_product_attention's XLA implementation takes the same call,
    # which checks the adaptor's layouts, lengths and window. Rows: one sequence, right-padded.
    *shape, _, window = case
    q, k, v, do, _ = _case(*shape, "padded")
    seg, do = _one_sequence_a_row(q, do)
    kw = dict(scale=q.shape[-1] ** -0.5, sliding_window=window, implementation="xla")
    fn = lambda q, k, v: cudnn_attention(q, k, v, seg, **kw)
    _check_against_eager(fn, q, k, v, do, seg, window)


def test_unknown_impl_and_window_without_causal_are_refused():
    q, k, v, _, seg = _case(1, 1, 2, 8, 8, "padded")
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, segment_ids=seg, scale=1.0, impl="flash")
    with pytest.raises(ValueError, match="causal"):
        attention(q, k, v, segment_ids=seg, scale=1.0, causal=False, sliding_window=3)


def test_attention_follows_the_devices():
    assert attention_for("tpu", 128) == "splash"
    assert attention_for("gpu", 4096, packed=False) == "cudnn"
    assert attention_for("gpu", 4096) == "pallas_gpu"  # packed rows, windows or not
    assert attention_for("cpu", 256) == "eager"
    assert attention_for("cpu", 2048) == "chunked"
    cpu = jax.devices("cpu")
    assert kernels_for(cpu, seq_len=128).attention == "eager"
    assert kernels_for(cpu, seq_len=2048).attention == "chunked"

    class Tpu:
        platform = "tpu"

    # one chip: splash; several devices with no mesh roles given: chunked, which XLA
    # partitions (with them, splash under shard_map: tests/kernels/test_attention_sharded.py)
    assert kernels_for([Tpu()], seq_len=2048) == Kernels("tpu", "mosaic", attention="splash")
    assert kernels_for([Tpu()] * 8, seq_len=2048).attention == "chunked"

    class T4:  # sm_75: neither flash kernel (cuDNN, Triton) nor the Triton NF4 matmul runs
        platform = "gpu"
        compute_capability = "7.5"

    class H100:
        platform = "gpu"
        compute_capability = "9.0"

    assert kernels_for([T4()], seq_len=2048) == Kernels("gpu", "dequant", attention="chunked")
    assert kernels_for([H100()], seq_len=2048) == Kernels("gpu", "dequant", attention="pallas_gpu")
    assert kernels_for([H100()], "fused", seq_len=2048).nf4 == "triton"
    assert attention_for("gpu", 2048, packed=False, compute_capability=(7, 5)) == "chunked"


def _masked_loss(module, params, ids, seg):
    positions = jnp.maximum(jnp.cumsum(seg != 0, axis=1) - 1, 0)
    logits, _ = module.apply({"params": params}, ids, positions, seg)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    mask = (seg[:, 1:] != 0) & (seg[:, 1:] == seg[:, :-1])
    return jnp.sum(ce * mask) / jnp.sum(mask), logits


@pytest.mark.parametrize("remat", ["none", "full"])
def test_model_with_chunked_attention_matches_eager(remat):
    # GQA, a sliding-window layer and a full one, packed and padded rows.
    cfg = dataclasses.replace(tiny_config(), sliding_windows=(4, None))
    lora_cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random")
    params = inject(init_params(cfg, jax.random.key(0)), lora_cfg, jax.random.key(1))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 61, size=(2, 13)), jnp.int32)
    seg = np.ones((2, 13), np.int32)
    seg[0, 6:] = 2
    seg[1, 10:] = 0
    seg = jnp.asarray(seg)
    frozen, trainable = partition(params, lora_cfg)

    def run(impl):
        module = LlamaForCausalLM(cfg, remat=remat, attn_impl=impl)
        loss = lambda t: _masked_loss(module, combine(frozen, t), ids, seg)
        return jax.value_and_grad(loss, has_aux=True)(trainable)

    (loss, logits), grads = run("chunked")
    (ref_loss, ref_logits), ref_grads = run("eager")
    real = (seg != 0)[..., None]
    _close(jnp.where(real, logits, 0), jnp.where(real, ref_logits, 0), tol=1e-4)
    _close((loss, grads), (ref_loss, ref_grads), tol=1e-4)


def test_model_refuses_unknown_impl():
    cfg = LlamaConfig(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        rms_norm_eps=1e-6,
    )
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="attn_impl"):
        LlamaForCausalLM(cfg, attn_impl="flash").init(jax.random.key(0), ids, ids, ids)


# ---- soft-capped scores (Gemma 2) -------------------------------------------------------------

CAP = 1.5  # the scores here are ~N(0, 1) (unit q, k; scale 1/sqrt(D)): the cap bends most


def _plain_capped(q, k, v, seg, window):
    """Soft-capped attention as transformers writes it (cap after the scale, before the mask),
    differentiated by JAX: the reference for the hand-written backward passes."""
    slots = jnp.arange(q.shape[3])
    mask = attention_mask(slots, slots, seg, seg, window)
    s = jnp.einsum("bkgsd,bktd->bkgst", q, k) * q.shape[-1] ** -0.5
    s = jnp.where(mask, CAP * jnp.tanh(s / CAP), jnp.finfo(jnp.float32).min)
    return jnp.einsum("bkgst,bktd->bkgsd", jax.nn.softmax(s, axis=-1), v)


@pytest.fixture(scope="module")
def capped_case():
    """GQA, packed and padded rows, window 4 < 23 tokens, and the plain computation's output
    and gradients (computed once for every implementation)."""
    *shape, segments, window = CASES[3]
    q, k, v, do, seg = _case(*shape, segments)
    ref = _vjp(lambda q, k, v: _plain_capped(q, k, v, seg, window), q, k, v, do)
    return (q, k, v, do, seg), window, ref


@pytest.mark.parametrize(
    "impl, interpret",
    [
        ("eager", False),
        ("chunked", False),
        ("splash", True),
        ("pallas_gpu", True),
        pytest.param("pallas_gpu", False, marks=pytest.mark.gpu),  # compiled on a GPU
    ],
)
def test_soft_capped_attention_matches_the_plain_computation(impl, interpret, capped_case):
    (q, k, v, do, seg), window, (ref, ref_grads) = capped_case
    kw = {"interpret": True} if interpret else {}
    out, grads = _vjp(_impl(impl, seg, window, softcap=CAP, **kw), q, k, v, do)
    real = (seg != 0)[:, None, None, :, None]
    _close(jnp.where(real, out, 0), jnp.where(real, ref, 0))
    _close(grads, ref_grads)
    if impl == "eager":  # the cap bites: uncapped attention is far from the reference
        scale = q.shape[-1] ** -0.5
        uncapped = attention(q, k, v, segment_ids=seg, scale=scale, sliding_window=window)
        assert float(jnp.max(jnp.abs(jnp.where(real, uncapped - ref, 0)))) > 1e-2


def test_soft_capped_scores_take_pallas_gpu_on_gpus_and_cudnn_refuses_them(caplog):
    assert attention_for("gpu", 4096, softcap=True) == "pallas_gpu"
    assert attention_for("gpu", 4096, packed=False, softcap=True) == "pallas_gpu"
    assert attention_for("tpu", 4096, softcap=True) == "splash"  # splash caps itself

    class A100:
        platform = "gpu"
        compute_capability = "8.0"

    with caplog.at_level("INFO", logger="jaxlora.weights.dispatch"):
        capped = kernels_for([A100()], seq_len=4096, packed=False, softcap=True)
    assert capped.attention == "pallas_gpu" and "soft-capping" in caplog.text
    q, k, v, _, seg = _case(1, 1, 2, 8, 8, "padded")
    with pytest.raises(NotImplementedError, match="soft-capping"):
        cudnn_attention(q, k, v, seg, implementation="xla", scale=1.0, softcap=CAP)


def test_pallas_gpu_tiles_shrink_as_rows_widen_and_too_wide_is_refused():
    """Tile rows by the bytes of a row (head_dim padded to a power of two × itemsize): what
    compiles within an L4's shared memory (tests/targets/test_aot.py compiles each width)."""
    from jaxlora.kernels.attention_gpu import tile_rows

    bf16, f32 = jnp.bfloat16, jnp.float32
    assert [tile_rows(64, bf16), tile_rows(64, f32), tile_rows(128, bf16)] == [128, 128, 128]
    assert [tile_rows(96, f32), tile_rows(128, f32), tile_rows(256, bf16)] == [32, 32, 32]
    assert tile_rows(256, f32) == 16
    with pytest.raises(NotImplementedError, match="head_dim 512 at float32"):
        tile_rows(512, f32)
