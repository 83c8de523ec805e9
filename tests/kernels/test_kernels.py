"""Pallas NF4 kernels: interpret mode against the jnp references, gradients, dispatch."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxlora.kernels import nf4_matmul as km
from jaxlora.weights import Kernels, NF4Run, kernels_for, nf4, nf4_format

# What a weight runs as: the Triton kernels in interpret mode, or dequantize-then-dot.
RUNS = {
    "interpret": NF4Run(Kernels(nf4="triton", interpret=True)),
    "dequant": NF4Run(Kernels(nf4="dequant")),
}


def _operands(m, n, k, dtype, *, seed, quant_type="nf4", blocksize=64):
    rng = np.random.default_rng(seed)
    t = nf4.quantize(
        rng.standard_normal((n, k)).astype(np.float32), quant_type=quant_type, blocksize=blocksize
    )
    x = jnp.asarray(rng.standard_normal((m, k)) / np.sqrt(k), dtype)  # outputs of order 1
    dy = jnp.asarray(rng.standard_normal((m, n)) / np.sqrt(n), dtype)
    code = tuple(float(c) for c in nf4_format.CODES[quant_type])
    return t, x, dy, jnp.asarray(t.codes), t.absmax_f32(), code


# One bf16 ulp at magnitude 1 (outputs are rounded to bf16 from float32 accumulators that
# differ only in summation order); float32 per the project's layer tolerance.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2.0**-7}


def _close(got, want, dtype):
    assert got.dtype == want.dtype == dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])


# Parameter ids avoid the bare word "gpu": tests/conftest.py skips items with that keyword.
# (M, N, K) that are not multiples of any tile: GPU tiles 16..128 (powers of two), TPU
# tiles bm<=256, bn=256, bk=512. K is a multiple of the 64-element block.
SHAPES = [(37, 75, 320), (150, 300, 192)]


@pytest.mark.parametrize("platform", ["gpu", "tpu"], ids=["triton", "mosaic"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_reference_in_interpret_mode(platform, dtype, shape):
    m, n, k = shape
    _, x, dy, codes, absmax, code = _operands(m, n, k, dtype, seed=m)
    run = functools.partial(
        km.nf4_matmul, code=code, blocksize=64, interpret=True, platform=platform
    )
    ref_y = km.reference_forward(x, codes, absmax, code=code, blocksize=64)
    _close(run(x, codes, absmax), ref_y, dtype)
    _, vjp = jax.vjp(lambda x: run(x, codes, absmax), x)
    ref_dx = km.reference_input_grad(dy, codes, absmax, code=code, blocksize=64)
    _close(vjp(dy)[0], ref_dx, dtype)


@pytest.mark.parametrize("platform", ["gpu", "tpu"], ids=["triton", "mosaic"])
def test_kernels_fp4_and_other_blocksizes(platform):
    for quant_type, bs in (("fp4", 64), ("nf4", 128), ("nf4", 32)):
        _, x, dy, codes, absmax, code = _operands(
            19, 70, 384, jnp.float32, seed=bs, quant_type=quant_type, blocksize=bs
        )
        run = functools.partial(
            km.nf4_matmul, code=code, blocksize=bs, interpret=True, platform=platform
        )
        _close(
            run(x, codes, absmax),
            km.reference_forward(x, codes, absmax, code=code, blocksize=bs),
            jnp.float32,
        )
        dx = jax.vjp(lambda x: run(x, codes, absmax), x)[1](dy)[0]  # noqa: B023
        _close(dx, km.reference_input_grad(dy, codes, absmax, code=code, blocksize=bs), jnp.float32)


def test_reference_dequantize_is_nf4tensor_dequantize():
    t, *_ = _operands(3, 21, 128, jnp.float32, seed=1)
    code = tuple(float(c) for c in nf4_format.NF4_CODE)
    for dtype in (jnp.float32, jnp.bfloat16):
        w = km.dequantize_reference(jnp.asarray(t.codes), t.absmax_f32(), code, 64, dtype)
        np.testing.assert_array_equal(np.asarray(w), np.asarray(t.dequantize(dtype)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grad_through_matmul_equals_dequantize_then_dot(dtype):
    t, *_ = _operands(1, 45, 192, dtype, seed=2)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 7, 192)) / np.sqrt(192), dtype)
    tgt = jnp.asarray(np.random.default_rng(4).standard_normal((2, 7, 45)), jnp.float32)

    def loss(x, t):
        return jnp.sum((t.matmul(x).astype(jnp.float32) - tgt) ** 2)

    def loss_ref(x):
        y = jnp.einsum(
            "...i,oi->...o", x, t.dequantize(x.dtype), preferred_element_type=jnp.float32
        )
        return jnp.sum((y.astype(x.dtype).astype(jnp.float32) - tgt) ** 2)

    want = jax.grad(loss_ref)(x)
    for run in RUNS.values():
        got = jax.grad(loss)(x, t.with_run(run))
        _close(got, want, dtype)


@pytest.mark.parametrize("mode", sorted(RUNS))
def test_frozen_weight_gets_no_gradient(mode):
    t, x, *_ = _operands(5, 33, 128, jnp.float32, seed=5)
    t = nf4.quantize(np.asarray(t.dequantize()), double_quant=False)  # float32 absmax leaf
    t = t.with_run(RUNS[mode])

    leaves, treedef = jax.tree.flatten(t)  # [codes, absmax]

    def loss(absmax):
        return jnp.sum(jax.tree.unflatten(treedef, [leaves[0], absmax]).matmul(x) ** 2)

    g = jax.grad(loss)(jnp.asarray(leaves[1]))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_cpu_default_is_the_logged_fallback(caplog):
    auto = kernels_for(jax.devices("cpu"), "auto")
    assert auto == Kernels(platform="cpu", nf4="dequant")
    t, x, *_ = _operands(3, 17, 64, jnp.float32, seed=6)
    t = t.with_run(NF4Run(auto))
    with caplog.at_level(logging.INFO, logger="jaxlora.weights.dispatch"):
        y1 = t.matmul(x)
        t.matmul(x)
    msgs = [r.getMessage() for r in caplog.records if "dequantize-then-dot" in r.getMessage()]
    assert len(msgs) == 1 and "no Pallas kernel for cpu" in msgs[0]
    want = x @ np.asarray(t.dequantize()).T
    np.testing.assert_allclose(np.asarray(y1), np.asarray(want), rtol=1e-5, atol=1e-5)
    # Flat layout (in % blocksize != 0): always the fallback, with its reason.
    tf = nf4.quantize(np.random.default_rng(7).standard_normal((9, 70)).astype(np.float32))
    tf = tf.with_run(RUNS["interpret"])
    with caplog.at_level(logging.INFO, logger="jaxlora.weights.dispatch"):
        tf.matmul(jnp.ones((2, 70)))
    assert any("flat layout" in r.getMessage() for r in caplog.records)


def test_the_kernel_follows_the_devices_not_the_default_backend():
    """A program built for TPU or GPU devices gets their kernel (AOT compiles from a CPU
    process), and modes name what they force."""
    cpu = jax.devices("cpu")
    assert kernels_for(cpu, "interpret") == Kernels("cpu", "triton", interpret=True)
    assert kernels_for(cpu, "dequant").nf4 == "dequant"

    class Dev:  # what kernels_for reads of a device
        def __init__(self, platform, cc=None):
            self.platform, self.compute_capability = platform, cc

    assert kernels_for([Dev("tpu")]).nf4 == "mosaic"
    # auto on a GPU: dequantize-then-dot, measured faster than the Triton kernel (docs/kernels.md)
    assert kernels_for([Dev("gpu", "9.0")]).nf4 == "dequant"
    assert kernels_for([Dev("gpu", "9.0")], "fused").nf4 == "triton"
    assert kernels_for([Dev("tpu")], "fused").nf4 == "mosaic"
    assert kernels_for([Dev("cuda", "7.5")]).nf4 == "dequant"  # T4: XLA's Triton needs sm_80+
    with pytest.raises(ValueError, match=r"fused: no compiled 4-bit matmul kernel for gpu sm_75"):
        kernels_for([Dev("cuda", "7.5")], "fused")
    with pytest.raises(ValueError, match=r"fused: no compiled 4-bit matmul kernel for cpu"):
        kernels_for(cpu, "fused")
    assert not kernels_for([Dev("tpu")]).fuse_lora and kernels_for(cpu).fuse_lora


def test_refusals():
    with pytest.raises(ValueError, match="kernel mode"):
        kernels_for(jax.devices("cpu"), "fast")
    _, x, _, codes, absmax, code = _operands(3, 17, 64, jnp.float32, seed=8)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="no compiled Pallas kernel"):
            km.nf4_matmul(x, codes, absmax, code=code, blocksize=64)
    with pytest.raises(ValueError, match="absmax"):
        km.nf4_matmul(x, codes, absmax[:, :0], code=code, blocksize=64, interpret=True)


@pytest.mark.parametrize(
    "platform, target", [("gpu", "cuda"), ("tpu", "tpu")], ids=["triton", "mosaic"]
)
def test_kernels_lower_for_their_backend(platform, target):
    """Lowering (Pallas -> Triton IR / Mosaic MLIR) runs on any host; compiling the IR needs
    the device (see the gpu-marked test)."""

    def fwd_bwd(x, codes, absmax):
        f = functools.partial(
            km.nf4_matmul, code=tuple(nf4_format.NF4_CODE.tolist()), blocksize=64, platform=platform
        )
        y, vjp = jax.vjp(lambda x: f(x, codes, absmax), x)
        return y, vjp(y)[0]

    args = (
        jax.ShapeDtypeStruct((37, 4096), jnp.bfloat16),
        jax.ShapeDtypeStruct((1000, 2048), jnp.uint8),
        jax.ShapeDtypeStruct((1000, 64), jnp.float32),
    )
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = export.export(jax.jit(fwd_bwd), platforms=[target], disabled_checks=checks)(*args)
    text = exp.mlir_module()
    marker = "__gpu$xla.gpu.triton" if platform == "gpu" else "tpu_custom_call"
    assert text.count(marker) >= 2, "both kernels (forward and dx) must be in the module"


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_gpu_kernels(dtype):
    for m, n, k in [(1, 4096, 4096), (300, 1000, 1088), (1024, 768, 4096)]:
        _, x, dy, codes, absmax, code = _operands(m, n, k, dtype, seed=m)
        f = jax.jit(functools.partial(km.nf4_matmul, code=code, blocksize=64))
        assert "triton" in f.lower(x, codes, absmax).as_text()
        _close(
            f(x, codes, absmax),
            km.reference_forward(x, codes, absmax, code=code, blocksize=64),
            dtype,
        )
        dx = jax.jit(lambda x, dy: jax.vjp(lambda x: f(x, codes, absmax), x)[1](dy)[0])(x, dy)  # noqa: B023
        _close(dx, km.reference_input_grad(dy, codes, absmax, code=code, blocksize=64), dtype)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
def test_compiled_tpu_kernels():
    for m, n, k in [(8, 4096, 4096), (300, 1000, 1088)]:
        _, x, dy, codes, absmax, code = _operands(m, n, k, jnp.bfloat16, seed=m)
        f = jax.jit(functools.partial(km.nf4_matmul, code=code, blocksize=64))
        _close(
            f(x, codes, absmax),
            km.reference_forward(x, codes, absmax, code=code, blocksize=64),
            jnp.bfloat16,
        )
        dx = jax.vjp(lambda x: f(x, codes, absmax), x)[1](dy)[0]  # noqa: B023
        _close(
            dx, km.reference_input_grad(dy, codes, absmax, code=code, blocksize=64), jnp.bfloat16
        )
