"""KV-cache sampling: greedy, temperature, top-k and top-p, batched with left padding.

One jitted function prefills the cache with the (left-padded) prompts, then decodes one token a
step inside a ``lax.while_loop`` until every row has produced EOS or ``max_new_tokens``. Works on
any parameter tree the model accepts (plain, NF4, LoRA-wrapped). The command line is
``python -m jaxlora.generate`` (:mod:`jaxlora.generate`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxlora import data
from jaxlora.data.prompts import Prompt
from jaxlora.model import Model, default_positions
from jaxlora.models.llama import LlamaForCausalLM
from jaxlora.weights import prepare


def init_caches(config, batch: int, length: int, dtype, runs=None) -> list[dict[str, jax.Array]]:
    """Empty caches: k/v ``[B, kv_heads, T, head_dim]``, segment ids ``[B, T]``, one per layer;
    with ``runs`` (a module scanning stacked layers), one per run with a leading layer axis."""
    shape = (batch, config.num_key_value_heads, length, config.head_dim)
    spans = runs or tuple((i, i + 1) for i in range(config.num_hidden_layers))
    lead = lambda start, stop: () if runs is None else (stop - start,)
    return [
        {
            "k": jnp.zeros(lead(*r) + shape, dtype),
            "v": jnp.zeros(lead(*r) + shape, dtype),
            "segment_ids": jnp.zeros(lead(*r) + (batch, length), jnp.int32),
            "index": jnp.zeros(lead(*r), jnp.int32),
        }
        for r in spans
    ]


def _sample(logits, key, temperature, top_k, top_p):
    """``logits [B, V]`` (float32) -> token ids ``[B]``."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:  # more than the vocabulary keeps every token (as transformers' TopKLogitsWarper)
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop_sorted = cum - jax.nn.softmax(sorted_logits, axis=-1) >= top_p
        drop = (
            jnp.zeros_like(drop_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(drop_sorted)
        )
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


class DecodeState(NamedTuple):
    """Where decoding is: ``step`` tokens written to ``out [B, max_new_tokens]``, the next
    token's ``logits [B, V]``, the caches, which rows are ``done`` (EOS produced), each row's
    last position, the sampling key."""

    step: jax.Array
    logits: jax.Array
    caches: list
    out: jax.Array
    done: jax.Array
    pos: jax.Array
    key: jax.Array


def _check_longrope_regeneration(config, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse a Phi-3 longrope generation whose cache would cross the short/long switch.

    ``Phi3ForCausalLM.prepare_inputs_for_generation`` throws the KV cache away at the step whose
    input reaches ``original_max_position_embeddings + 1`` tokens and recomputes every key with
    the long factors; jaxlora's compiled decode loop keeps its cache. Generation that stays on
    one side (prompt and output within the original length, or a prompt already past it) is the
    same in both. Other families switch per call without recomputing, as jaxlora does.
    """
    s = config.rope_scaling
    if config.model_type != "phi3" or s is None or s.rope_type != "longrope":
        return
    original = s.original_max_position_embeddings
    if prompt_len <= original and prompt_len + max_new_tokens >= original + 2:
        raise NotImplementedError(
            f"phi3 longrope: a prompt of {prompt_len} tokens (padded) + {max_new_tokens} new "
            f"tokens crosses original_max_position_embeddings={original}, where transformers "
            "recomputes the whole KV cache with the long factors; jaxlora does not. Keep "
            f"prompt + max_new_tokens <= {original + 1}, or use a prompt longer than {original}"
        )


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """The sampling settings ``generate`` and ``stream`` accept, refused as transformers'
    ``GenerationConfig`` refuses them (a negative temperature would invert the distribution)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off); got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off); got {top_p}")


def _prefill(module, params, input_ids, attention_mask, eos_ids, key, max_new_tokens):
    """Run the left-padded prompts ``[B, P]`` through the model, filling fresh caches."""
    B, P = input_ids.shape
    _check_longrope_regeneration(module.config, P, max_new_tokens)
    caches = init_caches(module.config, B, P + max_new_tokens, module.dtype, module.runs)
    positions = default_positions(attention_mask)
    logits, caches = module.apply({"params": params}, input_ids, positions, attention_mask, caches)
    out = jnp.full((B, max_new_tokens), eos_ids[0], jnp.int32)
    done = jnp.zeros((B,), bool)
    return DecodeState(jnp.int32(0), logits[:, -1], caches, out, done, positions[:, -1], key)


def _decode(module, params, state: DecodeState, eos_ids, temperature, top_k, top_p):
    """Sample one token per row from ``state.logits``, write it, and run it through the model."""
    key, sub = jax.random.split(state.key)
    tok = _sample(state.logits.astype(jnp.float32), sub, temperature, top_k, top_p)
    tok = jnp.where(state.done, eos_ids[0], tok).astype(jnp.int32)
    out = state.out.at[:, state.step].set(tok)
    done = state.done | jnp.isin(tok, eos_ids)
    pos = state.pos + 1
    ones = jnp.ones((tok.shape[0], 1), jnp.int32)
    logits, caches = module.apply(
        {"params": params}, tok[:, None], pos[:, None], ones, state.caches
    )
    return DecodeState(state.step + 1, logits[:, -1], caches, out, done, pos, key)


_SAMPLING = ("temperature", "top_k", "top_p")
_prefill_jit = jax.jit(_prefill, static_argnames=("module", "max_new_tokens"))
_decode_jit = jax.jit(_decode, static_argnames=("module", *_SAMPLING), donate_argnames="state")


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", *_SAMPLING))
def generate_ids(
    module: LlamaForCausalLM,
    params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    eos_ids: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """Left-padded prompts ``[B, P]`` -> new tokens ``[B, max_new_tokens]`` (EOS after EOS),
    in one compiled loop that stops when every row is done."""
    state = _prefill(module, params, input_ids, attention_mask, eos_ids, key, max_new_tokens)
    cond = lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done)
    body = lambda s: _decode(module, params, s, eos_ids, temperature, top_k, top_p)
    return jax.lax.while_loop(cond, body, state).out


def _bucket(n: int, lo: int) -> int:
    """The smallest power of two that is at least ``n`` and ``lo``."""
    return max(lo, 1 << max(0, n - 1).bit_length())


class Prepared(NamedTuple):
    """A batch of prompts as the compiled loop takes them."""

    n: int  # real prompts (the batch is padded to a power of two)
    ids: jax.Array
    mask: jax.Array
    eos_ids: jax.Array


def _prepare_prompts(tok, prompts: Sequence[Prompt], eos: Sequence[int] = ()) -> Prepared:
    if tok is None:
        raise ValueError("this model has no tokenizer; call generate_ids with token ids instead")
    if not prompts:
        raise ValueError("no prompts to complete")
    encoded = [data.encode_prompt(tok, p) for p in prompts]
    n = len(encoded)
    # Shapes come in powers of two, so the jitted loop compiles once per bucket, not once per
    # call: extra rows repeat the first prompt (and are dropped), extra columns are left padding.
    encoded += [encoded[0]] * (_bucket(n, 1) - n)
    width = _bucket(max(len(e) for e in encoded), 16)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = np.full((len(encoded), width), pad, np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encoded):  # left padding: every prompt ends at the same slot
        ids[i, width - len(e) :] = e
        mask[i, width - len(e) :] = 1
    stops = jnp.asarray(stop_ids(tok, eos), jnp.int32)
    return Prepared(n, jnp.asarray(ids), jnp.asarray(mask), stops)


def stop_ids(tok, eos: Sequence[int] = ()) -> list[int]:
    """Where generation stops: ``eos`` (the checkpoint's, ``Model.generation.eos_ids``: every
    id of ``generation_config.json``'s ``eos_token_id``, as transformers' ``generate``), the
    tokenizer's EOS, and the special token its chat template ends a model turn with (Gemma's
    ``<end_of_turn>``, Llama 3's ``<|eot_id|>``), for a model whose files do not list it."""
    tok_eos = tok.eos_token_id
    ids = list(eos)
    ids += [e for e in (tok_eos if isinstance(tok_eos, list) else [tok_eos]) if e not in ids]
    if getattr(tok, "chat_template", None):
        answer = "jaxlora answer"
        turn = [{"role": "user", "content": "question"}, {"role": "assistant", "content": answer}]
        text = tok.apply_chat_template(turn, tokenize=False)
        after = text[text.rindex(answer) + len(answer) :]
        first = tok(after, add_special_tokens=False)["input_ids"][:1]
        ids += [t for t in first if t in tok.all_special_ids and t not in ids]
    return ids


def _texts(tok, new: np.ndarray, eos_ids: jax.Array, n: int) -> list[str]:
    """Each of the first ``n`` rows of new tokens decoded up to (not including) its first EOS."""
    texts, eos_set = [], set(np.asarray(eos_ids).tolist())
    for row in np.asarray(new)[:n]:
        stop = [i for i, t in enumerate(row) if t in eos_set]
        texts.append(tok.decode(row[: stop[0]] if stop else row, skip_special_tokens=True))
    return texts


def generate(
    model: Model,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    params: Any = None,
) -> list[str]:
    """Complete each prompt (greedy by default), in one compiled loop.

    A prompt is text, sent as written (with the tokenizer's BOS, as training adds it), or a
    conversation — a list of ``{"role", "content"}`` messages, e.g. ``data.user_prompt("...")``
    — rendered with the model's chat template, which carries the run's prompt format
    (:mod:`jaxlora.data.prompts`).
    """
    _check_sampling(temperature, top_k, top_p)
    tok = model.tokenizer
    batch = _prepare_prompts(tok, prompts, model.generation.eos_ids)
    new = generate_ids(
        model.module(),
        prepare(model.params if params is None else params, model.kernels),
        batch.ids,
        batch.mask,
        batch.eos_ids,
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
    )
    if not new.is_fully_addressable:  # multi-host: every process needs every row to decode
        new = multihost_utils.process_allgather(new, tiled=True)
    return _texts(tok, np.asarray(new), batch.eos_ids, batch.n)


class Partial(NamedTuple):
    """What :func:`stream` has produced so far: each prompt's text and whether it is finished."""

    texts: list[str]
    done: list[bool]


def stream(
    model: Model,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Iterator[Partial]:
    """:func:`generate`, one token at a time: yields a :class:`Partial` after every step.

    The same prefill and decode step as :func:`generate`'s compiled loop (so the same tokens),
    each jitted on its own so the host sees every token as it is produced.
    """
    _check_sampling(temperature, top_k, top_p)
    tok = model.tokenizer
    batch = _prepare_prompts(tok, prompts, model.generation.eos_ids)
    module, params = model.module(), prepare(model.params, model.kernels)
    state = _prefill_jit(
        module, params, batch.ids, batch.mask, batch.eos_ids, jax.random.key(seed), max_new_tokens
    )
    sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    for step in range(max_new_tokens):
        state = _decode_jit(module, params, state, batch.eos_ids, **sampling)
        out, done = jax.device_get((state.out, state.done))
        texts = _texts(tok, out[:, : step + 1], batch.eos_ids, batch.n)
        yield Partial(texts, [bool(d) for d in done[: batch.n]])
        if done.all():
            return
