"""What every family's ``config.json`` reader shares: the error it raises, the bookkeeping fields
it skips, and the two checks it starts with (the architecture class, no unknown field). A
leaf module, so each family's reader (:mod:`~jaxlora.models.config`,
:mod:`~jaxlora.models.gemma_config`, :mod:`~jaxlora.models.falcon_config`) imports it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class UnsupportedConfigError(ValueError):
    """A ``config.json`` asks for something jaxlora does not implement."""


# Fields that do not change what any family's forward pass computes (bookkeeping, generation
# defaults, output switches): every family's reader skips them (Falcon's too).
BOOKKEEPING = {
    "_name_or_path",
    "architectures",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "initializer_range",
    "use_cache",
    "chunk_size_feed_forward",
    "id2label",
    "label2id",
    "is_encoder_decoder",
    "output_attentions",
    "output_hidden_states",
    "problem_type",
    "return_dict",
    "max_position_embeddings",
    "tokenizer_class",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "task_specific_params",
    "finetuning_task",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "is_decoder",
    "tie_encoder_decoder",
    "pruned_heads",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "quantization_config",
    "model_type",
    "bad_words_ids",
    "begin_suppress_tokens",
    "diversity_penalty",
    "do_sample",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "length_penalty",
    "max_length",
    "min_length",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_scores",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict_in_generate",
    "suppress_tokens",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "output_router_logits",
    "_attn_implementation_autoset",
    "_attn_implementation",
}


def check_fields(cfg: dict[str, Any], model_type: str, architecture: str, accepted: Iterable[str]):
    """Refuse a ``config.json`` whose ``architectures`` is not ``[architecture]`` (absent counts
    as it) or that carries a field outside ``accepted`` — a field jaxlora would otherwise
    silently ignore is a wrong model (penzai's importer habit)."""
    archs = cfg.get("architectures") or [architecture]
    if archs != [architecture]:
        raise UnsupportedConfigError(
            f"config.json: architectures={archs} is not supported for model_type="
            f"{model_type!r} (expected [{architecture!r}])"
        )
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        raise UnsupportedConfigError(
            f"config.json: unsupported field(s) {unknown} for model_type={model_type!r}; "
            "jaxlora refuses fields it would otherwise silently ignore"
        )
