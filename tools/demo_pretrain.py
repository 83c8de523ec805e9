"""The demo base model: its tokenizer, its architecture, and a small full-parameter pretraining loop.

Standalone on purpose: it uses only the model (``jaxlora.models.llama``) and optax, not the
LoRA/QLoRA training stack it exists to demonstrate. Documents are packed into rows the way
``jaxlora.data.packing`` lays out fine-tuning batches (one segment per document, positions restarting
at 0, attention kept inside a segment), so the base sees the same layout it is tuned on later.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from transformers import PreTrainedTokenizerFast

from jaxlora.models.config import LlamaConfig
from jaxlora.models.llama import LlamaForCausalLM, init_params

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
MAX_POSITIONS = 256  # config.json max_position_embeddings; demo rows are 128 tokens

# Chat turns reuse the Alpaca section headers, so `chat` and `alpaca` data share their tokens.
# A system message is plain text; each assistant turn ends in EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}{{ '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' }}{{ m['content'] }}{{ '\\n\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Response:\\n' }}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + m['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)


# Pre-tokens: a run of letters, one digit, or a run of anything else (spaces, punctuation,
# newlines). Unlike GPT-2's " word" pieces, a word is then the same token after a space and after
# a newline, so the answer a model writes right after "### Response:\n" is the very token it
# learned in running text. Digits one at a time: sums are written digit by digit.
WORD_PIECES = r"\p{L}+|\p{N}|[^\p{L}\p{N}]+"


def build_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE over :data:`WORD_PIECES` (every string encodes and decodes back exactly).

    Returned as a ``transformers.PreTrainedTokenizerFast``: ``<s>`` is prepended by
    ``add_special_tokens`` (Llama's convention), ``</s>`` ends examples, ``<pad>`` pads.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PIECES), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def model_config(vocab_size: int, hidden: int = 128, layers: int = 4) -> LlamaConfig:
    """Llama with GQA (4 query heads, 2 kv heads) and tied embeddings.

    ``hidden`` and the MLP width (3 x hidden) are multiples of 64, so every decoder linear has an
    in-feature count that NF4's 64-element blocks divide.
    """
    if hidden % 64:
        raise ValueError(f"hidden={hidden} must be a multiple of 64 (NF4 blocks of 64)")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )


@dataclass(frozen=True)
class PretrainSettings:
    """Full-parameter pretraining of the demo base (the values used for the shipped model)."""

    steps: int = 800
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0


def pack_rows(docs: Sequence[np.ndarray], seq_len: int) -> list[list[int]]:
    """Greedy in-order packing: each document (``n`` tokens) fills ``n - 1`` positions."""
    rows: list[list[int]] = [[]]
    room = seq_len
    for i, d in enumerate(docs):
        n = min(len(d), seq_len + 1) - 1
        if n > room:
            rows.append([])
            room = seq_len
        rows[-1].append(i)
        room -= n
    return rows


def make_batch(
    docs: Sequence[np.ndarray], rows: Sequence[Sequence[int]], seq_len: int, pad: int
) -> tuple[np.ndarray, ...]:
    """Rows as arrays ``[B, S]``: input_ids, targets, loss_mask, segment_ids, positions."""
    shape = (len(rows), seq_len)
    ids, tgt = np.full(shape, pad, np.int32), np.full(shape, pad, np.int32)
    mask, seg, pos = (
        np.zeros(shape, np.float32),
        np.zeros(shape, np.int32),
        np.zeros(shape, np.int32),
    )
    for b, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row, start=1):
            d = docs[i][: seq_len + 1]
            n = len(d) - 1
            ids[b, t : t + n], tgt[b, t : t + n] = d[:-1], d[1:]
            mask[b, t : t + n], seg[b, t : t + n], pos[b, t : t + n] = 1.0, s, np.arange(n)
            t += n
    return ids, tgt, mask, seg, pos


def lm_loss(module: LlamaForCausalLM, params, ids, tgt, mask, seg, pos) -> jax.Array:
    """Mean next-token cross-entropy over ``mask`` (all ``[B, S]``)."""
    logits, _ = module.apply({"params": params}, ids, pos, seg)  # (B, S, V)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tgt)
    return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def pretrain(
    config: LlamaConfig,
    docs: Sequence[np.ndarray],
    settings: PretrainSettings,
    pad_id: int,
    log: Callable[[str], None] = print,
) -> tuple[dict, list[tuple[int, float]]]:
    """Full-parameter AdamW pretraining from ``init_params``; returns (params, [(step, loss)]).

    Linear warmup then cosine decay to 10 % of ``lr``; gradients clipped at norm 1. Rows are
    visited in a seeded random order, cycling through the packed corpus as often as needed.
    """
    s = settings
    module = LlamaForCausalLM(config)
    params = init_params(config, jax.random.key(s.seed))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, s.lr, s.warmup, max(s.steps, s.warmup + 1), end_value=0.1 * s.lr
    )
    # Norm weights are not decayed: pulling them to 0 only fights the normalisation.
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, _: "norm" not in jax.tree_util.keystr(path), params
    )
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=s.weight_decay, mask=decay_mask),
    )
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(module, p, *batch))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rows = pack_rows(docs, s.seq_len)
    rng = np.random.default_rng(s.seed)
    order = rng.permutation(len(rows))
    log(
        f"pretraining: {len(docs)} documents in {len(rows)} rows of {s.seq_len}; "
        f"{s.steps} steps x {s.batch_size} rows ({s.steps * s.batch_size / len(rows):.2f} epochs)"
    )
    history: list[tuple[int, float]] = []
    t0, cursor, running = time.time(), 0, []
    for i in range(1, s.steps + 1):
        if cursor + s.batch_size > len(order):
            order, cursor = rng.permutation(len(rows)), 0
        batch = make_batch(
            docs, [rows[r] for r in order[cursor : cursor + s.batch_size]], s.seq_len, pad_id
        )
        cursor += s.batch_size
        params, opt_state, loss = step(params, opt_state, batch)
        running.append(loss)
        if i % 100 == 0 or i == s.steps:
            mean = float(np.mean(jax.device_get(running)))
            running = []
            history.append((i, mean))
            log(
                f"step {i:5d}  loss {mean:.4f}  ppl {math.exp(mean):8.3f}  "
                f"lr {float(schedule(i)):.2e}  {time.time() - t0:6.1f}s"
            )
    return params, history
