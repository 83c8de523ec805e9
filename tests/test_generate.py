"""KV-cache decoding equals the full forward pass and transformers' greedy generate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlora
from jaxlora.config import ConfigError, from_argv
from jaxlora.generate import GenerateArgs
from jaxlora.sampling import _sample, generate_ids, init_caches
from tests.hf_models import make_hf_model, random_ids


@pytest.fixture(scope="module", params=["llama3_gqa_tied_rope", "qwen2_window_tied"])
def ckpt(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return make_hf_model(request.param, directory, seed=5), jaxlora.load_model(directory)


def test_cached_decoding_matches_full_forward(ckpt):
    _, model = ckpt
    module = model.module()
    ids = jnp.asarray(random_ids(2, 10, seed=3), jnp.int32)
    full = model(ids)
    caches = init_caches(model.config, 2, 10, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    seg = jnp.ones((2, 10), jnp.int32)
    first, caches = module.apply(
        {"params": model.params}, ids[:, :6], pos[:, :6], seg[:, :6], caches
    )
    steps = [first]
    for t in range(6, 10):
        out, caches = module.apply(
            {"params": model.params},
            ids[:, t : t + 1],
            pos[:, t : t + 1],
            seg[:, t : t + 1],
            caches,
        )
        steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)


def test_greedy_matches_transformers_generate_with_left_padding(ckpt):
    hf_model, model = ckpt
    ids = random_ids(3, 7, seed=4)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    eos = 60
    with torch.no_grad():
        ref = hf_model.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=9,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )[:, 7:].numpy()
    ours = generate_ids(
        model.module(),
        model.params,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        jnp.asarray([eos], jnp.int32),
        jax.random.key(0),
        max_new_tokens=9,
    )
    ours = np.asarray(ours)[:, : ref.shape[1]]
    np.testing.assert_array_equal(ours, ref)


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 64))
    keys = jax.random.split(jax.random.key(0), 50)
    k_draws = {int(t) for k in keys for t in _sample(logits, k, 1.0, 2, 1.0)}
    p_draws = {int(t) for k in keys for t in _sample(logits, k, 1.0, 0, 0.7)}
    assert k_draws == {0, 1}
    assert p_draws == {0, 1}  # 0.5 < 0.7 <= 0.8: the two best tokens carry the mass


def test_cli_rejects_unknown_key_with_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'max_new_tokens'"):
        from_argv(GenerateArgs, ["model=x", "prompt=hi", "max_new_token=3"], repeatable=("prompt",))


def test_cli_prompts_are_taken_as_written_and_repeat():
    args = from_argv(
        GenerateArgs,
        ["model=x", "prompt=Reverse: a b c", "prompt=42", "top_k=3"],
        repeatable=("prompt",),
    )
    assert args.prompt == ("Reverse: a b c", "42") and args.top_k == 3


def test_generate_buckets_shapes_and_each_row_matches_its_own_run():
    """``generate`` pads batch and prompt width to powers of two: prompts of other lengths and
    counts in the same bucket reuse one compiled loop, and a row's completion does not depend on
    the rows (or padding) beside it."""
    from pathlib import Path

    from jaxlora.sampling import generate

    demo = Path(__file__).resolve().parents[1] / "assets" / "demo" / "base"
    model = jaxlora.load_model(demo)
    prompts = ["In which town does", "What kind of pet does Funbil Tenmi", "Describe"]
    new = 7  # a max_new_tokens no other test uses: the compile counts below are this test's own
    before = generate_ids._cache_size()
    together = generate(model, prompts, max_new_tokens=new)  # 3 rows -> 4, width -> 16
    alone = [generate(model, [p], max_new_tokens=new)[0] for p in prompts]  # 1 row, width 16
    assert together == alone
    assert generate_ids._cache_size() == before + 2
    generate(model, prompts[:2] + ["Where"], max_new_tokens=new)  # the 4-row bucket again
    generate(model, prompts + ["Who", "Why"], max_new_tokens=new)  # 5 rows -> 8: new shape
    assert generate_ids._cache_size() == before + 3
