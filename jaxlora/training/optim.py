"""AdamW with warmup + cosine / linear / constant decay and global-norm clipping (optax)."""

from __future__ import annotations

import optax


def make_schedule(lr: float, total_steps: int, warmup_ratio: float, kind: str) -> optax.Schedule:
    """Linear warmup over ``ceil(warmup_ratio · total_steps)`` steps, then ``kind`` decay to 0.

    ``constant`` holds ``lr`` after warmup. Steps are optimizer steps (after accumulation).
    """
    warmup = min(total_steps, int(-(-warmup_ratio * total_steps // 1)))
    decay_steps = max(total_steps - warmup, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"train.schedule={kind!r}: expected cosine, linear or constant")
    if warmup == 0:
        return decay
    # Warmup rises linearly from lr/warmup (not 0, so the first step already moves the
    # adapters); the peak lr is reached at step `warmup`, where the decay starts.
    ramp = optax.linear_schedule(lr / warmup, lr, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


def make_optimizer(
    schedule: optax.Schedule,
    *,
    weight_decay: float,
    max_grad_norm: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (if ``max_grad_norm`` > 0) then AdamW, as PEFT/HF Trainer do."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
    return adamw
