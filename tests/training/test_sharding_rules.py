"""The sharding rules for adapter leaves (jaxlora.training.sharding): LoRA factors are split
over ``fsdp`` even where the base's rule for their model dimension names another axis, so a
pure FSDP mesh holds 1/n of every adapter, its gradient and its optimizer state per device
(the numbers against one device: tests/test_multidevice.py)."""

from __future__ import annotations

import types

import pytest
from jax.tree_util import DictKey

from jaxlora.config.recipe import _default_rules
from jaxlora.training.sharding import leaf_spec


def _mesh(data=1, fsdp=1, tensor=1):
    return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor})


def _spec(keys, shape, mesh, fused=None):
    path = [DictKey(k) for k in keys]
    return tuple(leaf_spec(path, shape, _default_rules(), mesh, fused))


def _layer(module, *leaf, block="self_attn"):
    return ("model", "layers", "0", block, module, *leaf)


FSDP8 = _mesh(fsdp=8)


@pytest.mark.parametrize(
    ("module", "block", "a_spec", "b_spec"),
    [
        # q/k/v/gate/up: `a [r, in]`'s in is the model width (fsdp already); `b [out, r]`'s out
        # is heads or MLP width (tensor, size 1 here): b takes fsdp
        ("q_proj", "self_attn", (None, "fsdp"), ("fsdp", None)),
        ("k_proj", "self_attn", (None, "fsdp"), ("fsdp", None)),
        ("gate_proj", "mlp", (None, "fsdp"), ("fsdp", None)),
        # o/down: b's out is the model width (fsdp already); a's in is heads / MLP width
        ("o_proj", "self_attn", (None, "fsdp"), ("fsdp", None)),
        ("down_proj", "mlp", (None, "fsdp"), ("fsdp", None)),
    ],
)
def test_every_lora_factor_is_split_over_a_pure_fsdp_mesh(module, block, a_spec, b_spec):
    assert _spec(_layer(module, "a", block=block), (16, 4096), FSDP8) == a_spec
    assert _spec(_layer(module, "b", block=block), (4096, 16), FSDP8) == b_spec


def test_the_base_weights_keep_their_rules():
    assert _spec(_layer("q_proj", "weight"), (4096, 4096), FSDP8) == (None, "fsdp")
    assert _spec(_layer("o_proj", "weight"), (4096, 4096), FSDP8) == ("fsdp", None)


def test_tensor_and_fsdp_split_one_dimension_together():
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    assert _spec(_layer("q_proj", "b"), (4096, 16), mesh) == (("tensor", "fsdp"), None)
    assert _spec(_layer("o_proj", "a"), (16, 4096), mesh) == (None, ("tensor", "fsdp"))
    assert _spec(_layer("q_proj", "a"), (16, 4096), mesh) == (None, "fsdp")  # as the base
    # 6 rows split over tensor (2) but not over tensor x fsdp (4): left as the rule gives
    assert _spec(_layer("q_proj", "b"), (6, 16), mesh) == ("tensor", None)


def test_what_does_not_divide_stays_whole_and_stacked_layers_stay_whole():
    assert _spec(_layer("q_proj", "b"), (12, 16), FSDP8) == (None, None)
    stacked = ("model", "layers", "0:32", "self_attn", "q_proj", "b")
    assert _spec(stacked, (32, 4096, 16), FSDP8) == (None, "fsdp", None)


def test_dora_magnitude_and_optimizer_state_follow_the_factors():
    assert _spec(_layer("q_proj", "magnitude"), (4096,), FSDP8) == ("fsdp",)
    # an optimizer-state leaf (optax's mu / nu) carries the parameter's path below its own keys
    mu = ("0", "mu", *_layer("gate_proj", "b", block="mlp"))
    assert _spec(mu, (14336, 16), FSDP8) == ("fsdp", None)


def test_a_fused_projection_splits_b_only_on_whole_parts():
    """Phi-3's qkv_proj: q | k | v = 4 | 2 | 2 heads of 10 rows (80 rows)."""
    fused = {"qkv_proj": ((40, 20, 20), 10)}
    assert _spec(_layer("qkv_proj", "b"), (80, 4), _mesh(fsdp=4), fused) == ("fsdp", None)
    # 2 ways would put k and v in one shard
    assert _spec(_layer("qkv_proj", "b"), (80, 4), _mesh(fsdp=2), fused) == (None, None)
    both = _mesh(fsdp=2, tensor=2)
    assert _spec(_layer("qkv_proj", "b"), (80, 4), both, fused) == (("tensor", "fsdp"), None)


def test_prepare_gathers_each_factor_over_fsdp_where_it_is_used():
    """weights.prepare writes each LoRA weight's FactorUse: its factors' specs without fsdp
    (one layer's: a stacked leaf's layer axis dropped), so XLA gathers the factor where it is
    used and never moves activations to where a split factor lies (the compiled check:
    tests/targets/test_plan.py); on one device, nothing."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractMesh, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxlora.weights import prepare
    from jaxlora.weights.dispatch import Kernels
    from jaxlora.weights.lora import LoRAWeight

    def half(base, a, b, magnitude=None):
        return LoRAWeight(base, a, b, magnitude, scale=2.0)

    frozen = {"q_proj": half(jnp.zeros((2, 64, 32)), None, None), "norm": jnp.zeros(32)}
    mesh = AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))
    on = lambda *spec: NamedSharding(mesh, P(*spec))
    # stacked [L, r, in], [L, out, r], [L, out]: as tree_shardings gives them
    trainable = half(None, on(None, None, "fsdp"), on(None, ("tensor", "fsdp"), None))
    trainable.magnitude = on(None, "fsdp")
    out = prepare(frozen, Kernels(), adapters={"q_proj": trainable, "norm": None})
    use = out["q_proj"].use
    assert (use.a, use.b, use.magnitude) == (P(None, None), P("tensor", None), P(None))
    assert out["norm"] is frozen["norm"]
    one = Mesh(jax.devices()[:1], ("fsdp",))
    single = half(None, NamedSharding(one, P(None, None)), NamedSharding(one, P(None, None)))
    out = prepare(frozen, Kernels(), adapters={"q_proj": single, "norm": None})
    assert out["q_proj"].use is None  # one device: nothing to gather


def test_an_embedding_table_is_split_on_its_rows_only():
    """A lookup takes whole rows: every mesh axis goes on the table's vocab (a width split made
    XLA move the whole batch's embeddings: tests/targets/test_plan.py), when they divide it."""
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    table = ("model", "embed_tokens", "weight")
    assert _spec(table, (128256, 4096), mesh) == (("tensor", "fsdp"), None)
    assert _spec(table, (128256, 4096), FSDP8) == ("fsdp", None)
    assert _spec(("transformer", "word_embeddings", "weight"), (65024, 64), FSDP8) == ("fsdp", None)
    # a vocab the axes do not divide keeps the rules' spec; the head is a matmul: unchanged
    assert _spec(table, (32001, 4096), FSDP8) == (None, "fsdp")
    assert _spec(("lm_head", "weight"), (128256, 4096), mesh) == ("tensor", "fsdp")


@pytest.mark.parametrize("stacked", [False, True])
def test_every_optimizers_state_has_a_spec_for_each_leaf(stacked):
    """Adafactor's factors of a LoRA factor are 1-D (``v_row``/``v_col`` of an unfactored leaf:
    shape ``(1,)``) under the factor's path: they get a spec of their own rank (replicated),
    not the factor's 2-D one. Every optimizer's state, unrolled or stacked for scan."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxlora.training.optim import OPTIMIZERS, make_optimizer

    proj = {"weight": {"a": jnp.zeros((16, 4096)), "b": jnp.zeros((4096, 16))}}
    proj |= {"bias": jnp.zeros((4096,))}
    layer = {"self_attn": {"q_proj": proj}}
    layers = {"0:2": jax.tree.map(lambda x: jnp.stack([x, x]), layer)} if stacked else {"0": layer}
    trainable = {"model": {"layers": layers}}
    for name in OPTIMIZERS:
        tx = make_optimizer(
            optax.constant_schedule(1e-3), name=name, weight_decay=0.1, max_grad_norm=1.0
        )
        state = jax.eval_shape(tx.init, trainable)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            spec = leaf_spec(path, leaf.shape, _default_rules(), FSDP8)
            assert len(spec) == len(leaf.shape), (name, jax.tree_util.keystr(path))
