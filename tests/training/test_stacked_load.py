"""Loading a base stacked for scan (``load_base(cfg, mesh)``): the tree equals the loaded tree
stacked, exactly; the runs planned from config.json and the LoRA config are the ones
``stack_for_scan`` finds; and the device holds the base once while it streams in, where loading
then stacking holds it twice. The sharded case (8 fake devices): tests/test_multidevice.py.

A tiny Llama (5 layers, hidden 64 so NF4 keeps its 2-D layout) with LoRA on layers 1-2 only,
so the runs split: ``0 | 1-2 | 3-4``.
"""

from __future__ import annotations

import gc

import chex
import jax
import numpy as np
import pytest

import jaxlora
from jaxlora import lora
from jaxlora.config import load_config
from jaxlora.interop import hf
from jaxlora.models import stacking
from jaxlora.models.stacking import StackingSink
from jaxlora.training import run, sharding
from jaxlora.weights import NF4Tensor
from tests.hf_models import make_deep_model

LORA = ("lora.target_modules=[q_proj,v_proj,down_proj]", "lora.layers_to_transform=[1,2]")
RUNS = ((0, 1), (1, 3), (3, 5))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_deep_model(tmp_path_factory.mktemp("stacked") / "model")


def _cfg(directory, quant="nf4", *extra):
    return load_config("demo", [f"model.path={directory}", f"quant.type={quant}", *LORA, *extra])


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _live() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_stacked_load_equals_the_loaded_tree_stacked(base_dir, quant):
    """Leaf for leaf, bit for bit: the base, then LoRA and the halves the step gets."""
    cfg = _cfg(base_dir, quant)
    mesh = run.make_mesh(cfg)
    plain, stacked = run.load_base(cfg), run.load_base(cfg, mesh)
    assert stacking.stacked_runs(stacked.params) == RUNS
    want = stacking.stack_layers(plain.params, RUNS)
    assert jax.tree.structure(stacked.params) == jax.tree.structure(want)
    chex.assert_trees_all_equal(stacked.params, want)
    key = jax.random.key(3)
    _, f0, t0 = run.init_lora(cfg, plain, key)
    _, f1, t1 = run.init_lora(cfg, stacked, key)
    f0, t0, runs0 = run.stack_for_scan(f0, t0, plain.config, True)
    f1, t1, runs1 = run.stack_for_scan(f1, t1, stacked.config, True)
    assert runs0 == runs1 == RUNS
    assert jax.tree.structure((f1, t1)) == jax.tree.structure((f0, t0))
    chex.assert_trees_all_equal((f1, t1), (f0, t0))


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("lora.rank_pattern={layers.3.self_attn.q_proj: 8}",),  # a rank of its own: 3 apart
        ("lora.modules_to_save=[lm_head]", "lora.bias=all", "lora.use_dora=true"),
        ("lora.target_modules=all-linear", "lora.layers_to_transform=null"),  # one run
    ],
)
def test_planned_runs_are_the_runs_of_the_loaded_model(base_dir, extra):
    """``plan_runs`` (config.json + recipe, shapes only) against what ``stack_for_scan`` computes
    from the loaded, LoRA-wrapped base."""
    cfg = _cfg(base_dir, "nf4", *extra)
    config, raw = hf.read_config(base_dir)
    model, frozen, trainable = run.init_lora(cfg, run.load_base(cfg), jax.random.key(0))
    *_, runs = run.stack_for_scan(frozen, trainable, model.config, True)
    assert run.plan_runs(cfg, config, raw) == runs


def test_device_holds_the_base_once_while_it_streams_in(base_dir, monkeypatch):
    """Live device bytes (``jax.live_arrays``) after every tensor read and every slot written
    stay within the finished base plus the largest tensor; after LoRA, the stacking check, the
    kernels and the placement on the step's shardings, the device holds the base and the
    trainable half only (nothing was copied). Loading then stacking, measured the same way,
    exceeds that bound: it holds the layers twice."""
    samples: list[int] = []
    stream = hf.iter_tensors

    def counted_stream(directory):
        for item in stream(directory):
            samples.append(_live())
            yield item
        samples.append(_live())

    write = stacking._write_slot

    def counted_write(buf, x, i):
        out = write(buf, x, i)
        samples.append(_live())  # the old buffer is gone (donated) unless it was copied
        return out

    monkeypatch.setattr(hf, "iter_tensors", counted_stream)
    monkeypatch.setattr(stacking, "_write_slot", counted_write)
    cfg = _cfg(base_dir, "nf4")
    mesh = run.make_mesh(cfg)
    one_by_one = jax.tree.leaves(run.load_base(cfg).params, is_leaf=_is_weight)
    largest = max(_nbytes(w) for w in one_by_one)

    def measure(stacked: bool) -> tuple[int, int, int]:
        """Over what was live before: the peak while loading, what is live once the halves are
        stacked, and what the step's trees hold (the placed base + the trainable half)."""
        gc.collect()
        before, samples[:] = _live(), []
        model = run.load_base(cfg, mesh if stacked else None)
        peak = max(samples) - before
        model, frozen, trainable = run.init_lora(cfg, model, jax.random.key(0))
        frozen, trainable, _ = run.stack_for_scan(frozen, trainable, model.config, True)
        after_stacking = _live() - before
        kernels, frozen = run.for_mesh(cfg, mesh, frozen, model.config)
        sh = run.step_shardings(cfg, mesh, frozen, trainable, {}, model.config)
        placed = sharding.place(frozen, sh.frozen)
        if stacked:  # already on the step's shardings: placing copies nothing
            leaves = zip(jax.tree.leaves(placed), jax.tree.leaves(frozen), strict=True)
            assert all(a is b for a, b in leaves)
        return peak, after_stacking, _nbytes(placed) + _nbytes(trainable)

    base = sum(_nbytes(w) for w in one_by_one)
    peak, after_stacking, step_trees = measure(stacked=True)
    assert peak <= base + largest, (peak, base, largest)
    assert after_stacking == step_trees  # the base once, plus the adapter
    _, after_stacking, _ = measure(stacked=False)
    assert after_stacking > base + largest, (after_stacking, base, largest)  # the bound can fail


def _is_weight(x) -> bool:
    return isinstance(x, NF4Tensor)


def test_stacking_sink_refuses_what_cannot_be_stacked():
    sink = StackingSink(((0, 2),))
    sink.put(("model", "layers", "0", "norm", "weight"), np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.norm\.weight: .* differs"):
        sink.put(("model", "layers", "1", "norm", "weight"), np.ones(5, np.float32))
    with pytest.raises(ValueError, match="arrived twice"):
        sink.put(("model", "layers", "0", "norm", "weight"), np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"layer\(s\) 1 never arrived"):
        sink.tree()
    with pytest.raises(ValueError, match="in none of the runs"):
        sink.put(("model", "layers", "2", "norm", "weight"), np.ones(4, np.float32))


def test_runs_that_do_not_fit_the_lora_config_are_refused(base_dir):
    """Runs planned for another LoRA config: too coarse (a run mixing LoRA and plain layers)
    cannot take LoRA; too fine would give a checkpoint another layout than an unrolled load."""
    cfg = _cfg(base_dir, "nf4")

    def load(runs):
        return jaxlora.load_model(base_dir, sink=StackingSink(runs))

    with pytest.raises(lora.LoraConfigError, match=r"model\.layers\.0:2\..* but not"):
        run.init_lora(cfg, load(((0, 2), (2, 5))), jax.random.key(0))
    model, frozen, trainable = run.init_lora(
        cfg, load(((0, 1), (1, 2), (2, 3), (3, 5))), jax.random.key(0)
    )
    with pytest.raises(ValueError, match=r"form \(\(0, 1\), \(1, 3\), \(3, 5\)\)"):
        run.stack_for_scan(frozen, trainable, model.config, True)


def test_falcon_layers_stack_as_they_load(tmp_path):
    """Falcon keeps its layers under ``transformer/h``; NF4 as it streams."""
    from jaxlora.interop.bnb import quantizing_converter
    from tests.hf_models import make_hf_falcon

    make_hf_falcon("falcon40b_gqa", tmp_path, num_hidden_layers=3, hidden_size=64)
    config, _ = hf.read_config(tmp_path)
    load = lambda sink: hf.load_params(
        tmp_path, config, convert=quantizing_converter("nf4"), sink=sink
    )
    runs = ((0, 1), (1, 3))
    stacked = load(StackingSink(runs))
    assert set(stacked["transformer"]["h"]) == {"0:1", "1:3"}
    chex.assert_trees_all_equal(stacked, stacking.stack_layers(load(None), runs))
