"""bitsandbytes 4-bit checkpoints in and out, against transformers + bitsandbytes (CPU, float32)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import jaxlora
from jaxlora.interop.hf import save_bnb4
from jaxlora.weights.nf4 import NF4Tensor, storage_bits_per_param
from tests.hf_models import make_hf_model, random_ids

CASES = {
    # 2-D kernel layout (in % 64 == 0) and the flat layout (blocks straddle rows)
    "aligned": ("llama3_gqa_tied_rope", dict(hidden_size=64, intermediate_size=128)),
    "odd": ("qwen2", {}),
}


def _bnb_config(quant_type="nf4", double_quant=True, storage=torch.uint8):
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=storage,
    )


def _exact_bnb(model):
    """Turn off bitsandbytes' CPU fast path (AVX512-BF16 repacked weights, bf16 arithmetic,
    ~1e-3 off) so that Linear4bit computes dequantize_4bit + a float32 matmul: the numbers
    bnb's CUDA path and QLoRA's float32 compute define."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def _logits(model, ids):
    _exact_bnb(model)
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def dense_dir(request, tmp_path_factory):
    family, kw = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    make_hf_model(family, d, seed=11, **kw)
    return d


@pytest.mark.parametrize(
    "quant_type, double_quant, storage",
    [
        ("nf4", True, torch.uint8),
        ("nf4", False, torch.uint8),
        ("fp4", True, torch.uint8),
        ("nf4", True, torch.bfloat16),
    ],
)
def test_transformers_bnb_checkpoint_loads_with_equal_logits(
    dense_dir, tmp_path, quant_type, double_quant, storage
):
    q = AutoModelForCausalLM.from_pretrained(
        dense_dir,
        quantization_config=_bnb_config(quant_type, double_quant, storage),
        dtype=torch.float32,
        device_map="cpu",
    )
    q.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    model = jaxlora.load_model(tmp_path)
    leaves = [
        v
        for v in jax.tree.leaves(model.params, is_leaf=lambda x: isinstance(x, NF4Tensor))
        if isinstance(v, NF4Tensor)
    ]
    assert len(leaves) == 7 * model.config.num_hidden_layers
    assert {t.quant_type for t in leaves} == {quant_type}
    ids = random_ids(2, 9)
    np.testing.assert_allclose(np.asarray(model(ids)), _logits(q, ids), atol=1e-4, rtol=0)


def _numpy_dequantized(bnb_dir: Path) -> dict[str, torch.Tensor]:
    """Every 4-bit weight of a saved bnb checkpoint, dequantized in NumPy from the stored state
    (codes, double-quantized absmax) as bitsandbytes defines it — the reference where
    bitsandbytes' own CPU path is wrong."""
    from safetensors.numpy import load_file

    from jaxlora.weights.nf4_format import CODES, DYNAMIC_MAP

    out = {}
    for f in sorted(bnb_dir.glob("*.safetensors")):
        st = load_file(f)
        for key in st:
            if not key.endswith(".weight.quant_state.bitsandbytes__nf4"):
                continue
            p = key.removesuffix(".quant_state.bitsandbytes__nf4")
            meta = json.loads(bytes(st[key]).decode())
            packed = st[p].reshape(-1)
            codes = np.stack([packed >> 4, packed & 15], 1).reshape(-1)
            nested = np.repeat(st[p + ".nested_absmax"], meta["nested_blocksize"])
            absmax = DYNAMIC_MAP[st[p + ".absmax"].astype(int)] * nested[: st[p + ".absmax"].size]
            absmax = absmax + np.float32(meta["nested_offset"])
            w = CODES["nf4"][codes] * np.repeat(absmax, meta["blocksize"])[: codes.size]
            out[p] = torch.from_numpy(w.reshape(meta["shape"]).astype(np.float32))
    return out


@pytest.mark.parametrize("name", ["gemma2_softcap", "gemma3_text_untied"])
def test_gemma_bnb_checkpoint_loads_with_equal_logits(tmp_path, name):
    """A Gemma 2 (soft-capped, tied, sandwich norms) and a Gemma 3 (q/k norms, untied, its own
    local RoPE base) NF4 + double-quant checkpoint saved by transformers: the 7 linears of each
    layer read as stored, the same logits as transformers running the stored weights.

    The reference is transformers' dense model with the 4-bit weights dequantized in NumPy
    from the stored state: bitsandbytes 0.50's CPU ``dequantize_4bit`` is wrong for Gemma 3's
    ``[64, 48]`` ``o_proj`` here (0.018 max abs from the NumPy dequantization of the same
    bytes, which jaxlora's equals exactly), while for Gemma 2 the two agree (also asserted)."""
    make_hf_model(name, tmp_path / "dense", seed=11, hidden_size=64)
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=_bnb_config(), dtype=torch.float32
    )
    q.save_pretrained(tmp_path / "bnb")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    deq = _numpy_dequantized(tmp_path / "bnb")
    assert len(deq) == 7 * ref.config.num_hidden_layers
    ref.load_state_dict(deq, strict=False)
    model = jaxlora.load_model(tmp_path / "bnb")
    is_nf4 = lambda x: isinstance(x, NF4Tensor)
    leaves = [v for v in jax.tree.leaves(model.params, is_leaf=is_nf4) if is_nf4(v)]
    assert len(leaves) == 7 * model.config.num_hidden_layers
    ids = random_ids(2, 9)
    np.testing.assert_allclose(np.asarray(model(ids)), _logits(ref, ids), atol=1e-4, rtol=0)
    if name == "gemma2_softcap":  # bitsandbytes' own forward agrees here
        np.testing.assert_allclose(np.asarray(model(ids)), _logits(q, ids), atol=1e-4, rtol=0)


def test_jaxlora_bnb_export_loads_in_transformers(dense_dir, tmp_path):
    model = jaxlora.load_model(dense_dir, quant="nf4")
    save_bnb4(model.params, model.config, tmp_path, dtype="float32", compute_dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32)
    assert "Linear4bit" in type(theirs.model.layers[0].mlp.down_proj).__name__
    ids = random_ids(2, 9, seed=2)
    np.testing.assert_allclose(_logits(theirs, ids), np.asarray(model(ids)), atol=1e-4, rtol=0)
    # and it reads back into jaxlora bit for bit
    again = jaxlora.load_model(tmp_path)
    a = model.params["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"]
    b = again.params["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_quantize_while_loading_equals_dequantized_reference(dense_dir):
    dense = jaxlora.load_model(dense_dir)
    q = jaxlora.load_model(dense_dir, quant="nf4")
    w = q.params["model"]["layers"]["1"]["self_attn"]["q_proj"]["weight"]
    assert isinstance(w, NF4Tensor)
    # the quantized model is the dense model with its linears replaced by their dequantization
    deq = jax.tree.map(
        lambda t: t.dequantize() if isinstance(t, NF4Tensor) else t,
        q.params,
        is_leaf=lambda t: isinstance(t, NF4Tensor),
    )
    dense = dense.replace(params=deq)
    ids = random_ids(2, 9, seed=3)
    np.testing.assert_allclose(np.asarray(q(ids)), np.asarray(dense(ids)), atol=1e-5, rtol=0)


def test_storage_is_4_127_bits_per_param_with_double_quant():
    w = np.random.default_rng(0).normal(0, 0.02, size=(1024, 4096)).astype(np.float32)
    from jaxlora.weights.nf4 import quantize

    assert storage_bits_per_param(quantize(w)) == pytest.approx(4.127, abs=5e-4)
    assert storage_bits_per_param(quantize(w, double_quant=False)) == pytest.approx(4.5, abs=1e-9)
