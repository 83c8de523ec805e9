"""The jitted train and eval steps: token-weighted cross-entropy, gradient accumulation, a guard
that refuses non-finite updates.

Gradient accumulation sums per-token losses (and their gradients) over micro-batches and divides
once by the number of trained tokens of the whole batch, so ``accum × micro`` equals one big batch
exactly, whatever the padding — not a mean of per-micro-batch means.

With ``loss_chunk > 0`` the loss is taken from the final hidden states ``loss_chunk`` tokens at a
time (:mod:`jaxlora.training.loss`), so the ``[tokens, vocab]`` float32 logits never exist at
once, and only the tokens in ``loss_mask`` go through the output head (a masked prompt or
padding costs no head work, in training and in eval); ``0`` forms the logits whole, for every
token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from jaxlora.training.loss import chunked_ce_sum, head_weight
from jaxlora.training.offload import streamed_update
from jaxlora.training.optim import LossScaleState

Batch = dict[str, jax.Array]  # input_ids, targets, loss_mask, segment_ids, positions: [..., B, S]
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def loss_sum(
    module, params, batch: Batch, rng: jax.Array | None = None, *, chunk: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token cross-entropy over ``loss_mask`` (float32) and the count of its tokens;
    ``chunk > 0``: over chunks of that many tokens of the ``[B, S]`` batch, the tokens out of
    the loss skipped (the same sum, one reduction order apart)."""
    chex.assert_equal_shape([batch[k] for k in BATCH_KEYS])
    chex.assert_rank(batch["input_ids"], 2)
    rngs = {"dropout": rng} if rng is not None else {}
    args = (batch["input_ids"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    if chunk == 0:
        logits, _ = module.apply({"params": params}, *args, rngs=rngs)
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["targets"]
        )
        return jnp.sum(ce * mask), jnp.sum(mask)
    h, _ = module.apply({"params": params}, *args, rngs=rngs, return_hidden=True)
    head = head_weight(module.config, params)
    # the head's LoRA-dropout key: one stream apart from the ones Linen derives for the layers
    head_rng = None if rng is None else jax.random.fold_in(rng, 0x4EAD)
    cap = module.config.final_logit_softcapping
    total = chunked_ce_sum(h, head, batch["targets"], mask, chunk, head_rng, softcap=cap)
    return total, jnp.sum(mask)


def real_tokens(batch: Batch) -> jax.Array:
    """Tokens the model processed (not padding), for throughput."""
    return jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)


def make_train_step(
    module,
    combine: Callable[[Any, Any], Any],
    tx: optax.GradientTransformation,
    *,
    dropout: bool,
    loss_chunk: int = 0,
    state_memory: tuple[Any, Any] | None = None,
):
    """``step(trainable, opt_state, frozen, batch [accum, B, S], rng)`` ->
    ``(trainable, opt_state, metrics)``.

    Gradients are taken with respect to ``trainable`` only; ``frozen`` (the base, possibly NF4)
    never gets a gradient or optimizer state. A step whose loss or gradient norm is not finite
    leaves ``trainable`` and ``opt_state`` unchanged and reports ``finite = False``.
    ``loss_chunk``: tokens per chunk of the loss (:func:`loss_sum`; 0 = whole logits).

    With ``tx`` from :func:`~jaxlora.training.optim.dynamic_loss_scale` (float16 compute) the
    loss is multiplied by the state's scale before differentiating, so small gradients survive
    float16; ``tx`` unscales, skips a step whose gradients overflowed and lowers the scale
    (the state moves on, ``trainable`` does not). ``state_memory = (device, host)`` shardings:
    the optimizer state lives in host memory and comes to the device only for the update, one
    parameter's state at a time (:func:`~jaxlora.training.offload.streamed_update`).
    """

    def micro_loss(trainable, frozen, mb, rng, factor):
        params = combine(frozen, trainable)
        rng = rng if dropout else None
        loss, count = loss_sum(module, params, mb, rng, chunk=loss_chunk)
        return loss * factor, (loss, count)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(trainable, opt_state, frozen, batch: Batch, rng: jax.Array):
        accum = batch["input_ids"].shape[0]
        scaled = isinstance(opt_state, LossScaleState)
        # Scaled: each micro-batch's summed loss × scale / (the batch's trained tokens), so the
        # float16 backward carries mean-loss gradients × scale, as torch's GradScaler does.
        total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        factor = opt_state.scale / total if scaled else jnp.float32(1)

        def body(carry, xs):
            g_acc, l_acc, n_acc = carry
            mb, key = xs
            (_, (loss, count)), g = grad_fn(trainable, frozen, mb, key, factor)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss, n_acc + count), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        init = (zeros, jnp.float32(0), jnp.float32(0))
        (grads, loss, count), _ = jax.lax.scan(body, init, (batch, jax.random.split(rng, accum)))
        count = jnp.maximum(count, 1.0)
        if not scaled:
            grads = jax.tree.map(lambda g: g / count, grads)
        loss = loss / count
        grad_norm = optax.tree.norm(grads) / (opt_state.scale if scaled else 1)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        if state_memory is None:
            updates, new_opt_state = tx.update(grads, opt_state, trainable)
            if not scaled:
                new_opt_state = keep(new_opt_state, opt_state)
        else:  # host -> device for the update only, one parameter's state at a time
            updates, new_opt_state = streamed_update(
                tx, grads, opt_state, trainable, state_memory, settle=None if scaled else keep
            )
        new_trainable = optax.apply_updates(trainable, updates)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "trained_tokens": count,
            "tokens": real_tokens(batch),
            "finite": finite,
        }
        if scaled:  # the scale this step used; tx has already skipped or applied it
            metrics["loss_scale"] = opt_state.scale
        return keep(new_trainable, trainable), new_opt_state, metrics

    return step


def make_eval_step(module, combine: Callable[[Any, Any], Any], *, loss_chunk: int = 0):
    """``eval_step(trainable, frozen, batch [B, S]) -> (loss_sum, token_count)`` (no dropout)."""

    def eval_step(trainable, frozen, batch: Batch):
        return loss_sum(module, combine(frozen, trainable), batch, chunk=loss_chunk)

    return eval_step
