"""A tiny Hugging Face tokenizer built offline, for data-pipeline tests.

A byte-level BPE (every string encodes, no unknown tokens) trained on a few sentences,
wrapped in ``transformers.PreTrainedTokenizerFast`` with ``<s>`` (added in front, like
Llama's), ``</s>``, ``<pad>`` and a small jinja chat template whose assistant turns end in
``</s>``.
"""

from __future__ import annotations

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
    "### Instruction:\nName a colour.\n\n### Input:\nsky\n\n### Response:\nThe sky is blue.",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "user assistant system: What is two plus three? It is five. Count: 1 2 3 4 5 6 7 8 9 10.",
]


# The pre-tokenizer regexes of Llama 3's and Qwen2's tokenizer.json (Qwen3 has Qwen2's).
PRE_TOKENIZER_REGEX = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}

# Falcon's tokenizer.json pre-tokenizer
_FALCON_PRE = [
    pre_tokenizers.Punctuation(behavior="contiguous"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    pre_tokenizers.Digits(individual_digits=False),
    pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), behavior="isolated"),
]


def make_tokenizer(
    chat_template: bool = True, vocab_size: int = 300, pre: str = "gpt2"
) -> PreTrainedTokenizerFast:
    """A fast byte-level BPE tokenizer; BOS ``<s>`` is prepended by ``add_special_tokens``.
    ``pre``: GPT-2's pre-tokenizer (``ByteLevel``'s own regex), or Llama 3's / Qwen2's (a
    ``Split`` on their regex before a ``ByteLevel`` without one), or Falcon's sequence of
    steps, as their tokenizer.json has."""
    tok = Tokenizer(models.BPE())
    if pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre == "falcon":
        tok.pre_tokenizer = pre_tokenizers.Sequence(_FALCON_PRE)
    else:
        split = pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX[pre]), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )


def make_spm_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE as Llama 2 / Mistral ship it in tokenizer.json: spaces as ``▁``
    with one prepended, byte fallback to ``<0x00>``..``<0xFF>``, ``<unk>``/``<s>``/``</s>``, BOS
    prepended."""
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# microsoft/Phi-3-mini-4k-instruct's and Phi-3.5-mini-instruct's chat template (tokenizer_config
# .json): turns end in <|end|>, and a conversation not left open for generation ends in EOS.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def make_phi3_tokenizer() -> PreTrainedTokenizerFast:
    """:func:`make_tokenizer` with Phi-3's ``<|end|>`` token and chat template."""
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = PHI3_CHAT_TEMPLATE
    return tok


# Gemma's own chat templates (tokenizer_config.json of google/gemma-2-2b-it and, text turns
# only, google/gemma-3-1b-it): turns "<start_of_turn>user|model\n...<end_of_turn>\n". Gemma 2
# has no system role and raises; Gemma 3 puts a system message in front of the first user turn.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
