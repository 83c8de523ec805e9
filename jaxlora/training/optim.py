"""The optimizers (optax): AdamW in float32 or with 8-bit state, Adafactor, Lion, SGD; the LR
schedule; LoRA+ and ``modules_to_save`` learning-rate groups; global-norm clipping.

Every optimizer is ``clip -> direction -> weight decay -> × schedule -> × group factor``, so a
group's factor multiplies its whole update (decay included) as a torch param group's ``lr``
does. The 8-bit AdamW state is :mod:`jaxlora.training.adam8bit`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlora.models.stacking import run_of
from jaxlora.training import adam8bit

OPTIMIZERS = ("adamw", "adamw_8bit", "adafactor", "lion", "sgd")


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


class Group(NamedTuple):
    """A leaf's learning-rate factor (× the schedule) and whether weight decay applies."""

    lr_scale: float
    decay: bool


def param_groups(
    trainable: Any,
    *,
    loraplus_lr_ratio: float | None,
    modules_to_save: tuple[str, ...] = (),
    modules_to_save_lr_scale: float | None = None,
) -> Any:
    """A :class:`Group` for every trainable leaf (same tree), as PEFT's
    ``create_loraplus_optimizer`` (peft/optimizers/loraplus.py) groups parameters: LoRA ``B``
    and every 1-D parameter (DoRA magnitudes, norm weights) get ``ratio ×`` the LR; biases too,
    without weight decay; the rest (``A``, 2-D ``modules_to_save`` weights) the LR. PEFT's
    fourth group, LoRA on embeddings, does not arise: jaxlora does not wrap embeddings.

    ``modules_to_save_lr_scale`` (``train.modules_to_save_lr / train.lr``) then gives every leaf
    of a ``modules_to_save`` module (matched as ``lora.modules_to_save``: a module path ending
    with a name) its own factor.

    Weight decay (:func:`decays`): as HF's Trainer without LoRA+, as
    ``create_loraplus_optimizer`` with it. A leaf of stacked layers (under a ``start:stop`` key,
    :mod:`jaxlora.models.stacking`) is grouped as the layer's own tensor: its dimensions are
    counted without the layer axis.
    """
    loraplus = loraplus_lr_ratio is not None
    ratio = float(loraplus_lr_ratio) if loraplus else 1.0
    decay = decays(trainable, loraplus=loraplus)

    def group(path, leaf, decay) -> Group:
        names = [_key(k) for k in path]
        modules = [".".join(names[:i]) for i in range(1, len(names))]
        if modules_to_save_lr_scale is not None and any(
            m.endswith(n) for m in modules for n in modules_to_save
        ):
            return Group(modules_to_save_lr_scale, decay)
        if names[-1] in ("bias", "b") or _layer_ndim(names, leaf) == 1:
            return Group(ratio, decay)
        return Group(1.0, decay)

    return jax.tree_util.tree_map_with_path(group, trainable, decay)


def decays(params: Any, *, loraplus: bool = False) -> Any:
    """Whether weight decay applies to each leaf (a tree of bools like ``params``): never to
    biases; never to norm weights without LoRA+, as HF's Trainer
    (``get_decay_parameter_names``: names with ``norm`` and every ``nn.LayerNorm``); with LoRA+
    to RMSNorm weights but not to LayerNorm ones (Falcon's), as PEFT's
    ``create_loraplus_optimizer``, which leaves out ``nn.LayerNorm`` modules only. A norm
    weight is a module's 1-D ``weight`` (linear and embedding weights are 2-D, and LoRA's and
    DoRA's leaves are named ``a``, ``b``, ``magnitude``); a LayerNorm has a 1-D ``bias`` too."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [tuple(_key(k) for k in path) for path, _ in flat]
    one_d = {n for n, (_, leaf) in zip(paths, flat, strict=True) if _layer_ndim(n, leaf) == 1}
    norms = {n[:-1] for n in one_d if n[-1] == "weight"}
    layernorms = {m for m in norms if m + ("bias",) in one_d}

    def one(n: tuple[str, ...]) -> bool:
        if n[-1:] == ("bias",):
            return False
        if n[-1:] == ("weight",) and n[:-1] in norms:
            return loraplus and n[:-1] not in layernorms
        return True

    return jax.tree.unflatten(treedef, [one(n) for n in paths])


def _layer_ndim(names: Any, leaf: Any) -> int:
    """A leaf's number of dimensions without the layer axis of a stacked run."""
    return jnp.ndim(leaf) - (run_of(names) is not None)


def _key(k: Any) -> str:
    """A tree path entry's name (a dict key, a named-tuple field, a sequence index)."""
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` on each layer of a stacked run as on its own tensor: leaves under a
    ``start:stop`` key carry a leading layer axis, which a per-tensor statistic must not span
    (8-bit Adam's blocks of 256 and ``min_8bit_size``, Adafactor's factored moments and
    block RMS: bnb and HF compute them on the unrolled model's tensors). ``inner`` is vmapped
    over that axis, one run at a time (runs differ in length); other leaves get it as is."""
    vmapped = optax.GradientTransformation(jax.vmap(inner.init), jax.vmap(inner.update))
    run_at = lambda path: run_of([_key(k) for k in path]) or ""

    def build(tree: Any) -> optax.GradientTransformation:
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        runs = sorted({run_at(path) for path, _ in flat} - {""})
        if not runs:
            return inner
        mask = lambda run: (
            lambda t: jax.tree_util.tree_map_with_path(lambda path, _: run_at(path) == run, t)
        )
        return optax.chain(
            optax.masked(inner, mask("")), *(optax.masked(vmapped, mask(r)) for r in runs)
        )

    return optax.GradientTransformation(
        lambda params: build(params).init(params),
        lambda updates, state, params=None: build(updates).update(updates, state, params),
    )


def scale_by_groups(scales: Any) -> optax.GradientTransformation:
    """Multiply each update leaf by its fixed factor (a tree of floats like the params)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    schedule: optax.Schedule,
    *,
    weight_decay: float,
    max_grad_norm: float,
    name: str = "adamw",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    momentum: float = 0.0,
    min_8bit_size: int = adam8bit.MIN_8BIT_SIZE,
    groups: Any = None,
) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (if ``max_grad_norm`` > 0), then optimizer ``name``; with
    ``groups`` (from :func:`param_groups`), each leaf's update × its factor and decay only where
    its group decays. ``b1``, ``b2``, ``eps`` are Adam's (``adamw``, ``adamw_8bit``, whose
    parameters under ``min_8bit_size`` values keep float32 moments);
    ``momentum`` is SGD's (torch's coupled weight decay: ``wd·p`` joins the gradient)."""
    if groups is None:  # HF's Trainer: all but biases and norm weights
        mask = decays
    else:
        mask = jax.tree.map(lambda g: g.decay, groups, is_leaf=_is_group)
    if name == "adamw":
        tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    elif name == "adamw_8bit":
        tx = optax.chain(
            per_layer(
                adam8bit.scale_by_adam_8bit(b1=b1, b2=b2, eps=eps, min_8bit_size=min_8bit_size)
            ),
            optax.add_decayed_weights(weight_decay, mask),
            optax.scale_by_learning_rate(schedule),
        )
    elif name == "adafactor":  # optax.adafactor's steps, its decay × the schedule (as HF's)
        tx = optax.chain(
            per_layer(
                optax.chain(
                    optax.scale_by_factored_rms(),
                    optax.clip_by_block_rms(1.0),
                    optax.scale_by_param_block_rms(),
                )
            ),
            optax.add_decayed_weights(weight_decay, mask),
            optax.scale_by_learning_rate(schedule),
        )
    elif name == "lion":
        tx = optax.lion(schedule, weight_decay=weight_decay, mask=mask)
    elif name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(weight_decay, mask),
            optax.sgd(schedule, momentum=momentum or None),
        )
    else:
        raise ValueError(f"train.optimizer={name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if groups is not None:
        tx = optax.chain(tx, scale_by_groups(_lr_scales(groups)))
    if max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return tx


def _is_group(x: Any) -> bool:
    return isinstance(x, Group)


def _lr_scales(groups: Any) -> Any:
    return jax.tree.map(lambda g: g.lr_scale, groups, is_leaf=_is_group)


def group_table(groups: Any) -> Mapping[str, Group]:
    """``{dotted path: Group}``: the grouping as a flat table (for logs and tests)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(groups, is_leaf=_is_group)
    return {".".join(_key(k) for k in path): g for path, g in flat}


class LossScaleState(NamedTuple):
    """Dynamic loss scaling around an optimizer's state (float16 compute)."""

    scale: jax.Array  # [] float32: the factor the next step multiplies its loss by
    good_steps: jax.Array  # [] int32: finite steps since the scale last changed
    inner: Any


def dynamic_loss_scale(
    inner: optax.GradientTransformation, init_scale: float, growth_interval: int
) -> optax.GradientTransformation:
    """``inner`` fed gradients of a loss multiplied by ``state.scale``, as torch's
    ``GradScaler``: divide them by the scale; if any is not finite, skip the step (zero
    updates, ``inner``'s state kept) and halve the scale; after ``growth_interval`` finite steps
    in a row, double it. The scale never falls below 1."""

    def init(params):
        return LossScaleState(jnp.float32(init_scale), jnp.zeros([], jnp.int32), inner.init(params))

    def update(grads, state, params=None):
        grads = jax.tree.map(lambda g: g / state.scale, grads)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, new_inner = inner.update(grads, state.inner, params)
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        new_inner = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_inner, state.inner)
        good = jnp.where(finite, state.good_steps + 1, 0)
        grow = good >= growth_interval
        scale = jnp.where(
            finite,
            jnp.where(grow, state.scale * 2, state.scale),
            jnp.maximum(state.scale / 2, 1.0),
        )
        return updates, LossScaleState(scale, jnp.where(grow, 0, good), new_inner)

    return optax.GradientTransformation(init, update)
