"""Tiny random Hugging Face models of every supported family, built offline with transformers.

Odd sizes (vocab 61, hidden 40, mlp 37) so transposes and reshapes cannot hide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PHI3 = dict(
    num_key_value_heads=2,
    max_position_embeddings=64,
    original_max_position_embeddings=16,
    partial_rotary_factor=0.6,
    rope_scaling=dict(type="longrope", short_factor=[1.0, 1.3, 1.7], long_factor=[2.0, 3.5, 5.0]),
    sliding_window=6,
    pad_token_id=0,
    eos_token_id=2,
)

FAMILIES = {
    # name: (config class, extra config kwargs)
    "llama2_mha": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama3_gqa_tied_rope": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=64,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "llama_bias": ("LlamaConfig", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "mistral_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=5)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen2_window_tied": (
        "Qwen2Config",
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
    ),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=14)),
    # Phi-3.5 shaped: fused qkv/gate_up, GQA, partial rotary (6 of 10 dims), longrope (short
    # factors below 16 positions, long beyond), a sliding window shorter than the tests' rows.
    "phi3": ("Phi3Config", PHI3),
}

# Gemma, tested in tests/models/test_gemma.py (shared fixtures, fewer compiles) rather than by
# every FAMILIES-wide suite. Eager attention in transformers (the reference: sdpa has no
# soft-capping); caps small enough to bite on these tiny random weights; windows shorter than
# the sequences; Gemma 3's layers slide, slide, attend globally (pattern 3).
GEMMA_FAMILIES = {
    "gemma2_softcap": (
        "Gemma2Config",
        dict(
            num_key_value_heads=2,
            head_dim=14,
            num_hidden_layers=3,
            sliding_window=4,
            query_pre_attn_scalar=11,
            attn_logit_softcapping=0.2,
            final_logit_softcapping=0.5,
            attn_implementation="eager",
        ),
    ),
    "gemma3_text_untied": (
        "Gemma3TextConfig",
        dict(
            num_key_value_heads=1,
            head_dim=12,
            num_hidden_layers=3,
            sliding_window=3,
            sliding_window_pattern=3,
            query_pre_attn_scalar=9,
            tie_word_embeddings=False,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 97.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
            },
            attn_implementation="eager",
        ),
    ),
}


def tiny_config():
    """The tiny jaxlora-side Llama config the unit tests build params from (odd sizes, GQA)."""
    from jaxlora.models.config import LlamaConfig

    return LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
    )


def hf_config(family: str, **overrides):
    import transformers

    cls_name, extra = (FAMILIES | GEMMA_FAMILIES)[family]
    kw = dict(
        vocab_size=61,
        hidden_size=40,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
    )
    kw |= extra | overrides
    return getattr(transformers, cls_name)(**kw)


def make_hf_model(family: str, directory: Path | None = None, seed: int = 0, **overrides):
    """A random-init transformers model (float32, eval mode), saved to ``directory`` if given.

    Biases and norm weights are randomised too (transformers initialises them to 0 / 1, which
    would hide a missing bias or a norm applied to the wrong tensor).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.eval()
    if directory is not None:
        model.save_pretrained(directory)
    return model


def save_bnb_nf4(dense: Path, directory: Path, compute_dtype: str = "float32") -> None:
    """``dense`` (a transformers checkpoint) quantized by transformers + bitsandbytes as QLoRA
    defines it (NF4, double quantization, ``bnb_4bit_compute_dtype=compute_dtype``) and saved
    to ``directory``: the bnb-4bit checkpoint jaxlora reads as stored."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = AutoModelForCausalLM.from_pretrained(
        dense,
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        ),
    )
    q.save_pretrained(directory)


def make_deep_model(directory: Path) -> Path:
    """A tiny 5-layer Llama with a tokenizer in ``directory`` (hidden 64, so NF4 keeps its 2-D
    layout and its blocks split over a mesh): enough layers for LoRA on a few to split runs."""
    from tests._tokenizers import make_tokenizer

    tok = make_tokenizer()
    make_hf_model(
        "llama2_mha",
        directory,
        num_hidden_layers=5,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    tok.save_pretrained(directory)
    return directory


def random_ids(batch: int, seq: int, vocab: int = 61, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq)).astype(np.int64)


def make_run_assets(
    directory: Path, n_train: int = 96, n_eval: int = 12, falcon: str | None = None
) -> dict[str, Path]:
    """A tiny Llama (or the ``falcon`` variant of :data:`FALCON_VARIANTS`) with a real
    (offline-built) tokenizer, and alpaca-format JSONL data: everything a
    ``python -m jaxlora.train`` run needs, in ``directory``."""
    import json
    import random

    from tests._tokenizers import make_tokenizer

    tok = make_tokenizer()
    model_dir = directory / "model"
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if falcon is not None:
        make_hf_falcon(
            falcon, model_dir, vocab_size=len(tok), hidden_size=64, ffn_hidden_size=128, **special
        )
    else:
        make_hf_model(
            "llama2_mha",
            model_dir,
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            **special,
        )
    tok.save_pretrained(model_dir)
    rng = random.Random(0)

    def write(path: Path, n: int) -> None:
        with open(path, "w") as f:
            for _ in range(n):
                a, b = rng.randint(1, 9), rng.randint(1, 9)
                rec = {
                    "instruction": f"What is {a} plus {b}?",
                    "input": "",
                    "output": f"It is {a + b}.",
                }
                f.write(json.dumps(rec) + "\n")

    write(directory / "train.jsonl", n_train)
    write(directory / "eval.jsonl", n_eval)
    return {
        "model": model_dir,
        "train": directory / "train.jsonl",
        "eval": directory / "eval.jsonl",
    }


FALCON_VARIANTS = {
    # Falcon-7B: multi-query, attention and MLP in parallel from one LayerNorm, tied head
    "falcon7b_mqa": dict(multi_query=True, parallel_attn=True),
    # Falcon-40B/180B: grouped KV (interleaved fused qkv), ln_attn + ln_mlp, biases, untied
    "falcon40b_gqa": dict(
        new_decoder_architecture=True, num_kv_heads=2, bias=True, tie_word_embeddings=False
    ),
}


def make_hf_falcon(variant: str, directory: Path | None = None, seed: int = 0, **overrides):
    """A random-init ``FalconForCausalLM`` (float32, eval mode; odd vocab 61 and MLP 37,
    head_dim 10), saved to ``directory`` if given. LayerNorm weights and every bias are
    randomised, as in :func:`make_hf_model`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kw = dict(vocab_size=61, hidden_size=40, num_attention_heads=4, num_hidden_layers=2)
    kw |= dict(ffn_hidden_size=37, max_position_embeddings=64)
    kw |= FALCON_VARIANTS.get(variant, {}) | overrides
    config = transformers.FalconConfig(**kw)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = ".ln_" in name or "layernorm" in name
            if name.endswith("bias") or norm:
                p.copy_(
                    torch.randn_like(p) * 0.1 + (1.0 if norm and name.endswith("weight") else 0)
                )
    model.eval()
    if directory is not None:
        model.save_pretrained(directory)
    return model


def assert_greedy_equals_transformers(hf_model, model, ids, mask, max_new_tokens: int, eos=60):
    """Greedy generation with jaxlora's KV cache (``sampling.generate_ids``) gives the tokens
    transformers' ``generate`` gives for the same (left-padded) prompts, stopping at ``eos``."""
    import jax
    import jax.numpy as jnp
    import torch

    from jaxlora.sampling import generate_ids

    with torch.no_grad():
        ref = hf_model.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )[:, ids.shape[1] :].numpy()
    ours = generate_ids(
        model.module(),
        model.params,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        jnp.asarray([eos], jnp.int32),
        jax.random.key(0),
        max_new_tokens=max_new_tokens,
    )
    np.testing.assert_array_equal(np.asarray(ours)[:, : ref.shape[1]], ref)
