"""Orbax checkpoints (``jaxlora.training.checkpoint``): a bit-identical round trip of the trainable
half (LoRA A/B, DoRA magnitudes, a ``modules_to_save`` array), the AdamW state, the data position
and the RNG key; ``latest_step`` and keep-K retention; refusing a foreign or damaged checkpoint."""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlora import data, lora
from jaxlora.models.llama import init_params
from jaxlora.training.checkpoint import Checkpointer, ResumeError, check_compatible, meta_json
from tests.hf_models import tiny_config

# A failed Orbax restore (the damaged and mismatched checkpoints below) leaves its asyncio read
# tasks and coroutines behind; they are reported when collected, during whichever test runs then.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]

CFG = tiny_config()
LORA = lora.LoraConfig(r=2, alpha=4, init="random", modules_to_save=("lm_head",))
META = {
    "base_model": "tiny",
    "base_fingerprint": "f00d",
    "lora": meta_json(lora.to_meta(LORA)),
    "quant": {"type": "none", "blocksize": 64, "double_quant": True},
}


VARIANTS = {
    "lora_f32_modules_to_save": LORA,
    "dora_bf16": lora.LoraConfig(r=3, alpha=8, init="random", use_dora=True, dtype="bfloat16"),
}
TX = optax.adamw(1e-2, weight_decay=0.01)


@functools.cache
def _trained_state(variant: str = "lora_f32_modules_to_save"):
    """The trainable half of a tiny LoRA-wrapped Llama (``LoRAWeight`` halves, ``None`` holes)
    and its AdamW state after two updates (non-zero moments and count). Computed once."""
    cfg = VARIANTS[variant]
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))  # no compile
    base = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    params = lora.inject(base, cfg, jax.random.key(1))
    trainable = lora.partition(params, cfg)[1]
    opt_state = TX.init(trainable)

    @jax.jit
    def update(trainable, opt_state, grads):
        updates, opt_state = TX.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    for _ in range(2):
        grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), trainable)
        trainable, opt_state = update(trainable, opt_state, grads)
    return trainable, opt_state


def _like(tree):
    """A tree of the same structure with other values (what a fresh run would restore into)."""
    return jax.tree.map(lambda x: jnp.full_like(x, 3), tree)


def _dataset() -> data.PackedDataset:
    examples = [
        data.Example(np.arange(n, dtype=np.int32), np.arange(n) > 1) for n in (4, 5, 6, 7, 3, 5)
    ]
    return data.PackedDataset.build(examples, 8, packing=False)  # 6 rows: 3 batches of 2


def _data_state() -> dict:
    """The position of a real batch iterator four batches in (epoch 1, index 1)."""
    it = data.batches(_dataset(), 2, seed=3)
    for _ in range(4):
        next(it)
    return it.state()


def _lora_weights(tree) -> list[lora.LoRAWeight]:
    is_lora = lambda x: isinstance(x, lora.LoRAWeight)
    return [x for x in jax.tree.leaves(tree, is_leaf=is_lora) if is_lora(x)]


def _assert_bit_identical(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert (g.dtype, g.shape) == (w.dtype, w.shape)
        assert g.tobytes() == w.tobytes()


def _save(directory: Path, steps=(1,), keep: int = 3) -> Checkpointer:
    trainable, opt_state = _trained_state()
    ck = Checkpointer(directory, keep=keep, async_save=False)
    for s in steps:
        ck.save(s, trainable, opt_state, {"epoch": 0, "index": s}, jax.random.key(s), META)
    return ck


# ---- the round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_identical_with_the_same_tree_structure(tmp_path, variant):
    cfg = VARIANTS[variant]
    trainable, opt_state = _trained_state(variant)
    assert len(_lora_weights(trainable)) == 4  # q_proj and v_proj of both layers
    rng, _ = jax.random.split(jax.random.key(42))
    data_state = _data_state()
    meta = {**META, "lora": meta_json(lora.to_meta(cfg))}
    ck = Checkpointer(tmp_path / "ckpt", keep=2, async_save=False)
    ck.save(7, trainable, opt_state, data_state, rng, meta)

    # Restore into trees of other values: only their structure is used.
    got, got_opt, got_data, got_rng, got_meta = ck.restore(
        7, _like(trainable), _like(opt_state), meta
    )
    ck.close()

    _assert_bit_identical(got, trainable)
    _assert_bit_identical(got_opt, opt_state)
    assert int(got_opt[0].count) == 2  # optax.adamw: (ScaleByAdamState, ...)
    for g, w in zip(_lora_weights(got), _lora_weights(trainable), strict=True):
        assert g.base is None and g._aux() == w._aux()  # static scale/dropout/use_dora kept
        assert (g.magnitude is None) == (not cfg.use_dora)
    assert jnp.issubdtype(got_rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(got_rng), jax.random.key_data(rng))
    # the restored key draws what the saved key draws
    np.testing.assert_array_equal(jax.random.normal(got_rng, (3,)), jax.random.normal(rng, (3,)))
    assert got_data == data_state
    assert got_meta == {**meta, "step": 7, "data_state": data_state}


def test_restored_data_state_resumes_the_iterator_where_it_stopped(tmp_path):
    ds = _dataset()
    it = data.batches(ds, 2, seed=3)
    for _ in range(4):
        next(it)
    trainable, opt_state = _trained_state()
    ck = Checkpointer(tmp_path / "ckpt", keep=1, async_save=False)
    ck.save(4, trainable, opt_state, it.state(), jax.random.key(0), META)
    *_, data_state, _, _ = ck.restore(4, trainable, opt_state, META)
    ck.close()
    resumed = data.batches(ds, 2, seed=3)
    resumed.restore(data_state)
    for _ in range(4):  # across the epoch boundary
        want, got = next(it), next(resumed)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


# ---- latest_step, retention, async saves ---------------------------------------------------------


def test_latest_step_and_keep_k_retention(tmp_path):
    directory = tmp_path / "ckpt"
    ck = Checkpointer(directory, keep=2, async_save=False)
    assert ck.latest_step() is None
    ck.close()
    ck = _save(directory, steps=(2, 4, 6, 8), keep=2)
    assert ck.latest_step() == 8
    assert sorted(int(p.name) for p in directory.iterdir()) == [6, 8]
    ck.close()
    # a new Checkpointer (a resumed process) sees the same steps and keeps pruning
    trainable, opt_state = _trained_state()
    ck = Checkpointer(directory, keep=2, async_save=False)
    assert ck.latest_step() == 8
    ck.save(10, trainable, opt_state, {}, jax.random.key(0), META)
    assert sorted(int(p.name) for p in directory.iterdir()) == [8, 10]
    assert ck.read_meta(8)["data_state"] == {"epoch": 0, "index": 8}
    ck.close()


def test_async_save_is_readable_after_close(tmp_path):
    trainable, opt_state = _trained_state()
    ck = Checkpointer(tmp_path / "ckpt", keep=3)  # async, as the train loop uses it
    ck.save(1, trainable, opt_state, {"index": 1}, jax.random.key(1), META)
    ck.save(2, trainable, opt_state, {"index": 2}, jax.random.key(2), META)
    ck.close()
    ck = Checkpointer(tmp_path / "ckpt", keep=3, async_save=False)
    assert ck.latest_step() == 2
    got, got_opt, got_data, got_rng, _ = ck.restore(2, trainable, _like(opt_state), META)
    _assert_bit_identical(got, trainable)
    _assert_bit_identical(got_opt, opt_state)
    assert got_data == {"index": 2}
    np.testing.assert_array_equal(
        jax.random.key_data(got_rng), jax.random.key_data(jax.random.key(2))
    )
    ck.close()


def test_an_interrupted_save_is_not_a_step(tmp_path):
    """Orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it on commit: a kill during a
    save leaves such a directory, which ``latest_step`` must not take for a checkpoint."""
    directory = tmp_path / "ckpt"
    _save(directory, steps=(1, 2)).close()
    (directory / "3.orbax-checkpoint-tmp-1234").mkdir()
    shutil.copytree(directory / "2", directory / "4.orbax-checkpoint-tmp-99")  # fully written
    trainable, opt_state = _trained_state()
    ck = Checkpointer(directory, keep=3, async_save=False)
    assert ck.latest_step() == 2
    got, *_ = ck.restore(2, trainable, _like(opt_state), META)
    _assert_bit_identical(got, trainable)
    ck.close()


# ---- refusing a checkpoint of another run --------------------------------------------------------


def _changed(section: str, **changes) -> dict:
    """``META`` with ``changes`` in ``section`` (``None`` drops the key)."""
    merged = {**META[section], **changes}
    return {**META, section: {k: v for k, v in merged.items() if v is not None}}


@pytest.mark.parametrize(
    "expect, needles",
    [
        (
            {**META, "base_model": "other", "base_fingerprint": "beef"},
            ["different base model", "'tiny'", "f00d", "'other'", "beef", "refusing to resume"],
        ),
        (_changed("lora", r=4), ["incompatible lora config", "lora.r: 2 -> 4"]),
        (
            _changed("lora", target_modules=["k_proj", "q_proj"], use_dora=True),
            ["lora.target_modules: None -> ['k_proj', 'q_proj']", "lora.use_dora: False -> True"],
        ),
        (
            _changed("quant", type="nf4"),
            ["incompatible quant config", "quant.type: 'none' -> 'nf4'"],
        ),
        (_changed("quant", blocksize=None), ["quant.blocksize: 64 -> None"]),
    ],
    ids=["base", "lora_r", "lora_two_keys", "quant_type", "quant_key_missing"],
)
def test_restore_with_mismatched_meta_raises_resume_error_naming_the_difference(
    tmp_path, expect, needles
):
    ck = _save(tmp_path / "ckpt", steps=(3,))
    trainable, opt_state = _trained_state()
    with pytest.raises(ResumeError) as e:
        ck.restore(3, trainable, opt_state, expect)
    ck.close()
    msg = str(e.value)
    assert str(tmp_path / "ckpt" / "3") in msg
    for needle in needles:
        assert needle in msg, msg
    assert isinstance(e.value, ValueError)


def test_check_compatible_ignores_what_a_resume_may_change():
    saved = {**META, "step": 5, "data_state": {"index": 5}, "base_model": "/old/path/to/tiny"}
    check_compatible(saved, META, Path("ckpt/5"))  # same fingerprint: the base may have moved
    check_compatible({}, {}, Path("ckpt/5"))


@pytest.mark.parametrize("other", ["larger_arrays", "one_more_array"])
def test_restore_into_a_tree_of_other_shapes_raises_resume_error(tmp_path, other):
    """E.g. a run whose trainable tree changed (another rank, another target) under a meta that
    still matches: ``_unflat`` would name the array and both shapes, or both counts."""
    ck = _save(tmp_path / "ckpt", steps=(3,))
    trainable, opt_state = _trained_state()
    if other == "larger_arrays":
        like = jax.tree.map(lambda x: jnp.zeros((x.shape[0] + 1, *x.shape[1:]), x.dtype), trainable)
    else:
        like = {**trainable, "extra": {"weight": jnp.zeros(3)}}
    try:
        with pytest.raises(ResumeError, match="checkpoint (array|holds)"):
            ck.restore(3, like, _like(opt_state), META)
    finally:
        ck.close()


# ---- damaged checkpoints -------------------------------------------------------------------------


def _truncate_data(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])


def _empty_step_dir(step_dir: Path) -> None:
    shutil.rmtree(step_dir)
    step_dir.mkdir()


# Each damage, and what Orbax itself raises for it (wrapped in a ResumeError by restore).
DAMAGE = {
    "truncated_arrays": _truncate_data,  # tensorstore OUT_OF_RANGE, ~4 KB message
    "state_deleted": lambda d: shutil.rmtree(d / "state"),  # KeyError 'Item "state" ...'
    "meta_truncated": lambda d: (d / "meta" / "metadata").write_text('{"base_fing'),  # JSON
    "empty_step_dir": _empty_step_dir,  # KeyError 'Item "meta" was not found'
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_listed_and_its_restore_raises(tmp_path, damage):
    """``latest_step`` still lists a damaged step; its ``restore`` raises (what it says is the
    next test) and the step before it restores intact."""
    directory = tmp_path / "ckpt"
    _save(directory, steps=(1, 2)).close()
    DAMAGE[damage](directory / "2")
    trainable, opt_state = _trained_state()
    ck = Checkpointer(directory, keep=3, async_save=False)
    assert ck.latest_step() == 2
    with pytest.raises(ResumeError):
        ck.restore(2, trainable, _like(opt_state), META)
    # the step before it is intact
    got, *_ = ck.restore(1, trainable, _like(opt_state), META)
    _assert_bit_identical(got, trainable)
    ck.close()


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_raises_resume_error_naming_the_step(tmp_path, damage):
    directory = tmp_path / "ckpt"
    _save(directory, steps=(1, 2)).close()
    DAMAGE[damage](directory / "2")
    trainable, opt_state = _trained_state()
    ck = Checkpointer(directory, keep=3, async_save=False)
    try:
        with pytest.raises(ResumeError, match=re.escape(str(directory / "2"))) as e:
            ck.restore(2, trainable, _like(opt_state), META)
        assert len(str(e.value)) < 1000
        if damage.startswith(("meta", "empty")):  # what export reads first (the layer layout)
            with pytest.raises(ResumeError, match=re.escape(f"{directory / '2'}: its meta")):
                ck.read_meta(2)
    finally:
        ck.close()


# ---- metadata ------------------------------------------------------------------------------------


def test_meta_json_round_trips_and_makes_live_config_equal_to_saved():
    common = {"r": 8, "rank_pattern": {"q": 4}, "alpha": 16.0, "dtype": None, "use_dora": False}
    m = meta_json({**common, "target_modules": ("q_proj", "v_proj"), "layers": (0, (1, 2))})
    assert m == {**common, "target_modules": ["q_proj", "v_proj"], "layers": [0, [1, 2]]}
    assert json.loads(json.dumps(m)) == m
    assert meta_json(m) == m
    # what a checkpoint hands back (JSON) compares equal to the live config passed through meta_json
    cfg = lora.LoraConfig(target_modules=["v_proj", "q_proj"])
    live = {**META, "lora": meta_json(lora.to_meta(cfg))}
    check_compatible(json.loads(json.dumps(live)), live, Path("ckpt/1"))
    # without it, a tuple in the live config would read as a difference
    raw = {**META, "lora": {"target_modules": ("q_proj", "v_proj")}}
    with pytest.raises(ResumeError, match="lora.target_modules"):
        check_compatible(json.loads(json.dumps(raw)), raw, Path("ckpt/1"))


def test_saved_meta_reads_back_equal(tmp_path):
    cfg = lora.LoraConfig(target_modules=("q_proj", "v_proj"), rank_pattern={"q_proj": 4})
    meta = {**META, "lora": meta_json(lora.to_meta(cfg))}
    ck = _save(tmp_path / "ckpt", steps=())
    trainable, opt_state = _trained_state()
    ck.save(5, trainable, opt_state, {"index": 5}, jax.random.key(0), meta)
    assert ck.read_meta(5) == {**meta, "step": 5, "data_state": {"index": 5}}
    check_compatible(ck.read_meta(5), meta, tmp_path / "ckpt" / "5")
    ck.close()
