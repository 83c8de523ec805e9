"""RoPE yarn / dynamic / longrope against transformers (torch, CPU, float32).

Each rule is checked on whole logits (1e-4) for a call shorter and a call longer than the
length where it changes (``max_position_embeddings`` for dynamic, the original length for
longrope), and, for the two that choose per call, on greedy generation whose KV cache crosses
that length. transformers' dynamic rule keeps grown frequencies in module state; the calls here
go short then long on a fresh model, the order in which its state equals the per-call rule.
"""

from __future__ import annotations

import chex
import numpy as np
import pytest
import torch

import jaxlora
from jaxlora.models.config import LlamaConfig, UnsupportedConfigError
from tests.hf_models import assert_greedy_equals_transformers, hf_config, make_hf_model, random_ids

MODEL_TOL = 1e-4
LONGROPE = dict(
    rope_type="longrope",
    rope_theta=10000.0,
    short_factor=[1.0, 1.2, 1.5, 2.0, 2.5],
    long_factor=[1.5, 2.5, 4.0, 6.0, 9.0],
    original_max_position_embeddings=16,
)
# name: (family, config overrides): each type on a Llama or a Qwen. rope_theta=100 widens
# yarn's ramp over head_dim=10.
CASES = {
    "yarn_qwen2": (  # Qwen2.5's form: factor + original length, the default attention factor
        "qwen2",
        dict(
            max_position_embeddings=64,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=100.0, factor=4.0, original_max_position_embeddings=16
            ),
        ),
    ),
    "yarn_mscale_llama": (
        "llama2_mha",
        dict(
            max_position_embeddings=64,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=100.0,
                factor=4.0,
                original_max_position_embeddings=16,
                beta_fast=16,
                beta_slow=2,
                mscale=1.2,
                mscale_all_dim=0.8,
                truncate=False,
            ),
        ),
    ),
    "dynamic_llama": (
        "llama2_mha",
        dict(
            max_position_embeddings=16,
            rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=3.0),
        ),
    ),
    "dynamic_qwen3": (
        "qwen3",
        dict(
            max_position_embeddings=16,
            rope_parameters=dict(rope_type="dynamic", rope_theta=1000.0, factor=2.0),
        ),
    ),
    "longrope_llama": ("llama2_mha", dict(max_position_embeddings=64, rope_parameters=LONGROPE)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    make_hf_model(family, directory, seed=4, **overrides)
    return request.param, directory, jaxlora.load_model(directory)


def _fresh_hf(directory):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_logits_match_below_and_above_the_switch(case):
    name, directory, model = case
    hf = _fresh_hf(directory)
    assert model.config.rope_type == name.split("_")[0]
    for seq in (11, 23):  # 16 is where dynamic grows and longrope takes the long factors
        ids = random_ids(2, seq, seed=seq)
        with torch.no_grad():
            theirs = hf(torch.as_tensor(ids)).logits.numpy()
        chex.assert_trees_all_close(np.asarray(model(ids)), theirs, atol=MODEL_TOL, rtol=0)
    rotary = hf.model.rotary_emb
    np.testing.assert_allclose(model.config.inv_freq(), rotary.original_inv_freq.numpy(), rtol=1e-6)
    # what an export writes (config.to_hf) is the same rule again, in transformers and here
    exported = model.config.to_hf()
    assert LlamaConfig.from_hf(exported) == model.config
    again = type(hf.config).from_dict(exported)
    again_rotary = type(rotary)(again)
    assert again_rotary.attention_scaling == pytest.approx(rotary.attention_scaling, rel=1e-12)
    np.testing.assert_array_equal(again_rotary.inv_freq.numpy(), rotary.original_inv_freq.numpy())


@pytest.mark.parametrize("name", ["dynamic_llama", "longrope_llama"])
def test_greedy_generation_crossing_the_switch_matches_generate(name, tmp_path):
    """Prompt of 12, 10 new tokens: the decode steps at positions 16.. grow the dynamic base
    (one new base per step) or switch longrope to the long factors while the cached keys keep
    the rotation they were written with, in both implementations."""
    family, overrides = CASES[name]
    make_hf_model(family, tmp_path, seed=4, **overrides)
    hf, model = _fresh_hf(tmp_path), jaxlora.load_model(tmp_path)
    ids = random_ids(2, 12, seed=6)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    assert_greedy_equals_transformers(hf, model, ids, mask, 10, eos=60)


@pytest.mark.parametrize(
    "rope, needle",
    [
        (dict(rope_type="yarn", rope_theta=1e4), r"missing \['factor'"),
        (dict(rope_type="dynamic", rope_theta=1e4, factor=2.0, beta_fast=3), "beta_fast"),
        ({**LONGROPE, "short_factor": [1.0, 2.0]}, "short_factor"),
        (dict(rope_type="ntk_by_parts", rope_theta=1e4), "rope_type"),
    ],
)
def test_bad_rope_parameters_are_refused_by_name(rope, needle):
    cfg = hf_config("llama2_mha").to_dict() | {"rope_parameters": rope}
    with pytest.raises(UnsupportedConfigError, match=needle):
        LlamaConfig.from_hf(cfg)


def test_partial_rotary_inside_the_rope_dict_is_refused_outside_phi3():
    rope = dict(rope_type="dynamic", rope_theta=1e4, factor=2.0, partial_rotary_factor=0.5)
    cfg = hf_config("llama2_mha").to_dict() | {"rope_parameters": rope}
    with pytest.raises(UnsupportedConfigError, match="partial_rotary_factor=0.5"):
        LlamaConfig.from_hf(cfg)
