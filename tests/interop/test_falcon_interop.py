"""Falcon with the PyTorch ecosystem (CPU, float32, 1e-4 on logits): PEFT adapters both ways,
merged export in transformers, and a bitsandbytes-4bit checkpoint saved by transformers."""

from __future__ import annotations

import copy

import chex
import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import jaxlora
from jaxlora.weights.nf4 import NF4Tensor
from tests.hf_models import make_hf_falcon, random_ids
from tests.interop.test_bnb_checkpoints import _bnb_config, _logits
from tests.interop.test_peft_parity import _perturb, torch_logits

MODEL_TOL = 1e-4
VARIANT = "falcon40b_gqa"  # grouped KV, biases everywhere, untied head


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("falcon_base")
    make_hf_falcon(VARIANT, directory, seed=7)
    return directory


@pytest.fixture(scope="module")
def adapter(base_dir, tmp_path_factory):
    """A PEFT adapter on every linear (``query_key_value``, ``dense``, ``dense_h_to_4h``,
    ``dense_4h_to_h``), random non-zero A and B, saved by PEFT and imported by jaxlora."""
    pm = peft.get_peft_model(
        make_hf_falcon(VARIANT, seed=7),
        peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=3,
            lora_alpha=5,
            target_modules="all-linear",
            init_lora_weights=False,
        ),
    )
    pm.eval()
    _perturb(pm)
    peft_dir = tmp_path_factory.mktemp("falcon_peft")
    pm.save_pretrained(peft_dir)
    ours = jaxlora.load_model(base_dir).load_adapter(peft_dir)
    return pm, ours


def test_peft_adapter_imports_with_peft_logits(adapter):
    pm, ours = adapter
    ids = random_ids(2, 9, seed=3)
    chex.assert_trees_all_close(
        np.asarray(ours(ids)), torch_logits(pm, ids), atol=MODEL_TOL, rtol=0
    )


def test_exported_adapter_loads_in_peft_with_the_same_logits(adapter, tmp_path):
    pm, ours = adapter
    ours.save_adapter(tmp_path)
    loaded = peft.PeftModel.from_pretrained(make_hf_falcon(VARIANT, seed=7), tmp_path).eval()
    targeted = {n.rsplit(".", 1)[-1] for n, m in loaded.named_modules() if hasattr(m, "lora_A")}
    assert targeted == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    ids = random_ids(2, 9, seed=5)
    chex.assert_trees_all_close(
        torch_logits(loaded, ids), torch_logits(pm, ids), atol=MODEL_TOL, rtol=0
    )


def test_merged_export_loads_in_transformers(adapter, tmp_path):
    pm, ours = adapter
    ids = random_ids(2, 9, seed=6)
    reference = torch_logits(copy.deepcopy(pm).merge_and_unload(), ids)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        ours.save_merged(tmp_path, dtype="float32"), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    chex.assert_trees_all_close(torch_logits(hf.eval(), ids), reference, atol=MODEL_TOL, rtol=0)


def test_transformers_bnb4_checkpoint_loads_with_equal_logits(base_dir, tmp_path, monkeypatch):
    # transformers 5 quantizes only modules whose type *is* nn.Linear, which skips Falcon's
    # FalconLinear subclass (same computation: x @ W.T + b); the 4-bit Falcon checkpoints on
    # the hub were saved when it quantized subclasses too. Building the model with nn.Linear
    # reproduces those files: query_key_value, dense, dense_h_to_4h, dense_4h_to_h in 4 bits.
    from transformers.models.falcon import modeling_falcon

    monkeypatch.setattr(modeling_falcon, "FalconLinear", torch.nn.Linear)
    q = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=_bnb_config(), dtype=torch.float32, device_map="cpu"
    )
    assert type(q.transformer.h[0].self_attention.query_key_value).__name__ == "Linear4bit"
    q.save_pretrained(tmp_path)
    model = jaxlora.load_model(tmp_path)
    is_nf4 = lambda x: isinstance(x, NF4Tensor)
    quantized = [v for v in jax.tree.leaves(model.params, is_leaf=is_nf4) if is_nf4(v)]
    assert len(quantized) == 4 * model.config.num_hidden_layers  # the four decoder linears
    ids = random_ids(2, 9)
    np.testing.assert_allclose(np.asarray(model(ids)), _logits(q, ids), atol=MODEL_TOL, rtol=0)
