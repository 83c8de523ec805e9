"""GGUF files for llama.cpp and Ollama: the merged model, and the adapter as a GGUF LoRA.

Written with the ``gguf`` package (llama.cpp's own writer, tensor-name tables, quantizers and
tokenizer readers); what is ours is the mapping from a jaxlora model to what llama.cpp's
``convert_hf_to_gguf.py`` / ``convert_lora_to_gguf.py`` would have written from the same
Hugging Face checkpoint:

- tensors: ``gguf.get_tensor_name_map`` turns Hugging Face names into GGUF names
  (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``); a tensor the
  architecture does not have in llama.cpp is refused. Same ``[out, in]`` orientation.
- llama.cpp's ``llama`` architecture rotates adjacent pairs (GPT-J style) where Hugging Face
  rotates halves (``rotate_half``), so q/k rows (and biases, and a LoRA's B) are permuted per
  head: :func:`permute_qk`. Qwen2/3 use the half rotation in llama.cpp too (no permutation).
- Falcon (llama.cpp's ``falcon``): the fused ``query_key_value`` rows regrouped from
  transformers' per-KV-group ``[q.., k, v]`` to all q, all k, all v (:func:`regroup_falcon_qkv`,
  convert_hf_to_gguf's FalconModel); Falcon-7B's one LayerNorm, Falcon-40B's ``ln_mlp`` as
  ``attn_norm`` and ``ln_attn`` as ``attn_norm_2``.
- Gemma 2 / 3 (llama.cpp's ``gemma2`` / ``gemma3``): RMSNorm weights plus 1 (llama.cpp
  computes ``x·w`` for transformers' ``x·(1 + w)``), soft-caps and the window as keys; what
  llama.cpp fixes by architecture (window pattern, Gemma 3's local RoPE base, the attention
  scale) is checked, not written (:func:`_check_gemma`). Phi-3 (``phi3``): fused qkv and
  gate|up as they are, partial rotary, LongRoPE's factors as ``rope_factors_long/short``.
- hyper-parameters as ``<arch>.*`` keys (``llama.*``, ``qwen2.*``, ...); Llama 3.1's RoPE
  scaling as the ``rope_freqs.weight`` tensor of per-frequency divisors, linear scaling as a key.
- the tokenizer: byte-level BPE (Llama 3, Qwen) as ``gpt2`` with the pre-tokenizer named by its
  regex; merges, special tokens, ``add_bos`` and the chat template via ``gguf.SpecialVocab``.
  SentencePiece-style tokenizers (Llama 2, Mistral: BPE with byte fallback) as ``llama``, whose
  tokenizer merges adjacent pieces by piece score: the scores and piece types of
  ``tokenizer.model`` when it is beside the tokenizer (read with transformers' protobuf schema,
  no ``sentencepiece`` needed), else scores ranked as tokenizer.json's merges are
  (:func:`merge_scores`), so llama.cpp merges in the order Hugging Face's BPE does.

Everything is converted and checked before a file is opened (:class:`GGUFFile`), and files are
written to a temporary name and renamed, so a refusal or a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np
from flax.traverse_util import flatten_dict

from jaxlora.config.lora import LoraConfig
from jaxlora.interop.merged import merged_params
from jaxlora.models.config import LlamaConfig
from jaxlora.weights import LoRAWeight

log = logging.getLogger(__name__)

# gguf.type -> (tensor type of 2-D weights, general.file_type)
TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


class GGUFError(ValueError):
    """What jaxlora cannot write as GGUF (an architecture, a tokenizer, an adapter)."""


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face ``model_type`` becomes a llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp rotates adjacent pairs: q/k rows reordered (see permute_qk)
    rope_freqs: bool  # llama.cpp reads Llama 3.1 RoPE scaling as a rope_freqs tensor
    norm_shift: float = 0.0  # added to RMSNorm weights: llama.cpp computes x·w for HF's x·(1+w)
    swa_period: int | None = None  # llama.cpp's sliding-window layers: il % period < period - 1


# One entry per supported family (what convert_hf_to_gguf.py registers for its architecture).
ARCHS = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True, rope_freqs=True),
    "mistral": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True, rope_freqs=True),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2, permute_qk=False, rope_freqs=False),
    "qwen3": ArchSpec(gguf.MODEL_ARCH.QWEN3, permute_qk=False, rope_freqs=False),
    "falcon": ArchSpec(gguf.MODEL_ARCH.FALCON, permute_qk=False, rope_freqs=False),
    "gemma2": ArchSpec(
        gguf.MODEL_ARCH.GEMMA2, permute_qk=False, rope_freqs=False, norm_shift=1.0, swa_period=2
    ),
    "gemma3_text": ArchSpec(
        gguf.MODEL_ARCH.GEMMA3, permute_qk=False, rope_freqs=False, norm_shift=1.0, swa_period=6
    ),
    "phi3": ArchSpec(gguf.MODEL_ARCH.PHI3, permute_qk=False, rope_freqs=False),
}
# llama.cpp's fixed choices for Gemma (llama-model.cpp, load_hparams): Gemma 3's sliding layers
# rotate with base 10000 unscaled; the attention scale is head_dim^-1/2, or (hidden/heads)^-1/2
# for the 27B models, recognised by their layer count (46: Gemma 2, 62: Gemma 3).
GEMMA_LOCAL_ROPE_BASE = 10000.0
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}

# tokenizer.json's pre-tokenizer regex -> llama.cpp's name for it (tokenizer.ggml.pre), read from
# llama.cpp's llama-vocab.cpp. A ByteLevel pre-tokenizer with use_regex=true is GPT-2's.
_GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
PRE_TOKENIZERS = {
    _GPT2_REGEX: "gpt-2",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}


def arch_spec(config: LlamaConfig) -> ArchSpec:
    """The llama.cpp architecture for ``config``, or an error naming the supported ones."""
    spec = ARCHS.get(config.model_type)
    if spec is None:
        raise GGUFError(
            f"GGUF export: no llama.cpp mapping for model_type={config.model_type!r} "
            f"(supported: {', '.join(sorted(ARCHS))})"
        )
    return spec


def check_type(gguf_type: str) -> None:
    if gguf_type not in TYPES:
        raise GGUFError(f"gguf.type={gguf_type!r}: expected one of {', '.join(TYPES)}")


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection (``[heads·head_dim, ...]``) from Hugging Face's half rotation to
    llama.cpp's pair rotation: within each head, row ``j`` of the first half and row ``j`` of
    the second become rows ``2j`` and ``2j+1`` (``LlamaModel.permute`` in convert_hf_to_gguf)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`."""
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def regroup_falcon_qkv(w: np.ndarray, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """Rows of Falcon's fused ``query_key_value`` (``[qkv, ...]``) from transformers' layout,
    ``n_kv_heads`` groups of ``[q_0 .. q_{G-1}, k, v]``, to llama.cpp's: every q head, then every
    k, then every v (FalconModel.modify_tensors in convert_hf_to_gguf; one group for 7B)."""
    groups = w.reshape(n_kv_heads, n_heads // n_kv_heads + 2, -1, *w.shape[1:])
    q, k, v = groups[:, :-2], groups[:, -2], groups[:, -1]
    return np.concatenate([x.reshape(-1, *w.shape[1:]) for x in (q, k, v)])


def _rows_to_gguf(hf_name: str, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """``w`` (a weight, bias or LoRA B of ``hf_name``) with its rows in llama.cpp's order, and
    Gemma's RMSNorm weights shifted by 1 (convert_hf_to_gguf's ``norm_shift``)."""
    if (shift := arch_spec(config).norm_shift) and hf_name.endswith("norm.weight"):
        return (w + np.float32(shift)).astype(np.float32)
    if config.model_type == "falcon" and ".query_key_value." in hf_name:
        return regroup_falcon_qkv(w, config.num_attention_heads, config.num_key_value_heads)
    if (heads := _qk_heads(hf_name, config)) is not None:
        return permute_qk(w, heads)
    return w


def _qk_heads(hf_name: str, config: LlamaConfig) -> int | None:
    """Heads to permute ``hf_name`` over (llama.cpp's llama arch), ``None`` if not q/k."""
    if not arch_spec(config).permute_qk:
        return None
    if ".self_attn.q_proj." in hf_name:
        return config.num_attention_heads
    if ".self_attn.k_proj." in hf_name:
        return config.num_key_value_heads
    return None


def _name_map(config: LlamaConfig) -> Callable[[str], str]:
    """Hugging Face tensor name -> GGUF name, refusing a tensor llama.cpp's arch does not have."""
    spec = arch_spec(config)
    names = gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)
    allowed = set(gguf.MODEL_TENSORS[spec.arch])

    def name(hf_name: str) -> str:
        kind = names.get_type(hf_name, try_suffixes=(".weight", ".bias"))
        if kind is None or kind not in allowed:
            raise GGUFError(
                f"GGUF export: {hf_name} has no tensor in llama.cpp's "
                f"{gguf.MODEL_ARCH_NAMES[spec.arch]} architecture"
            )
        return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    return name


def _encode(name: str, w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) for ``GGUFWriter.add_tensor``. As convert_hf_to_gguf does: 1-D tensors
    stay float32; a row length Q8_0's blocks of 32 do not divide is written as F16 (logged)."""
    w = np.asarray(w, np.float32)
    if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return w, None
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        if w.shape[-1] % block:
            log.info(
                "%s: rows of %d are not a multiple of %d, written as F16", name, w.shape[-1], block
            )
            qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, qtype), qtype


def _falcon_hyperparameters(w: gguf.GGUFWriter, config: Any, context_length: int) -> None:
    """FalconModel.set_gguf_parameters' keys, with the checkpoint's own context length, MLP
    width (convert writes 4·hidden, which every released Falcon has) and RoPE base."""
    w.add_context_length(context_length)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.ffn_hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_eps(config.layer_norm_epsilon)
    w.add_rope_freq_base(config.rope_theta)
    w.add_vocab_size(config.vocab_size)


def _hyperparameters(w: gguf.GGUFWriter, config: LlamaConfig, context_length: int) -> None:
    """The ``<arch>.*`` keys llama.cpp reads (TextModel.set_gguf_parameters' subset for us)."""
    if config.model_type == "falcon":
        _falcon_hyperparameters(w, config, context_length)
        return
    w.add_context_length(context_length)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.rotary_dim)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_vocab_size(config.vocab_size)
    if config.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_factor)
    if config.gemma:
        _gemma_hyperparameters(w, config)
    if config.model_type == "phi3":
        _phi3_hyperparameters(w, config)


def _gemma_hyperparameters(w: gguf.GGUFWriter, config: LlamaConfig) -> None:
    """Gemma2Model / Gemma3Model's keys besides the common ones: soft-caps and the window (the
    window pattern, local RoPE base and attention scale are llama.cpp's own, checked by
    :func:`_check_gemma`)."""
    if config.attn_logit_softcapping is not None:
        w.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    w.add_sliding_window(max(s for s in config.sliding_windows if s is not None))


def _phi3_hyperparameters(w: gguf.GGUFWriter, config: LlamaConfig) -> None:
    """Phi3MiniModel's keys: the window (0 for none; llama.cpp does not use it for Phi-3) and
    LongRoPE's original length and cos/sin factor (its per-frequency factors are tensors,
    :func:`_longrope_factors`)."""
    w.add_sliding_window(max((s for s in config.sliding_windows if s is not None), default=0))
    if (s := config.rope_scaling) is not None:
        w.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings)
        w.add_rope_scaling_attn_factors(s.attention_factor)


def _check_architecture(config: LlamaConfig, context_length: int) -> None:
    """Refuse what llama.cpp cannot compute for ``config``; warn where it computes otherwise."""
    if config.model_type == "falcon" and not config.parallel_attn:
        raise GGUFError(
            "GGUF export: llama.cpp's falcon runs attention and MLP in parallel; this Falcon "
            "has parallel_attn=false (supported: Falcon-7B/40B/180B layouts)"
        )
    if config.model_type == "falcon" and config.bias:
        raise GGUFError(
            "GGUF export: llama.cpp's falcon has no biases on its linear layers; this Falcon "
            "has bias=true (supported: bias=false, as every released Falcon has)"
        )
    if config.model_type == "falcon":
        log.warning(
            "GGUF export: llama.cpp's falcon computes GELU as a float16 table of the tanh "
            "approximation, not the exact GELU the model was trained with: logits differ by "
            "about 1e-3 (docs/interop.md)"
        )
    if config.model_type in ("gemma2", "gemma3_text"):
        _check_gemma(config)
    if config.model_type == "phi3" and config.rope_scaling is not None:
        log.warning(
            "GGUF export: llama.cpp picks Phi-3's long RoPE factors by the context size "
            "(n_ctx > %d), transformers by the sequence length: a shorter sequence in a longer "
            "context is computed with the long factors (docs/interop.md)",
            config.rope_scaling.original_max_position_embeddings,
        )
    _check_rope(config)
    windows = sorted({s for s in config.sliding_windows if s is not None})
    if windows and windows[0] < context_length and arch_spec(config).swa_period is None:
        log.warning(
            "GGUF export: llama.cpp's %s attends to the whole context, not the sliding window "
            "of %s tokens this model has: outputs differ beyond the window",
            config.model_type,
            windows,
        )


def _check_rope(config: LlamaConfig) -> None:
    """Refuse a RoPE scaling the file would not carry: llama.cpp reads an unwritten one as
    plain RoPE and computes other logits. Written: linear (a key), Llama 3.1's (the
    ``rope_freqs`` tensor, on the architectures that read it) and Phi-3's LongRoPE (factor
    tensors). YaRN, dynamic NTK and LongRoPE outside Phi-3 are refused: not yet checked
    against llama.cpp."""
    kind, rope = config.model_type, getattr(config, "rope_type", "default")
    written = ["default", "linear"]
    written += ["llama3"] if arch_spec(config).rope_freqs else []
    written += ["longrope"] if kind == "phi3" else []
    if rope not in written:
        raise GGUFError(
            f"GGUF export: rope_type={rope!r} on model_type={kind!r} is not written to GGUF "
            f"(llama.cpp would read the file as plain RoPE; written: {', '.join(written)}); "
            "export format=merged or format=peft for this model"
        )


def _check_gemma(config: LlamaConfig) -> None:
    """Refuse a Gemma that llama.cpp's gemma2 / gemma3 would compute otherwise: those take the
    layer pattern, Gemma 3's local RoPE base and the attention scale from the architecture
    (and the layer count), not from the file, and Gemma 2 always soft-caps."""
    spec, kind = arch_spec(config), config.model_type
    period = spec.swa_period
    window = max((s for s in config.sliding_windows if s is not None), default=None)
    expected = tuple(
        window if i % period < period - 1 else None for i in range(config.num_hidden_layers)
    )
    if window is None or config.sliding_windows != expected:
        raise GGUFError(
            f"GGUF export: llama.cpp's {kind} attends globally on layers i with "
            f"(i + 1) % {period} == 0 and slides one window on the others; this model's "
            f"layers have windows {list(config.sliding_windows)}"
        )
    n_layers = config.num_hidden_layers
    scalar = (
        config.hidden_size // config.num_attention_heads
        if n_layers == GEMMA_27B_LAYERS[kind]
        else config.head_dim
    )
    if config.query_pre_attn_scalar != scalar:
        raise GGUFError(
            f"GGUF export: llama.cpp's {kind} scales attention by {scalar}^-1/2 for "
            f"{n_layers} layers; this model has query_pre_attn_scalar="
            f"{config.query_pre_attn_scalar:g} (supported: {scalar})"
        )
    if kind == "gemma2" and None in (config.attn_logit_softcapping, config.final_logit_softcapping):
        raise GGUFError(
            "GGUF export: llama.cpp's gemma2 always soft-caps attention and output logits; this "
            "model leaves one uncapped (supported: both attn_logit_softcapping and "
            "final_logit_softcapping set, as every released Gemma 2 has)"
        )
    if kind == "gemma2" and config.rope_type != "default":
        raise GGUFError(
            f"GGUF export: rope_type={config.rope_type!r} on gemma2 has no llama.cpp "
            "equivalent (supported: default)"
        )
    if kind == "gemma3_text" and config.attn_logit_softcapping is not None:
        raise GGUFError(
            "GGUF export: llama.cpp's gemma3 has no attention soft-cap; this model has "
            f"attn_logit_softcapping={config.attn_logit_softcapping:g} (supported: none)"
        )
    if kind == "gemma3_text" and config.rope_local_theta != GEMMA_LOCAL_ROPE_BASE:
        raise GGUFError(
            "GGUF export: llama.cpp's gemma3 rotates sliding layers with base "
            f"{GEMMA_LOCAL_ROPE_BASE:g}; this model's is {config.rope_local_theta:g}"
        )
    if kind == "gemma3_text" and config.rope_type not in ("default", "linear"):
        raise GGUFError(
            f"GGUF export: rope_type={config.rope_type!r} on gemma3_text has no llama.cpp "
            "equivalent (supported: default, linear)"
        )


def _rope_freqs(config: LlamaConfig) -> np.ndarray | None:
    """Llama 3.1 RoPE scaling as llama.cpp takes it: the divisor of each inverse frequency."""
    if config.rope_type != "llama3":
        return None
    plain = dataclasses.replace(config, rope_type="default").inv_freq()
    return (plain / config.inv_freq()).astype(np.float32)


def _longrope_factors(config: LlamaConfig) -> dict[str, tuple[np.ndarray, None]]:
    """Phi-3's LongRoPE as llama.cpp takes it: ``rope_factors_long`` / ``rope_factors_short``,
    the divisor of each inverse frequency (Phi3MiniModel.generate_extra_tensors)."""
    s = config.rope_scaling
    if config.model_type != "phi3" or s is None:
        return {}
    names = {
        gguf.MODEL_TENSOR.ROPE_FACTORS_LONG: s.long_factor,
        gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT: s.short_factor,
    }
    return {
        gguf.TENSOR_NAMES[t] + ".weight": (np.asarray(f, np.float32), None)
        for t, f in names.items()
    }


def _tokenizer_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFError(
            f"GGUF export needs a fast (tokenizer.json) tokenizer; got {type(tokenizer).__name__}"
        )
    return json.loads(backend.to_str())


# Falcon's tokenizer.json pre-tokenizes in steps, not one regex: punctuation runs, GPT-2's
# regex, digit runs, then runs of three digits: llama.cpp's "falcon" (its three regexes).
_FALCON_STEPS = ["Punctuation", "ByteLevel", "Digits", "Split"]
_FALCON_DIGITS = "[0-9][0-9][0-9]"


def _is_falcon(steps: list[dict]) -> bool:
    return (
        [s.get("type") for s in steps] == _FALCON_STEPS
        and steps[1].get("use_regex", True)
        and not steps[2].get("individual_digits")
        and steps[3]["pattern"].get("Regex") == _FALCON_DIGITS
    )


def pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level BPE's pre-tokenizer."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if _is_falcon(steps):
        return "falcon"
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    regex_in_bytelevel = any(s.get("type") == "ByteLevel" and s.get("use_regex") for s in steps)
    patterns = splits + ([_GPT2_REGEX] if regex_in_bytelevel else [])
    if len(patterns) == 1 and patterns[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[patterns[0]]
    raise GGUFError(
        f"GGUF export: the tokenizer's pre-tokenizer {pre} has no llama.cpp equivalent we know "
        f"(known: {', '.join(PRE_TOKENIZERS.values())}, falcon)"
    )


def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf's rule for added tokens that should be control tokens."""
    return text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))


def _bpe_vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types in id order, ``vocab_size`` long (convert's get_vocab_base)."""
    T = gguf.TokenType
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            text = added[i].content
            if not added[i].normalized:  # llama.cpp matches added tokens as normalized text
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            tokens.append(text)
            types.append(T.CONTROL if added[i].special or _looks_special(text) else T.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
    return tokens, types


def _tokenizer(tokenizer: Any, vocab_size: int) -> Callable[[gguf.GGUFWriter], None]:
    """What adds the vocabulary, merges, special tokens, add_bos/add_eos and the chat template
    to a writer; everything is read and checked here, before any file is opened."""
    tok_json = _tokenizer_json(tokenizer)
    model = tok_json.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFError(
            f"GGUF export: tokenizer model {model.get('type')!r} is not supported "
            "(supported: BPE, byte-level as Llama 3 and Qwen have or SentencePiece-style with "
            "byte fallback as Llama 2 and Mistral have)"
        )
    largest = max(tokenizer.get_vocab().values())
    if largest >= vocab_size:
        raise GGUFError(f"GGUF export: token id {largest} >= the model's vocab_size {vocab_size}")
    if model.get("byte_fallback"):
        return _spm_tokenizer(tokenizer, tok_json, vocab_size)
    pre = pre_tokenizer(tok_json)
    tokens, types = _bpe_vocab(tokenizer, vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)

    def add(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        special.add_to_gguf(w, quiet=True)

    return add


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_SPACE = "\u2581"  # SentencePiece's visible space


def merge_scores(merges: list, vocab: dict[str, int]) -> dict[int, float]:
    """Piece scores under which llama.cpp's ``llama`` tokenizer merges as a BPE with ``merges``.

    llama.cpp repeatedly merges the adjacent pair whose concatenation is the highest-scoring
    piece; Hugging Face's BPE merges the pair of lowest merge rank. Scoring each piece made by a
    merge ``-rank`` of the first merge that makes it gives the same order (what SentencePiece's
    own BPE scores are: ``-`` the order its merges were learned in, from which transformers'
    converter wrote tokenizer.json's merges). Pieces no merge makes score below every merge."""
    scores: dict[int, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(vocab[left + right], -float(rank))
    return {i: scores.get(i, -float(len(merges))) for i in vocab.values()}


def _sentencepiece_pieces(tokenizer: Any) -> dict[int, tuple[str, float, int]] | None:
    """{id: (piece, score, type)} of the ``tokenizer.model`` beside ``tokenizer``, or
    ``None`` without one. SentencePiece's piece types number as ``gguf.TokenType`` does."""
    path = Path(str(tokenizer.name_or_path)) / "tokenizer.model"
    if not path.is_file():
        return None
    from transformers.utils import sentencepiece_model_pb2_new as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return {i: (p.piece, p.score, p.type) for i, p in enumerate(proto.pieces)}


def _add_space_prefix(tok_json: dict) -> bool:
    """Whether the tokenizer puts ``▁`` before the text (Llama 2's ``Prepend`` normalizer,
    Mistral v0.3's ``Metaspace`` pre-tokenizer): llama.cpp's ``add_space_prefix``."""
    steps = []
    for key, kinds in (("normalizer", "normalizers"), ("pre_tokenizer", "pretokenizers")):
        step = tok_json.get(key) or {}
        steps += step.get(kinds, [step]) if step.get("type") == "Sequence" else [step]
    return any(
        (s.get("type") == "Prepend" and s.get("prepend") == _SPACE)
        or (s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never")
        for s in steps
    )


def _spm_vocab(
    tokenizer: Any, tok_json: dict, vocab_size: int
) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types in id order, ``vocab_size`` long, as convert_hf_to_gguf's
    ``_create_vocab_sentencepiece`` writes them: tokenizer.model's pieces (or tokenizer.json's
    vocabulary scored by :func:`merge_scores`), added tokens as control / user-defined with
    score -1000 (a normal piece that is an added token takes its type), ids past the
    tokenizer as ``[PAD<i>]`` (unused, -10000)."""
    T = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(T.UNUSED)] * vocab_size
    vocab = tok_json["model"]["vocab"]
    pieces = _sentencepiece_pieces(tokenizer)
    if pieces is None:
        merged = merge_scores(tok_json["model"]["merges"], vocab)
        unk = tok_json["model"].get("unk_token")
        pieces = {
            i: (
                text,
                merged[i],
                T.UNKNOWN if text == unk else T.BYTE if _BYTE_PIECE.fullmatch(text) else T.NORMAL,
            )
            for text, i in vocab.items()
        }
    if max(pieces) >= vocab_size:
        raise GGUFError(
            f"GGUF export: the tokenizer has {max(pieces) + 1} pieces, more than the model's "
            f"vocab_size {vocab_size}"
        )
    for i, (text, score, kind) in pieces.items():
        tokens[i], scores[i], types[i] = text, float(score), int(kind)
    for i, added in tokenizer.added_tokens_decoder.items():
        own = i in pieces and tokens[i] == added.content
        if own and types[i] != T.NORMAL:  # unknown, byte and control pieces keep their type
            continue
        if not own:
            tokens[i], scores[i] = added.content, -1000.0
        types[i] = int(T.CONTROL if added.special else T.USER_DEFINED)
    return tokens, scores, types


def _spm_tokenizer(
    tokenizer: Any, tok_json: dict, vocab_size: int
) -> Callable[[gguf.GGUFWriter], None]:
    """The ``llama`` (SentencePiece) tokenizer's keys; see :func:`_spm_vocab`."""
    tokens, scores, types = _spm_vocab(tokenizer, tok_json, vocab_size)
    space_prefix = _add_space_prefix(tok_json)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=False, n_vocab=vocab_size)

    def add(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(space_prefix)
        special.add_to_gguf(w, quiet=True)

    return add


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's content, checked and converted, not yet written: ``fill`` adds its keys
    and tensors to a ``gguf.GGUFWriter`` for ``arch``."""

    arch: str
    fill: Callable[[gguf.GGUFWriter], None]

    def write(self, path: str | Path) -> Path:
        """Write to a temporary file beside ``path``, then rename it (nothing half-written)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        writer = None
        try:
            writer = gguf.GGUFWriter(tmp, self.arch)
            self.fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, path)
        except BaseException:
            if writer is not None:
                writer.close()  # the open handle on the file about to go
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def model_gguf(
    params: dict,
    config: LlamaConfig,
    tokenizer: Any,
    *,
    gguf_type: str = "f16",
    context_length: int,
    name: str | None = None,
) -> GGUFFile:
    """``params`` (LoRA weights merged in float32, NF4 dequantized) as one GGUF file that
    llama.cpp loads: ``gguf_type`` f32 | f16 | bf16 | q8_0 for 2-D weights (norms and biases stay
    float32). ``context_length``: the checkpoint's ``max_position_embeddings``."""
    check_type(gguf_type)
    spec = arch_spec(config)
    if tokenizer is None:
        raise GGUFError(
            "GGUF export needs the model's tokenizer (llama.cpp reads it from the file)"
        )
    _check_architecture(config, context_length)
    qtype, file_type = TYPES[gguf_type]
    to_gguf = _name_map(config)
    add_tokenizer = _tokenizer(tokenizer, config.vocab_size)
    dense = flatten_dict(jax.device_get(merged_params(params)), sep=".")
    tensors = {}
    for hf_name, w in dense.items():
        w = _rows_to_gguf(hf_name, np.asarray(w, np.float32), config)
        tensors[to_gguf(hf_name)] = _encode(hf_name, w, qtype)
    if spec.rope_freqs and (freqs := _rope_freqs(config)) is not None:
        tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = (freqs, None)
    tensors |= _longrope_factors(config)

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or config.model_type)
        _hyperparameters(w, config, context_length)
        w.add_file_type(file_type)
        add_tokenizer(w)
        for tname, (data, raw_dtype) in tensors.items():
            w.add_tensor(tname, data, raw_dtype=raw_dtype)

    arch = gguf.MODEL_ARCH_NAMES[spec.arch]
    log.info("GGUF %s model: %s, %d tensors", arch, gguf_type, len(tensors))
    return GGUFFile(arch, fill)


def _lora_tensors(params: dict, config: LlamaConfig, gguf_type: str) -> tuple[dict, float]:
    """``{gguf name + .lora_a/.lora_b: (data, raw_dtype)}`` and ``adapter.lora.alpha``.

    llama.cpp scales each pair by ``alpha / r`` (r from lora_a's shape), one alpha per file; a
    weight whose scale ``s`` differs (rank/alpha patterns, rsLoRA) has ``s·r/alpha`` folded into
    its B, so every product ``scale·B·A`` is the model's. A q/k B is permuted like the weight.
    """
    to_gguf = _name_map(config)
    flat = flatten_dict(params, sep=".")
    loras = {k: v for k, v in flat.items() if isinstance(v, LoRAWeight)}
    if not loras:
        raise GGUFError("GGUF LoRA export: the model has no LoRA weights")
    dora = [k for k, v in loras.items() if v.use_dora]
    if dora:
        raise GGUFError(
            f"GGUF LoRA export: llama.cpp has no DoRA; {dora[0]} uses it (merge instead)"
        )
    first = next(iter(loras.values()))
    alpha = first.scale * first.a.shape[0]
    qtype, _ = TYPES[gguf_type]
    out = {}
    for path, lw in loras.items():
        a = np.asarray(jax.device_get(lw.a), np.float32)  # [r, in]
        b = np.asarray(jax.device_get(lw.b), np.float32)  # [out, r]
        fold = lw.scale * a.shape[0] / alpha
        if fold != 1.0:
            b = (b * np.float32(fold)).astype(np.float32)
        b = _rows_to_gguf(path, b, config)
        name = to_gguf(path)
        out[name + ".lora_a"] = _encode(name + ".lora_a", a, qtype)
        out[name + ".lora_b"] = _encode(name + ".lora_b", b, qtype)
    return out, alpha


def lora_gguf(
    params: dict, config: LlamaConfig, lora_config: LoraConfig | None, *, gguf_type: str = "f16"
) -> GGUFFile:
    """The LoRA weights of ``params`` as a GGUF adapter (what ``llama-cli --lora`` and
    Ollama's ``ADAPTER`` take), as convert_lora_to_gguf.py lays it out: ``general.type=adapter``,
    ``adapter.type=lora``, ``adapter.lora.alpha``, tensors ``<gguf name>.lora_a [r, in]`` and
    ``.lora_b [out, r]``. Other trained tensors (``modules_to_save``, biases) have no place in a
    GGUF LoRA and are refused."""
    check_type(gguf_type)
    spec = arch_spec(config)
    if lora_config is None:
        raise GGUFError("GGUF LoRA export: the model has no LoRA adapter")
    if lora_config.modules_to_save or lora_config.bias != "none":
        raise GGUFError(
            "GGUF LoRA export: a GGUF LoRA holds only A/B pairs; this adapter also trains "
            f"modules_to_save={list(lora_config.modules_to_save)} / bias={lora_config.bias!r} "
            "(export the merged model instead)"
        )
    tensors, alpha = _lora_tensors(params, config, gguf_type)

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tname, (data, raw_dtype) in tensors.items():
            w.add_tensor(tname, data, raw_dtype=raw_dtype)

    log.info("GGUF LoRA: %d weights, alpha %g", len(tensors) // 2, alpha)
    return GGUFFile(gguf.MODEL_ARCH_NAMES[spec.arch], fill)
