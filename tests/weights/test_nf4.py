"""NF4/FP4 format parity with bitsandbytes 0.50.2 on CPU (the reference)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.backends.default import ops as bnb_default_ops  # noqa: E402

from jaxlora.interop import bnb as nf4_bnb  # noqa: E402
from jaxlora.weights import nf4, nf4_format  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# (out, in): odd counts, tail blocks, in % 64 == 0, in < 64, a single element.
SHAPES = [(1, 1), (3, 5), (7, 13), (11, 64), (19, 96), (13, 192), (2, 33), (9, 130)]


def _weight(shape, dtype, seed):
    """Random normal weight with an all-zero block, a zero tail and exact NF4 midpoints."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32).reshape(-1)
    n = w.size
    if n >= 128:
        w[64:128] = 0.0  # an all-zero full block
        # Block 0: absmax exactly 1, then every NF4 midpoint (computed in float32) and
        # its negative: scaled values land exactly on the rounding boundaries.
        bounds, _ = nf4_format.bounds("nf4")
        w[0] = 1.0
        w[1 : 1 + 15] = bounds
        w[16 : 16 + 15] = -bounds
    if n % 64 and n > 64:
        w[n - n % 64 :] = 0.0  # an all-zero tail block: bnb stores absmax 1e-38
    w = w.reshape(shape).astype(NP_DTYPES[dtype])
    return w, torch.from_numpy(w.astype(np.float32)).to(TORCH_DTYPES[dtype])


def _state_dict(q, st):
    return {k: v.numpy() for k, v in st.as_dict(packed=True).items()}


def test_code_tables_are_bnbs():
    for name, ours in (("nf4", nf4_format.NF4_CODE), ("fp4", nf4_format.FP4_CODE)):
        ref = F.get_4bit_type(name, device="cpu").numpy()
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    ref = F.create_dynamic_map(signed=True).numpy()
    np.testing.assert_array_equal(nf4_format.DYNAMIC_MAP.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_codes_and_absmax_bit_identical_to_bnb(quant_type, dtype):
    for i, shape in enumerate(SHAPES):
        w_np, w_t = _weight(shape, dtype, seed=i)
        q, st = F.quantize_4bit(w_t, blocksize=64, quant_type=quant_type)
        ours = nf4.quantize(w_np, quant_type=quant_type, double_quant=False)
        np.testing.assert_array_equal(np.asarray(ours.codes).reshape(-1), q.numpy().reshape(-1))
        got = np.asarray(ours.absmax).reshape(-1)
        np.testing.assert_array_equal(got.view(np.uint32), st.absmax.numpy().view(np.uint32))
        assert ours.dtype == jnp.dtype(dtype) and ours.shape == shape
        # The jnp path (used under jit) is the same code and gives the same bits.
        ours_j = jax.jit(lambda w, qt=quant_type: nf4.quantize(w, quant_type=qt))(jnp.asarray(w_np))
        ours_n = nf4.quantize(w_np, quant_type=quant_type)
        for a, b in zip(jax.tree.leaves(ours_j), jax.tree.leaves(ours_n), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes_match_bnb(blocksize):
    for i, shape in enumerate([(7, 13), (13, 192), (3, 4100)]):
        w_np, w_t = _weight(shape, "float32", seed=30 + i)
        q, st = F.quantize_4bit(
            w_t, blocksize=blocksize, quant_type="nf4", compress_statistics=True
        )
        ours = nf4.quantize(w_np, blocksize=blocksize)
        np.testing.assert_array_equal(np.asarray(ours.codes).reshape(-1), q.numpy().reshape(-1))
        t = nf4_bnb.from_bnb(q.numpy(), _state_dict(q, st))
        assert t.is_2d == (shape[1] % blocksize == 0)
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
        ref_fn = bnb_default_ops._dequantize_4bit_compute.__wrapped__
        ref = ref_fn(q.reshape(-1), absmax, st.code, blocksize, shape, torch.float32).numpy()
        np.testing.assert_array_equal(
            np.asarray(t.dequantize()).view(np.uint32), ref.view(np.uint32)
        )


def _cuda_dquantize(code, x):
    """Scalar transcription of bnb csrc/kernels.cu ``dQuantize<0>`` (float32 arithmetic)."""
    f = np.float32
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = f(-1.0), f(1.0)
    val = code[pivot]
    for i in (64, 32, 16, 8, 4, 2, 1):
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        return upper_pivot if x > (upper + val) * f(0.5) else pivot
    return lower_pivot if x < (lower + val) * f(0.5) else pivot


def test_dynamic_rounding_is_bnbs_cuda_rule():
    code = nf4_format.DYNAMIC_MAP
    mids = (code[:-1] + code[1:]) * np.float32(0.5)
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [mids, np.nextafter(mids, 2), np.nextafter(mids, -2), code, rng.uniform(-1, 1, 3000)]
    ).astype(np.float32)
    ref = np.array([_cuda_dquantize(code, v) for v in x], np.uint8)
    np.testing.assert_array_equal(nf4_format.dynamic_quantize(np, x), ref)
    np.testing.assert_array_equal(np.asarray(nf4_format.dynamic_quantize(jnp, jnp.asarray(x))), ref)
    # Away from the float32 midpoints the rule is the exact nearest code.
    rand = x[-3000:]
    dist = np.abs(rand[:, None].astype(np.float64) - code[None, :])
    picked = dist[np.arange(rand.size), ref[-3000:]]
    assert np.all(picked == dist.min(axis=1))


def test_absmax_codes_vs_bnb_cpu_lookup_table():
    """bnb's CPU build quantizes absmax with a lookup table, not the CUDA rule. On the same
    input our codes disagree with it for 0.175 % of absmax values (N(0, 0.02) weights); in
    every disagreement ours is strictly nearer, and codes more than one step apart occur only
    near 0, where the map's codes are closer together than the table's resolution."""
    w = (np.random.default_rng(1).standard_normal((1024, 4096)) * 0.02).astype(np.float32)
    _, st = F.quantize_4bit(
        torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    centered = np.abs(w.reshape(-1, 64)).max(axis=1) - st.offset.numpy()
    ref_codes, ref_nested = F.quantize_blockwise(torch.from_numpy(centered), blocksize=256)
    np.testing.assert_array_equal(ref_codes.numpy(), st.absmax.numpy())  # same input as bnb's
    ours, nested = nf4_format.quantize_dynamic_blockwise(np, centered, 256)
    np.testing.assert_array_equal(nested, ref_nested.absmax.numpy())
    bnb = ref_codes.numpy()
    differ = np.nonzero(ours != bnb)[0]
    rate = differ.size / ours.size
    assert 0 < rate < 0.003, rate
    s = (centered.reshape(-1, 256) * (np.float32(1) / nested)[:, None]).reshape(-1)[differ]
    code = nf4_format.DYNAMIC_MAP.astype(np.float64)
    d_ours = np.abs(s - code[ours[differ]])
    d_bnb = np.abs(s - code[bnb[differ]])
    assert np.all(d_ours < d_bnb)
    steps = np.abs(ours[differ].astype(int) - bnb[differ].astype(int))
    assert np.all((steps == 1) | (np.abs(s) < 1e-4))
    assert np.max(d_bnb - d_ours) < 2.0**-15  # within the table's resolution


def test_full_double_quant_vs_bnb():
    w = (np.random.default_rng(2).standard_normal((256, 4096)) * 0.02).astype(np.float32)
    q, st = F.quantize_4bit(
        torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    ours = nf4.quantize(w)
    np.testing.assert_array_equal(np.asarray(ours.codes).reshape(-1), q.numpy().reshape(-1))
    # offset is a float32 mean: summation order may move it by an ulp.
    assert abs(float(ours.offset) - st.offset.item()) <= np.spacing(np.float32(st.offset.item()))
    rate = np.mean(np.asarray(ours.absmax).reshape(-1) != st.absmax.numpy())
    assert rate < 0.003, rate


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_bnb_state_bit_identical(quant_type, dtype, double_quant):
    for i, shape in enumerate(SHAPES):
        _, w_t = _weight(shape, dtype, seed=10 + i)
        q, st = F.quantize_4bit(
            w_t, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
        )
        t = nf4_bnb.from_bnb(q.numpy(), _state_dict(q, st))
        got = np.asarray(t.dequantize().astype(jnp.float32))
        # bnb's torch reference (backends/default), i.e. the CUDA semantics.
        absmax = st.absmax
        if double_quant:
            absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
        ref_fn = bnb_default_ops._dequantize_4bit_compute.__wrapped__  # eager, not compiled
        ref = ref_fn(q.reshape(-1), absmax, st.code, 64, shape, TORCH_DTYPES[dtype]).float().numpy()
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
        if shape[1] % 64 == 0 or shape[1] % 2:
            # bnb's native CPU kernel (used for even `in`) indexes absmax per row, which is
            # only right when blocks do not straddle rows; compare where it is right.
            ref = F.dequantize_4bit(q, st).float().numpy()
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_to_bnb_from_bnb_round_trip_exact(quant_type, double_quant):
    for i, shape in enumerate([(7, 13), (11, 64), (19, 96)]):
        _, w_t = _weight(shape, "bfloat16", seed=20 + i)
        q, st = F.quantize_4bit(
            w_t, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
        )
        sd = _state_dict(q, st)
        t = nf4_bnb.from_bnb(q.numpy(), sd)
        assert t.is_2d == (shape[1] % 64 == 0)
        back = nf4_bnb.to_bnb(t)
        want = {"weight": q.numpy(), **{f"weight.{k}": v for k, v in sd.items()}}
        assert back.keys() == want.keys()
        for k, v in want.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
            np.testing.assert_array_equal(back[k].view(np.uint8), v.view(np.uint8), err_msg=k)


def test_bfloat16_quant_storage():
    _, w_t = _weight((8, 128), "float16", seed=3)
    q, st = F.quantize_4bit(
        w_t, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16
    )
    packed = q.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    t = nf4_bnb.from_bnb(packed, _state_dict(q, st))
    ref = F.dequantize_4bit(q, st).float().numpy()
    assert t.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(t.dequantize().astype(jnp.float32)), ref)
    back = nf4_bnb.to_bnb(t, quant_storage="bfloat16")["weight"]
    assert back.dtype == ml_dtypes.bfloat16 and back.shape == packed.shape
    np.testing.assert_array_equal(back.view(np.uint16), packed.view(np.uint16))


@pytest.mark.parametrize("shape", [(11, 64), (7, 13), (5, 320)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_our_quantization_dequantizes_the_same_in_bnb(shape, quant_type):
    w_np, _ = _weight(shape, "bfloat16", seed=4)
    t = nf4.quantize(w_np, quant_type=quant_type)
    sd = nf4_bnb.to_bnb(t)
    qs = F.QuantState.from_dict(
        {k.removeprefix("weight."): torch.from_numpy(v) for k, v in sd.items() if k != "weight"},
        device="cpu",
    )
    ref = F.dequantize_4bit(torch.from_numpy(sd["weight"]), qs).float().numpy()
    np.testing.assert_array_equal(np.asarray(t.dequantize().astype(jnp.float32)), ref)


def test_storage_bits_per_param():
    w = np.random.default_rng(5).standard_normal((4096, 4096)).astype(np.float32)
    t = nf4.quantize(w)
    # 4 + 8/64 + 32/(64*256) bits, plus one float32 offset for the whole tensor.
    assert round(nf4.storage_bits_per_param(t), 3) == 4.127
    assert t.nbytes == 4096 * 2048 + 4096 * 64 + 4 * 1024 + 4
    t = nf4.quantize(w[:1024], double_quant=False)
    assert nf4.storage_bits_per_param(t) == 4.5


def test_pytree_and_jit():
    w_np, _ = _weight((19, 128), "float32", seed=6)
    t = nf4.quantize(w_np)
    leaves, treedef = jax.tree.flatten(t)
    assert [np.dtype(a.dtype) for a in leaves] == [np.uint8, np.uint8, np.float32, np.float32]
    assert [a.shape for a in leaves] == [(19, 64), (19, 2), (1,), ()]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]]
    assert paths == [".codes", ".absmax", ".nested_absmax", ".offset"]
    t2 = jax.tree.unflatten(treedef, leaves)
    ref = np.asarray(t.dequantize())
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda t: t.dequantize())(t2)), ref)
    # Without double quant the two nested leaves are absent (None).
    assert len(jax.tree.leaves(nf4.quantize(w_np, double_quant=False))) == 2


def test_quantization_config_matches_transformers():
    from transformers import BitsAndBytesConfig

    for qt, dq, cd, qs in [
        ("nf4", True, "bfloat16", "uint8"),
        ("fp4", False, "float16", "bfloat16"),
    ]:
        ref = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=qt,
            bnb_4bit_use_double_quant=dq,
            bnb_4bit_compute_dtype=getattr(torch, cd),
            bnb_4bit_quant_storage=qs,
        ).to_dict()
        ours = nf4_bnb.quantization_config(
            quant_type=qt, double_quant=dq, compute_dtype=cd, quant_storage=qs
        )
        assert json.dumps(ours, sort_keys=True) == json.dumps(ref, sort_keys=True)
        parsed = nf4_bnb.parse_quantization_config(ref)
        assert parsed["quant_type"] == qt and parsed["double_quant"] == dq
        assert parsed["compute_dtype"] == cd and parsed["quant_storage"] == qs
    with pytest.raises(ValueError, match="8-bit"):
        nf4_bnb.parse_quantization_config(BitsAndBytesConfig(load_in_8bit=True).to_dict())


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        nf4.quantize(np.ones((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        nf4.quantize(np.ones((2, 64), np.int32))
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize(np.ones((2, 64), np.float32), blocksize=48)
    _, w_t = _weight((4, 64), "float32", seed=7)
    q, st = F.quantize_4bit(w_t, quant_type="nf4", compress_statistics=True)
    sd = _state_dict(q, st)
    with pytest.raises(ValueError, match="quant_map"):
        nf4_bnb.from_bnb(q.numpy(), {**sd, "quant_map": nf4_format.FP4_CODE})
    with pytest.raises(ValueError, match="packed codes"):
        nf4_bnb.from_bnb(q.numpy()[:-1], sd)
