"""Phi-3 / 3.5 / Phi-4 (``model_type: phi3``) against transformers (torch, CPU, float32).

The tiny model (tests/hf_models.py ``phi3``) has what the family's checkpoints have: fused
``qkv_proj`` and ``gate_up_proj``, GQA, partial rotary (6 of 10 head dims), longrope and a
sliding window shorter than the rows. Whole logits, padded batches and bfloat16 loading are
checked by test_llama_parity.py's per-family tests; PEFT both ways and the merged export by
tests/interop/test_peft_parity.py (case ``phi3_fused``). Here: single layers (1e-5), packed
rows, greedy generation with the KV cache, the longrope switch, a bitsandbytes 4-bit
checkpoint, and what is refused.
"""

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
from jaxlora.models.config import LlamaConfig, UnsupportedConfigError
from jaxlora.models.llama import MLP, Attention, attention_mask, config_rope_tables
from jaxlora.sampling import generate_ids
from tests.hf_models import assert_greedy_equals_transformers, hf_config, make_hf_model, random_ids

LAYER_TOL = 1e-5
MODEL_TOL = 1e-4


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    directory = tmp_path_factory.mktemp("phi3")
    hf = make_hf_model("phi3", directory, seed=2)
    return directory, hf, jaxlora.load_model(directory)


def _params(module: torch.nn.Module) -> dict:
    state = module.state_dict()
    return unflatten_dict({k: jnp.asarray(v.numpy()) for k, v in state.items()}, sep=".")


def test_attention_layer_matches(phi3):
    """20 positions: longrope's long factors (whole logits check the short ones), partial
    rotary, the window of 6 shorter than the row."""
    _, hf, model = phi3
    seq = 20
    cfg = model.config
    layer = hf.model.layers[1].self_attn
    x = np.random.default_rng(seq).normal(size=(2, seq, 40)).astype(np.float32)
    pos = np.tile(np.arange(seq), (2, 1))
    w = cfg.sliding_windows[1]
    with torch.no_grad():
        cos, sin = hf.model.rotary_emb(torch.as_tensor(x), torch.as_tensor(pos))
        inf = torch.full((seq, seq), float("-inf"))
        mask = (inf.triu(1) + inf.tril(-w))[None, None].expand(2, 1, seq, seq)
        theirs, _ = layer(torch.as_tensor(x), (cos, sin), mask)
    cs = config_rope_tables(cfg, jnp.asarray(pos), jnp.float32)
    chex.assert_trees_all_close(np.asarray(cs[0]), cos.numpy(), atol=LAYER_TOL, rtol=0)
    slots, segments = jnp.arange(seq), jnp.ones((2, seq), jnp.int32)
    m = attention_mask(slots, slots, segments, segments, w)
    ours, _ = Attention(cfg).apply({"params": _params(layer)}, jnp.asarray(x), cs, m)
    chex.assert_trees_all_close(np.asarray(ours), theirs.numpy(), atol=LAYER_TOL, rtol=0)


def test_mlp_matches(phi3):
    _, hf, model = phi3
    mlp = hf.model.layers[0].mlp
    x = np.random.default_rng(3).normal(size=(2, 5, 40)).astype(np.float32)
    ours = MLP(model.config).apply({"params": _params(mlp)}, jnp.asarray(x))
    with torch.no_grad():
        theirs = mlp(torch.as_tensor(x)).numpy()
    chex.assert_trees_all_close(np.asarray(ours), theirs, atol=LAYER_TOL, rtol=0)


def test_packed_row_equals_each_example_alone(phi3):
    _, hf, model = phi3
    lengths = (7, 9)
    ids = random_ids(1, sum(lengths), seed=5)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    ours = np.asarray(model(ids, attention_mask=segments, position_ids=positions))[0]
    start = 0
    for n in lengths:
        with torch.no_grad():
            alone = hf(torch.as_tensor(ids[:, start : start + n])).logits.numpy()[0]
        chex.assert_trees_all_close(ours[start : start + n], alone, atol=MODEL_TOL, rtol=0)
        start += n


def test_greedy_generation_matches_transformers_generate(phi3):
    _, hf, model = phi3
    ids = random_ids(2, 7, seed=4)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    assert_greedy_equals_transformers(hf, model, ids, mask, 8, eos=60)
    # 7 + 11 tokens would cross original_max_position_embeddings=16 mid-generation, where
    # transformers recomputes the cache with the long factors: refused, with the reason.
    with pytest.raises(NotImplementedError, match="recomputes the whole KV cache"):
        generate_ids(
            model.module(),
            model.params,
            jnp.asarray(ids, jnp.int32),
            jnp.asarray(mask, jnp.int32),
            jnp.asarray([60], jnp.int32),
            jax.random.key(0),
            max_new_tokens=11,
        )


def test_bnb_4bit_checkpoint_loads_with_transformers_logits(phi3, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.interop.test_bnb_checkpoints import _bnb_config, _logits

    directory, _, _ = phi3
    q = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=_bnb_config(), dtype=torch.float32, device_map="cpu"
    )
    q.save_pretrained(tmp_path)
    model = jaxlora.load_model(tmp_path)
    fused = model.params["model"]["layers"]["0"]["self_attn"]["qkv_proj"]["weight"]
    assert type(fused).__name__ == "NF4Tensor"
    ids = random_ids(2, 9)
    np.testing.assert_allclose(np.asarray(model(ids)), _logits(q, ids), atol=MODEL_TOL, rtol=0)


def test_unset_target_modules_names_the_phi3_presets(phi3):
    _, _, model = phi3
    with pytest.raises(LoraConfigError, match="qkv_proj.*all-linear"):
        resolve_targets(model.params, LoraConfig(r=2))
    hits = resolve_targets(model.params, LoraConfig(r=2, target_modules="all-linear"))
    names = {m.rsplit(".", 1)[1] for m in hits}
    assert names == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


# ---- config.json ------------------------------------------------------------------------


def test_phi35_and_phi4_mini_configs_parse():
    """The fields the hub checkpoints carry (values from microsoft/Phi-3.5-mini-instruct and
    Phi-4-mini-instruct; factor lists shortened to the tiny rotary size)."""
    phi35 = hf_config("phi3").to_dict() | {
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config"},
        "rope_parameters": None,
        "rope_scaling": {"type": "longrope", "short_factor": [1, 1, 1], "long_factor": [2, 3, 4]},
        "original_max_position_embeddings": 16,
        "max_position_embeddings": 64,
        "attention_bias": False,
    }
    cfg = LlamaConfig.from_hf(phi35)
    assert cfg.rope_scaling.long_factor == (2.0, 3.0, 4.0)
    assert cfg.rope_scaling.attention_factor == pytest.approx(np.sqrt(1 + np.log(4) / np.log(16)))
    phi4_mini = phi35 | {
        "full_attn_mod": 1,
        "interpolate_factor": 1,
        "lm_head_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
    }
    assert LlamaConfig.from_hf(phi4_mini).rotary_dim == 6
    assert LlamaConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(resid_pdrop=0.1), "resid_pdrop"),
        (dict(full_attn_mod=2), "full_attn_mod"),
        (dict(lm_head_bias=True), "lm_head_bias"),
        (dict(layer_types=["full_attention"] * 2), "layer_types"),
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
        (dict(partial_rotary_factor=0.5, rope_parameters=None), "partial_rotary_factor"),
    ],
)
def test_unsupported_phi3_fields_are_refused_by_name(overrides, needle):
    cfg = hf_config("phi3").to_dict() | overrides
    with pytest.raises(UnsupportedConfigError, match=needle):
        LlamaConfig.from_hf(cfg)


def test_fused_projections_shard_on_whole_heads_and_halves(phi3):
    """qkv_proj of the tiny model is q | k | v = 4 | 2 | 2 heads of 10 rows, gate_up_proj
    37 | 37 rows: ``out`` splits over ``tensor`` only where each shard is whole heads inside
    one of q, k, v (4 ways: 2 heads each; not 2 ways, which would put k and v in one shard) or
    whole rows inside gate or up (2 ways)."""
    import types

    from jax.tree_util import DictKey

    from jaxlora.config.recipe import _default_rules
    from jaxlora.models.registry import fused_layouts
    from jaxlora.training.sharding import leaf_spec

    _, _, model = phi3
    fused = fused_layouts(model.config)

    def spec(module, leaf, shape, tensor):
        mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": tensor})
        path = [DictKey(k) for k in ("model", "layers", "0", "mlp", module, leaf)]
        return tuple(leaf_spec(path, shape, _default_rules(), mesh, fused))

    assert spec("qkv_proj", "weight", (80, 40), 4) == ("tensor", None)
    assert spec("qkv_proj", "weight", (80, 40), 2) == (None, None)
    assert spec("qkv_proj", "b", (80, 3), 4) == ("tensor", None)  # LoRA B follows `out`
    assert spec("gate_up_proj", "weight", (74, 40), 2) == ("tensor", None)
    assert spec("gate_up_proj", "weight", (74, 40), 4) == (None, None)  # 74 rows: no quarters
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 4})
    path = [DictKey(k) for k in ("model", "layers", "0", "self_attn", "qkv_proj", "weight")]
    assert tuple(leaf_spec(path, (80, 40), _default_rules(), mesh)) == (None, None)  # no layout


def test_phi3_chat_template_trains_each_reply_and_its_end(tmp_path):
    """Phi-3's template closes a conversation with EOS only when not generating, so a reply
    rendered alone ends in ``<|end|>\\n</s>`` while inside the conversation it is followed by
    the next turn: each reply trains up to its ``<|end|>\\n``, the last one also the EOS."""
    from jaxlora.config import DataConfig
    from jaxlora.data import load_records, tokenize
    from tests._tokenizers import make_phi3_tokenizer

    tok = make_phi3_tokenizer()
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus three?"},
        {"role": "assistant", "content": "five"},
        {"role": "user", "content": "And plus four?"},
        {"role": "assistant", "content": "nine"},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    cfg = DataConfig(path=str(path), format="chat", max_seq_len=251, val_size=0)
    (ex,), _ = tokenize(load_records(cfg), tok, cfg)
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=False)
    assert decode(ex.tokens) == tok.apply_chat_template(msgs, tokenize=False)
    assert decode(ex.tokens[ex.trained]) == "five<|end|>\nnine<|end|>\n</s>"
