"""Packed rows keep examples apart: the model gives each example the same loss packed or not."""

from __future__ import annotations

import jax
import numpy as np
import optax

from jaxlora.data.packing import Example, PackedDataset
from jaxlora.models.llama import LlamaForCausalLM, init_params
from tests.hf_models import tiny_config


def _per_example_loss(module, params, batch):
    logits, _ = module.apply(
        {"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"]
    )
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]))
    out = {}
    for b in range(ce.shape[0]):
        for seg in np.unique(batch["segment_ids"][b]):
            if seg == 0:
                continue
            sel = (batch["segment_ids"][b] == seg) & (batch["loss_mask"][b] > 0)
            out.setdefault((b, int(seg)), float((ce[b] * sel).sum()))
    return out


def test_packed_batch_gives_same_per_example_loss_as_unpacked():
    cfg = tiny_config()
    module = LlamaForCausalLM(cfg)
    params = init_params(cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    examples = []
    for n in [7, 5, 9, 4, 6, 3]:
        tokens = rng.integers(1, 61, size=n).astype(np.int32)
        trained = np.zeros(n, bool)
        trained[n // 2 :] = True  # a prompt half and a response half
        examples.append(Example(tokens, trained))
    packed = PackedDataset.build(examples, seq_len=12, packing=True)
    unpacked = PackedDataset.build(examples, seq_len=12, packing=False)
    assert len(packed) < len(unpacked)  # really packed several examples per row

    pb = packed.batch(range(len(packed)))
    ub = unpacked.batch(range(len(unpacked)))
    p_loss = _per_example_loss(module, params, pb)
    u_loss = _per_example_loss(module, params, ub)
    by_example_packed = {}
    for r, row in enumerate(packed.rows):
        for seg, i in enumerate(row, start=1):
            by_example_packed[i] = p_loss[(r, seg)]
    for i in range(len(examples)):
        np.testing.assert_allclose(by_example_packed[i], u_loss[(i, 1)], rtol=1e-5, atol=1e-5)
