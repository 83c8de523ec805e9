"""Greedy decoding and exact-match scoring for the demo (no KV cache: prompts are ~100 tokens).

Used by ``tools/make_demo.py`` to check what the freshly pretrained base knows, in the
plain-text form it was trained on (:func:`fact_probes`), and that it does *not* yet answer the
same facts as Alpaca questions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tools.demo_world import Person

# (params, input_ids [B, S], positions [B, S], segment_ids [B, S]) -> logits [B, S, V]
Forward = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


def greedy_generate(
    forward: Forward,
    params,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[str]:
    """Greedy continuations of ``prompts`` (``<s>`` prepended), cut at ``</s>``, decoded.

    Prompts are left-padded into one buffer ``[B, P + max_new_tokens]``; padding has segment 0
    (masked out) and positions restart at each prompt's first token, so every row computes what
    it would alone. Causal attention means not-yet-written slots never affect earlier logits.
    """
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(prompts))["input_ids"]
    width = max(len(e) for e in encoded) + max_new_tokens

    @jax.jit
    def next_tokens(params, ids, seg, t):
        pos = jnp.maximum(jnp.cumsum(seg, axis=-1) - 1, 0)
        logits = forward(params, ids, pos, seg)  # (B, W, V)
        return jnp.argmax(logits[:, t - 1], axis=-1)

    outs: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        p = max(len(e) for e in chunk)
        ids = np.zeros((len(chunk), width), np.int32)
        seg = np.zeros((len(chunk), width), np.int32)
        for b, e in enumerate(chunk):
            ids[b, p - len(e) : p], seg[b, p - len(e) : p] = e, 1
        done = np.zeros(len(chunk), bool)
        for t in range(p, p + max_new_tokens):
            tok = np.asarray(next_tokens(params, ids, seg, t))
            ids[:, t], seg[:, t] = tok, 1
            done |= tok == eos
            if done.all():
                break
        for b in range(len(chunk)):
            new = ids[b, p : p + max_new_tokens].tolist()
            new = new[: new.index(eos)] if eos in new else new
            outs.append(tokenizer.decode(new))
    return outs


def accuracy_by_task(tasks: Sequence[str], hits: Sequence[bool]) -> dict[str, float]:
    """Fraction of ``hits`` per task name and over ``"all"``."""
    groups: dict[str, list[bool]] = {"all": list(hits)}
    for task, hit in zip(tasks, hits, strict=True):
        groups.setdefault(task, []).append(hit)
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(groups.items())}


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> list[bool]:
    """Whether each prediction equals its target, ignoring surrounding whitespace."""
    return [p.strip() == t.strip() for t, p in zip(targets, predictions, strict=True)]


def fact_probes(people: Sequence[Person]) -> list[tuple[str, str, str]]:
    """Plain-text probes (attribute, prompt, answer) in the pretraining phrasing, per person."""
    out = []
    for p in people:
        out.append(("town", f"{p.name} lives in", f" {p.town}."))
        out.append(("job", f"The job of {p.name} is", f" {p.job}."))
        out.append(("pet", f"{p.name} has a pet", f" {p.pet}."))
        out.append(("colour", f"The favourite colour of {p.name} is", f" {p.colour}."))
    return out
