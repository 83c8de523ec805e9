"""A tiny Hugging Face tokenizer built offline, for data-pipeline tests.

A byte-level BPE (every string encodes, no unknown tokens) trained on a few sentences,
wrapped in ``transformers.PreTrainedTokenizerFast`` with ``<s>`` (added in front, like
Llama's), ``</s>``, ``<pad>`` and a small jinja chat template whose assistant turns end in
``</s>``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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


def make_tokenizer(chat_template: bool = True, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A fast byte-level BPE tokenizer; BOS ``<s>`` is prepended by ``add_special_tokens``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
