"""Gemma 2 and Gemma 3 (text) against transformers (torch, CPU, float32, eager attention).

Two tiny random families (tests/hf_models.py ``GEMMA_FAMILIES``): Gemma 2 with GQA, attention
and final logit soft-capping that bite (dropping either moves the logits by > 1e-2),
``query_pre_attn_scalar`` != head_dim and a window of 4 on alternating layers; Gemma 3 with
multi-query attention, q/k norms, an untied head, a RoPE base of its own on the sliding layers
and linear scaling on the global one, layers slide / slide / global with a window of 3. All
sequences are longer than the windows. Tolerances are fixed: 1e-5 a layer, 1e-4 a model.
"""

from __future__ import annotations

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import unflatten_dict

import jaxlora
from jaxlora.models import stacking
from jaxlora.models.config import LlamaConfig, UnsupportedConfigError
from jaxlora.models.llama import DecoderLayer, attention_mask, rope_tables
from tests.hf_models import (
    GEMMA_FAMILIES,
    assert_greedy_equals_transformers,
    hf_config,
    make_hf_model,
    random_ids,
)

LAYER_TOL = 1e-5
MODEL_TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(GEMMA_FAMILIES))
def gemma(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_model(request.param, directory, seed=5)
    return request.param, directory, hf_model, jaxlora.load_model(directory)


def _torch(hf_model, ids, mask=None, positions=None) -> np.ndarray:
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.as_tensor(mask)
    if positions is not None:
        kw["position_ids"] = torch.as_tensor(positions, dtype=torch.long)
    with torch.no_grad():
        return hf_model(torch.as_tensor(ids), **kw).logits.numpy()


def _close(ours, theirs, tol=MODEL_TOL):
    chex.assert_trees_all_close(np.asarray(ours), np.asarray(theirs), atol=tol, rtol=0)


def test_logits_plain_padded_and_packed_match_transformers(gemma):
    """One [3, 12] shape (one compile): plain rows; left- and right-padded rows; a packed row
    of two documents, each equal to the document run alone in transformers."""
    _, _, hf_model, model = gemma
    ids = random_ids(3, 12, seed=1)
    _close(model(ids), _torch(hf_model, ids))

    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    positions = np.asarray(jaxlora.model.default_positions(jnp.asarray(mask)))
    real = mask.astype(bool)
    ours = np.asarray(model(ids, attention_mask=mask))
    _close(ours[real], _torch(hf_model, ids, mask, positions)[real])

    segments = np.array([[1] * 5 + [2] * 7] * 3)
    packed_positions = np.array([[*range(5), *range(7)]] * 3)
    ours = np.asarray(model(ids, attention_mask=segments, position_ids=packed_positions))
    for doc in (slice(0, 5), slice(5, 12)):
        _close(ours[:, doc], _torch(hf_model, ids[:, doc]))


@pytest.mark.parametrize("gemma", ["gemma2_softcap"], indirect=True)
def test_soft_caps_change_the_logits(gemma):
    """The caps bite on these weights: transformers without either moves the logits far beyond
    1e-4, so the parity above holds only with both implemented (torch only: no compile)."""
    _, _, hf_model, _ = gemma
    ids = random_ids(3, 12, seed=1)
    capped = _torch(hf_model, ids)
    attn = [layer.self_attn for layer in hf_model.model.layers]
    for a in attn:
        a.attn_logit_softcapping = None
    uncapped_scores = _torch(hf_model, ids)
    for a in attn:
        a.attn_logit_softcapping = hf_model.config.attn_logit_softcapping
    cap, hf_model.config.final_logit_softcapping = hf_model.config.final_logit_softcapping, None
    uncapped_logits = _torch(hf_model, ids)
    hf_model.config.final_logit_softcapping = cap
    assert np.abs(uncapped_scores - capped).max() > 1e-2
    assert np.abs(uncapped_logits - capped).max() > 1e-2
    np.testing.assert_array_equal(_torch(hf_model, ids), capped)  # restored


def _state(module: torch.nn.Module) -> dict:
    state = module.state_dict()
    return unflatten_dict({k: jnp.asarray(v.detach().numpy()) for k, v in state.items()}, sep=".")


def test_sliding_decoder_layer_matches(gemma):
    """Layer 0 (sliding, window < length): norms, attention, GeGLU and the residual sandwich."""
    _, _, hf_model, model = gemma
    config = model.config
    window = config.sliding_windows[0]
    layer = hf_model.model.layers[0]
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 9, config.hidden_size)).astype(np.float32)
    pos = np.broadcast_to(np.arange(9), (2, 9))
    rope = hf_model.model.rotary_emb
    with torch.no_grad():
        args = (torch.as_tensor(x), torch.as_tensor(pos))
        cs = rope(*args, "sliding_attention") if config.qk_norm else rope(*args)
        additive = torch.full((9, 9), float("-inf")).triu(1)
        additive = additive + torch.full((9, 9), float("-inf")).tril(-window)
        theirs = layer(
            torch.as_tensor(x),
            position_embeddings=cs,
            attention_mask=additive[None, None].expand(2, 1, 9, 9),
        )
    cs = rope_tables(jnp.asarray(pos), jnp.asarray(config.layer_inv_freq(window)), jnp.float32)
    slots, segments = jnp.arange(9), jnp.ones((2, 9), jnp.int32)
    mask = attention_mask(slots, slots, segments, segments, window)
    ours, _ = DecoderLayer(config, sliding_window=window).apply(
        {"params": _state(layer)}, jnp.asarray(x), cs, mask
    )
    _close(ours, theirs.numpy(), LAYER_TOL)


def test_greedy_generation_equals_transformers_generate(gemma):
    """KV-cache decoding with left padding, past the window: the same tokens as ``generate``."""
    _, _, hf_model, model = gemma
    ids = random_ids(3, 7, seed=4)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    eos = 60
    assert_greedy_equals_transformers(hf_model, model, ids, mask, 8, eos=eos)


@pytest.mark.parametrize("gemma", ["gemma3_text_untied"], indirect=True)
def test_scanned_layers_equal_unrolled(gemma):
    """Gemma 3's slide / slide / global layers (each kind with its own RoPE base) stack into
    the runs 0-1 | 2; scanning them computes the unrolled logits, on the packed batch of the
    logits test (whose unrolled program is already compiled). Gradients through scanned runs:
    tests/models/test_scan.py.

    Tolerance: both programs run the same ops in the same order, fused differently by XLA, so
    they differ by float32 reordering only. The worst case for a reduction of n terms is n·u
    of the sum of |terms| (u = 2⁻²⁴); a logit passes through, per layer, the hidden (40), MLP
    (37) and key (≤ 11) reductions, then the head's (40): ≈ 300·u = 1.8e-5 of the logits'
    scale. Measured: 1e-7; a wrong window, RoPE base or mask moves them by > 1e-2."""
    _, _, _, model = gemma
    runs = stacking.layer_runs(model.params, model.config.sliding_windows)
    assert runs == ((0, 2), (2, 3))
    scanned = model.replace(params=stacking.stack_layers(model.params, runs))
    assert scanned.module().runs == runs
    ids = random_ids(3, 12, seed=1)
    segments = np.array([[1] * 5 + [2] * 7] * 3)
    positions = np.array([[*range(5), *range(7)]] * 3)
    unrolled = np.asarray(model(ids, attention_mask=segments, position_ids=positions))
    ours = np.asarray(scanned(ids, attention_mask=segments, position_ids=positions))
    scale = max(1.0, float(np.abs(unrolled).max()))
    np.testing.assert_allclose(ours, unrolled, rtol=0, atol=2e-5 * scale)


# ---- config.json: Gemma's fields, and what is refused ------------------------------------


def _config_dict(family="gemma2_softcap", **overrides) -> dict:
    return json.loads(hf_config(family).to_json_string()) | overrides


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(hidden_activation="gelu"), "hidden_activation"),
        (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(some_new_field=1), "some_new_field"),
        (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]), "chunked"),
        (dict(architectures=["Gemma2ForSequenceClassification"]), "architectures"),
    ],
)
def test_unsupported_gemma_fields_are_refused_by_name(overrides, needle):
    with pytest.raises(UnsupportedConfigError, match=needle):
        LlamaConfig.from_hf(_config_dict(**overrides))


def test_gemma3_local_rope_other_than_default_is_refused():
    d = _config_dict("gemma3_text_untied")
    d["rope_parameters"]["sliding_attention"] = {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(UnsupportedConfigError, match="sliding_attention"):
        LlamaConfig.from_hf(d)


def test_hub_style_configs_take_transformers_defaults():
    """Files as the hub has them (transformers 4.4x/4.5x fields, omitted defaults) parse as
    transformers reads them: Gemma 2's caps default on, every second layer global; Gemma 3's
    ``rope_local_base_freq`` and ``rope_scaling`` (global layers only), pattern 6."""
    g2 = LlamaConfig.from_hf(
        {"model_type": "gemma2", "hidden_act": "gelu_pytorch_tanh", "num_hidden_layers": 4}
    )
    assert g2.sliding_windows == (4096, None, 4096, None)
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (50.0, 30.0)
    assert g2.query_pre_attn_scalar == 256 and g2.tie_word_embeddings
    g3 = LlamaConfig.from_hf(
        {
            "model_type": "gemma3_text",
            "num_hidden_layers": 7,
            "rope_theta": 1_000_000,
            "rope_local_base_freq": 10_000,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window": 512,
            "sliding_window_pattern": 6,
            "cache_implementation": "hybrid",
        }
    )
    assert g3.sliding_windows == (512,) * 5 + (None, 512)
    assert (g3.rope_type, g3.rope_factor, g3.rope_theta) == ("linear", 8.0, 1e6)
    assert g3.rope_local_theta == 1e4 and g3.attn_logit_softcapping is None
    # and it writes back what transformers reads as the same model
    import transformers

    back = transformers.Gemma3TextConfig(**g3.to_hf())
    assert back.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert back.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert back.rope_parameters["full_attention"]["factor"] == 8.0


@pytest.mark.parametrize("gemma", ["gemma3_text_untied"], indirect=True)
def test_gemma3_image_text_checkpoint_loads_its_language_model(gemma, tmp_path):
    """A ``gemma3`` (Gemma3ForConditionalGeneration) directory: the text_config and the
    ``language_model`` weights load as the text model; the vision tower is skipped."""
    _, directory, _, model = gemma
    from safetensors.numpy import load_file, save_file

    text = json.loads((directory / "config.json").read_text())
    top = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
        "mm_tokens_per_image": 4,
        "image_token_index": 59,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(top))
    tensors = load_file(directory / "model.safetensors")
    layouts = {  # transformers 4.5x (the hub's Gemma 3 checkpoints), transformers 5
        "language_model.": lambda k: "language_model." + k,
        "model.language_model.": lambda k: k.replace("model.", "model.language_model.", 1),
    }
    for vision, rename in zip(("", "model."), layouts.values(), strict=True):
        renamed = {rename(k): v for k, v in tensors.items()}
        renamed[vision + "vision_tower.vision_model.post_layernorm.weight"] = np.ones(8)
        renamed[vision + "multi_modal_projector.mm_soft_emb_norm.weight"] = np.ones(8)
        save_file(renamed, tmp_path / "model.safetensors")
        again = jaxlora.load_model(tmp_path)
        assert again.config == model.config
        chex.assert_trees_all_equal(again.params, model.params)
