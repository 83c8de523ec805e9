"""Falcon against transformers (torch, CPU, float32): whole logits <= 1e-4 (padded, packed,
scanned), one block <= 1e-5, greedy KV-cache generation equal to ``generate``, and the
config fields refused by name."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import unflatten_dict

import jaxlora
from jaxlora.lora import LoraConfig, LoraConfigError
from jaxlora.lora.targets import resolve_targets
from jaxlora.models import stacking
from jaxlora.models.config import UnsupportedConfigError
from jaxlora.models.falcon import FalconDecoderLayer
from jaxlora.models.falcon_config import FalconConfig
from jaxlora.models.llama import attention_mask, rope_tables
from tests.hf_models import (
    FALCON_VARIANTS,
    assert_greedy_equals_transformers,
    make_hf_falcon,
    random_ids,
)

LAYER_TOL = 1e-5
MODEL_TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FALCON_VARIANTS))
def ckpt(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_falcon(request.param, directory, seed=1)
    return hf_model, jaxlora.load_model(directory)


def torch_logits(hf_model, ids, mask=None, positions=None):
    kw = {} if mask is None else {"attention_mask": torch.as_tensor(mask)}
    if positions is not None:
        kw["position_ids"] = torch.as_tensor(np.array(positions), dtype=torch.long)
    with torch.no_grad():
        return hf_model(torch.as_tensor(ids), **kw).logits.numpy()


def test_logits_match_transformers(ckpt):
    hf_model, model = ckpt
    ids = random_ids(3, 11)
    ours, theirs = np.asarray(model(ids)), torch_logits(hf_model, ids)
    chex.assert_trees_all_close(ours, theirs, atol=MODEL_TOL, rtol=0)


def test_left_padded_batch_matches_transformers(ckpt):
    hf_model, model = ckpt
    ids = random_ids(3, 9, seed=1)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    positions = np.asarray(jaxlora.model.default_positions(jnp.asarray(mask)))
    ours = np.asarray(model(ids, attention_mask=mask))
    theirs = torch_logits(hf_model, ids, mask, positions)
    real = mask.astype(bool)
    chex.assert_trees_all_close(ours[real], theirs[real], atol=MODEL_TOL, rtol=0)


def test_packed_row_gives_each_example_its_own_logits(ckpt):
    # Two examples packed in one row (segments 1, 2; positions restart): each gets the logits
    # transformers gives it alone.
    hf_model, model = ckpt
    a, b = random_ids(1, 6, seed=2), random_ids(1, 5, seed=3)
    row = np.concatenate([a, b], axis=1)
    segments = np.array([[1] * 6 + [2] * 5])
    positions = np.array([list(range(6)) + list(range(5))])
    ours = np.asarray(model(row, attention_mask=segments, position_ids=positions))[0]
    chex.assert_trees_all_close(ours[:6], torch_logits(hf_model, a)[0], atol=MODEL_TOL, rtol=0)
    chex.assert_trees_all_close(ours[6:], torch_logits(hf_model, b)[0], atol=MODEL_TOL, rtol=0)


def test_scanned_layers_give_the_unrolled_logits(ckpt):
    _, model = ckpt
    runs = stacking.layer_runs(model.params, model.config.sliding_windows)
    assert runs == ((0, 2),)
    stacked = model.replace(params=stacking.stack_layers(model.params, runs))
    assert set(stacked.params["transformer"]["h"]) == {"0:2"}
    ids = random_ids(2, 7, seed=4)
    # Same layers, one compiled body: the same float32 operations in the same order.
    np.testing.assert_allclose(np.asarray(stacked(ids)), np.asarray(model(ids)), atol=1e-6)


def test_greedy_generation_matches_transformers_generate(ckpt):
    hf_model, model = ckpt
    ids = random_ids(3, 7, seed=4)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    eos = 60
    assert_greedy_equals_transformers(hf_model, model, ids, mask, 8, eos=eos)


# ---- one block, 1e-5 --------------------------------------------------------------------

BLOCKS = {
    "7b_mqa_parallel": dict(multi_query=True),
    "40b_gqa_two_norms": FALCON_VARIANTS["falcon40b_gqa"],
    "gqa_one_norm": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    "mha_sequential": dict(multi_query=False, parallel_attn=False, bias=True),
}


@pytest.mark.parametrize("variant", sorted(BLOCKS))
def test_decoder_block_matches(variant):
    hf_model = make_hf_falcon(variant, seed=3, **BLOCKS[variant])
    config = FalconConfig.from_hf(json.loads(hf_model.config.to_json_string()))
    block = hf_model.transformer.h[1]
    params = unflatten_dict(
        {k: jnp.asarray(v.numpy()) for k, v in block.state_dict().items()}, sep="."
    )
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 9, 40)).astype(np.float32)
    pos = np.broadcast_to(np.arange(9), (2, 9))
    with torch.no_grad():
        cs = hf_model.transformer.rotary_emb(torch.as_tensor(x), torch.as_tensor(pos))
        causal = torch.full((9, 9), float("-inf")).triu(1)[None, None].expand(2, 1, 9, 9)
        theirs = block(torch.as_tensor(x), None, causal, position_embeddings=cs)[0].numpy()
    slots = jnp.arange(9)
    segments = jnp.ones((2, 9), jnp.int32)
    mask = attention_mask(slots, slots, segments, segments, None)
    rope_cs = rope_tables(jnp.asarray(pos), jnp.asarray(config.inv_freq()), jnp.float32)
    ours, _ = FalconDecoderLayer(config).apply({"params": params}, jnp.asarray(x), rope_cs, mask)
    chex.assert_trees_all_close(np.asarray(ours), theirs, atol=LAYER_TOL, rtol=0)


# ---- config.json: every field used or refused by name ------------------------------------


def _raw(**overrides) -> dict:
    """A Falcon-7B-style ``config.json`` as transformers writes it (no model built)."""
    import transformers

    kw = dict(vocab_size=61, hidden_size=40, num_attention_heads=4, num_hidden_layers=2)
    return json.loads(transformers.FalconConfig(**(kw | overrides)).to_json_string())


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (dict(alibi=True), "ALiBi"),
        (dict(activation="relu"), "activation"),
        (dict(hidden_dropout=0.1), "hidden_dropout"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type"),
        (dict(apply_residual_connection_post_layernorm=True), "apply_residual_connection"),
        (dict(new_decoder_architecture=True, parallel_attn=False), "parallel_attn"),
        (dict(some_new_field=1), "some_new_field"),
    ],
)
def test_unsupported_fields_are_refused_by_name(change, needle):
    raw = _raw() | change
    with pytest.raises(UnsupportedConfigError, match=needle):
        FalconConfig.from_hf(raw)


def test_config_round_trips_through_transformers():
    raw = _raw(new_decoder_architecture=True, num_kv_heads=2, bias=True)
    config = FalconConfig.from_hf(raw)
    import transformers

    again = transformers.FalconConfig(**config.to_hf())
    assert FalconConfig.from_hf(json.loads(again.to_json_string())) == config


def test_llama_style_targets_on_falcon_name_falcon_modules(ckpt):
    _, model = ckpt
    with pytest.raises(LoraConfigError, match="'q_proj' matches no module") as err:
        resolve_targets(model.params, LoraConfig(target_modules=("q_proj", "v_proj")))
    for name in ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"):
        assert f"'{name}'" in str(err.value)
    # PEFT's default for falcon is the fused projection
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEF

    assert tuple(DEF["falcon"]) == ("query_key_value",)
    hits = resolve_targets(model.params, LoraConfig())
    assert sorted(hits) == [f"transformer.h.{i}.self_attention.query_key_value" for i in (0, 1)]


# ---- sharding: the fused query_key_value splits on whole KV groups only ---------------------


@pytest.mark.parametrize(
    ("tensor", "kv_heads", "split"), [(2, 2, True), (4, 2, False), (2, 1, False)]
)
def test_fused_qkv_shards_on_whole_kv_groups(tensor, kv_heads, split):
    from jax.sharding import AbstractMesh, PartitionSpec

    from jaxlora.config.recipe import MeshConfig
    from jaxlora.lora import inject
    from jaxlora.models.registry import fused_layouts, param_shapes
    from jaxlora.training.sharding import tree_shardings

    # 8 heads of 4 in kv_heads groups: 48 rows (kv=2) or 40 (kv=1), each divisible by `tensor`,
    # so only the group count decides whether a split falls between groups.
    new_arch = dict(new_decoder_architecture=True, num_kv_heads=2, bias=True)
    raw = _raw(hidden_size=32, num_attention_heads=8, ffn_hidden_size=64)
    raw |= new_arch if kv_heads == 2 else {}
    config = FalconConfig.from_hf(raw)
    assert config.qkv_size % tensor == 0 and config.num_key_value_heads == kv_heads
    lcfg = LoraConfig(r=2, target_modules=("query_key_value",))
    params = jax.eval_shape(lambda k: inject(param_shapes(config), lcfg, k), jax.random.key(0))
    mesh = AbstractMesh((1, 1, tensor), ("data", "fsdp", "tensor"))
    sh = tree_shardings(params, mesh, MeshConfig().rules, fused_layouts(config))
    qkv = sh["transformer"]["h"]["0"]["self_attention"]["query_key_value"]
    out = "tensor" if split else None
    assert qkv["weight"].base.spec == PartitionSpec(out, None)
    assert qkv["weight"].b.spec == PartitionSpec(out, None)
    if "bias" in qkv:
        assert qkv["bias"].spec == PartitionSpec(out)
    # the MLP is no fused projection: it splits over tensor whatever the groups
    h_to_4h = sh["transformer"]["h"]["0"]["mlp"]["dense_h_to_4h"]["weight"]
    assert h_to_4h.spec == PartitionSpec("tensor", None)


_HUB_COMMON = dict(  # fields tiiuae/falcon-7b and falcon-40b's config.json share
    alibi=False,
    apply_residual_connection_post_layernorm=False,
    architectures=["FalconForCausalLM"],
    attention_dropout=0.0,
    bias=False,
    bos_token_id=11,
    eos_token_id=11,
    hidden_dropout=0.0,
    initializer_range=0.02,
    layer_norm_epsilon=1e-05,
    model_type="falcon",
    multi_query=True,
    parallel_attn=True,
    torch_dtype="bfloat16",
    transformers_version="4.27.4",
    use_cache=True,
    vocab_size=65024,
)


@pytest.mark.parametrize(
    ("fields", "kv_heads", "qkv_rows", "norms"),
    [
        (dict(hidden_size=4544, num_attention_heads=71, num_hidden_layers=32), 1, 73 * 64, 1),
        (
            dict(
                hidden_size=8192,
                num_attention_heads=128,
                num_hidden_layers=60,
                num_kv_heads=8,
                new_decoder_architecture=True,
            ),
            8,
            (128 + 16) * 64,
            2,
        ),
    ],
)
def test_hub_falcon_configs_parse(fields, kv_heads, qkv_rows, norms):
    config = FalconConfig.from_hf(_HUB_COMMON | fields)
    assert config.num_key_value_heads == kv_heads and config.head_dim == 64
    assert config.qkv_size == qkv_rows and config.num_ln_in_parallel_attn == norms
    assert config.ffn_hidden_size == 4 * config.hidden_size and config.tie_word_embeddings


def test_stored_key_value_heads_are_derived_again_as_transformers_does():
    """transformers >= 5.25 writes ``num_key_value_heads`` into config.json and derives it again
    on load from num_kv_heads, multi_query and new_decoder_architecture: a stale one is ignored."""
    raw = _raw(new_decoder_architecture=True, num_kv_heads=2) | {"num_key_value_heads": 1}
    assert FalconConfig.from_hf(raw).num_key_value_heads == 2
    assert FalconConfig.from_hf(_raw() | {"num_key_value_heads": 4}).num_key_value_heads == 1
