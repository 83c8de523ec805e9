"""Whole-array parity with transformers (torch, CPU, float32) for every supported family.

Tolerances are fixed: 1e-5 for single layers, 1e-4 for whole models.
"""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlora
from jaxlora.models.config import LlamaConfig, UnsupportedConfigError
from jaxlora.models.llama import MLP, Attention, RMSNorm, attention_mask, rope, rope_tables
from tests.hf_models import FAMILIES, hf_config, make_hf_model, random_ids

LAYER_TOL = 1e-5
MODEL_TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_ckpt(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_model(request.param, directory)
    return request.param, directory, hf_model


def torch_logits(hf_model, ids, attention_mask=None, position_ids=None):
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask))
    if position_ids is not None:
        kw["position_ids"] = torch.as_tensor(np.array(position_ids), dtype=torch.long)
    with torch.no_grad():
        return hf_model(torch.as_tensor(ids), **kw).logits.numpy()


def test_model_logits_match_transformers(family_ckpt):
    family, directory, hf_model = family_ckpt
    model = jaxlora.load_model(directory)
    ids = random_ids(3, 11)
    chex.assert_trees_all_close(
        np.asarray(model(ids)), torch_logits(hf_model, ids), atol=MODEL_TOL, rtol=0
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(family_ckpt, side):
    family, directory, hf_model = family_ckpt
    model = jaxlora.load_model(directory)
    ids = random_ids(3, 9, seed=1)
    mask = np.ones_like(ids)
    for row, n_pad in enumerate([0, 3, 5]):
        if n_pad:
            if side == "left":
                mask[row, :n_pad] = 0
            else:
                mask[row, -n_pad:] = 0
    positions = np.asarray(jaxlora.model.default_positions(jnp.asarray(mask)))
    ours = np.asarray(model(ids, attention_mask=mask))
    theirs = torch_logits(hf_model, ids, mask, positions)
    real = mask.astype(bool)
    chex.assert_trees_all_close(ours[real], theirs[real], atol=MODEL_TOL, rtol=0)
    # And every padded row equals the same row run alone, unpadded.
    for row in range(3):
        alone = ids[row : row + 1, real[row]]
        chex.assert_trees_all_close(
            ours[row][real[row]], torch_logits(hf_model, alone)[0], atol=MODEL_TOL, rtol=0
        )


def test_bfloat16_load_is_close(family_ckpt):
    _, directory, hf_model = family_ckpt
    model = jaxlora.load_model(directory, dtype="bfloat16")
    leaves = jax.tree_util.tree_leaves(model.params)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    ids = random_ids(2, 7)
    ours = np.asarray(model(ids).astype(jnp.float32))
    theirs = torch_logits(hf_model, ids)
    # bf16 has ~3 significant digits: this is a sanity bound, not a parity claim.
    assert np.abs(ours - theirs).max() < 0.05 * np.abs(theirs).max() + 0.05


# ---- single layers, 1e-5 ----------------------------------------------------------------


def _hf_and_ours(family="llama3_gqa_tied_rope", **overrides):
    hf_model = make_hf_model(family, seed=3, **overrides)
    config = LlamaConfig.from_hf(json.loads(hf_model.config.to_json_string()))
    return hf_model, config


def _params(module: torch.nn.Module) -> dict:
    from flax.traverse_util import unflatten_dict

    state = module.state_dict()
    return unflatten_dict({k: jnp.asarray(v.detach().numpy()) for k, v in state.items()}, sep=".")


def test_rmsnorm_matches():
    hf_model, config = _hf_and_ours()
    norm = hf_model.model.layers[0].input_layernorm
    x = np.random.default_rng(0).normal(size=(2, 5, 40)).astype(np.float32)
    ours = RMSNorm(40, config.rms_norm_eps).apply({"params": _params(norm)}, jnp.asarray(x))
    with torch.no_grad():
        theirs = norm(torch.as_tensor(x)).numpy()
    chex.assert_trees_all_close(np.asarray(ours), theirs, atol=LAYER_TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama2_mha", "llama3_gqa_tied_rope"])
def test_rope_matches_including_llama3_scaling(family):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf_model, config = _hf_and_ours(family)
    rotary = hf_model.model.rotary_emb
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 4, 13, config.head_dim)).astype(np.float32)  # torch (B, H, S, D)
    pos = rng.integers(0, 60, size=(2, 13))
    with torch.no_grad():
        cos, sin = rotary(torch.as_tensor(q), torch.as_tensor(pos))
        theirs, _ = apply_rotary_pos_emb(torch.as_tensor(q), torch.as_tensor(q), cos, sin)
    cs = rope_tables(jnp.asarray(pos), jnp.asarray(config.inv_freq()), jnp.float32)
    ours = rope(jnp.asarray(q.transpose(0, 2, 1, 3)), *cs)
    chex.assert_trees_all_close(
        np.asarray(ours).transpose(0, 2, 1, 3), theirs.numpy(), atol=LAYER_TOL, rtol=0
    )
    np.testing.assert_allclose(config.inv_freq(), rotary.inv_freq.numpy(), rtol=1e-6)


@pytest.mark.parametrize("family", ["llama2_mha", "qwen2", "qwen3", "mistral_window"])
def test_attention_layer_matches(family):
    hf_model, config = _hf_and_ours(family)
    layer = hf_model.model.layers[1].self_attn
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 9, 40)).astype(np.float32)
    pos = np.broadcast_to(np.arange(9), (2, 9))
    with torch.no_grad():
        cos, sin = hf_model.model.rotary_emb(torch.as_tensor(x), torch.as_tensor(pos))
        causal = torch.full((9, 9), float("-inf")).triu(1)
        if config.sliding_windows[1] is not None:
            w = config.sliding_windows[1]
            causal = causal + torch.full((9, 9), float("-inf")).tril(-w)
        theirs, _ = layer(torch.as_tensor(x), (cos, sin), causal[None, None].expand(2, 1, 9, 9))
    cs = rope_tables(jnp.asarray(pos), jnp.asarray(config.inv_freq()), jnp.float32)
    slots, segments = jnp.arange(9), jnp.ones((2, 9), jnp.int32)
    mask = attention_mask(slots, slots, segments, segments, config.sliding_windows[1])
    ours, _ = Attention(config).apply({"params": _params(layer)}, jnp.asarray(x), cs, mask)
    chex.assert_trees_all_close(np.asarray(ours), theirs.numpy(), atol=LAYER_TOL, rtol=0)


def test_mlp_matches():
    hf_model, config = _hf_and_ours("llama_bias")
    mlp = hf_model.model.layers[0].mlp
    x = np.random.default_rng(3).normal(size=(2, 5, 40)).astype(np.float32)
    ours = MLP(config).apply({"params": _params(mlp)}, jnp.asarray(x))
    with torch.no_grad():
        theirs = mlp(torch.as_tensor(x)).numpy()
    chex.assert_trees_all_close(np.asarray(ours), theirs, atol=LAYER_TOL, rtol=0)


# ---- refusing what we do not support ------------------------------------------------------


def _config_dict(family="llama2_mha", **overrides):
    d = json.loads(hf_config(family).to_json_string())
    d.update(overrides)
    return d


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4}), "proportional"),
        (dict(model_type="gemma"), "model_type"),
        (dict(architectures=["LlamaForSequenceClassification"]), "architectures"),
        (dict(some_new_field=1), "some_new_field"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(pretraining_tp=2), "pretraining_tp"),
    ],
)
def test_unsupported_config_fields_are_refused_by_name(overrides, needle):
    with pytest.raises(UnsupportedConfigError, match=needle):
        LlamaConfig.from_hf(_config_dict(**overrides))


def test_unsupported_config_in_checkpoint_names_file_and_field(tmp_path):
    make_hf_model("llama2_mha", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "proportional", "rope_theta": 1e4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=r"config\.json.*proportional"):
        jaxlora.load_model(tmp_path)


def test_legacy_rope_scaling_fields_parse():
    d = _config_dict()
    d.pop("rope_parameters")
    d["rope_theta"] = 500000.0
    d["rope_scaling"] = {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig.from_hf(d)
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor) == ("llama3", 500000.0, 8.0)
