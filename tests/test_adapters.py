"""Several adapters on one base equal PEFT's multi-adapter model (torch, CPU, float32, 1e-4).

Three adapters saved by PEFT on one tiny Llama: ``a`` (r=4, three modules, its own ``lm_head``
copy), ``b`` (r=2, every linear, another alpha) and ``c`` (``a``'s shapes, other values).
PEFT's reference loads them into one ``PeftModel`` (``from_pretrained(..., adapter_name=)``,
``load_adapter``) and is read with each active, disabled, after ``delete_adapter`` and after
``merge_and_unload``; jaxlora's Model goes through the same calls.
"""

from __future__ import annotations

import json
import shutil
import types

import chex
import jax
import numpy as np
import peft
import pytest
import torch
from flax.traverse_util import flatten_dict

import jaxlora
from jaxlora import sampling
from jaxlora.adapters import AdapterError
from jaxlora.interop.peft import UnsupportedAdapterError
from jaxlora.interop.safetensors import read_file
from jaxlora.lora import LoraError, LoRAWeight
from jaxlora.weights import NF4Tensor
from tests._tokenizers import make_tokenizer
from tests.hf_models import make_hf_model, random_ids

MODEL_TOL = 1e-4

ADAPTERS = {  # name: (seed, peft.LoraConfig kwargs)
    "a": (1, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "b": (2, dict(r=2, lora_alpha=3, target_modules="all-linear")),
    "c": (3, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
}
PROMPTS = ["The quick brown fox", "Paris is"]


def _hf_base(tok, **overrides):
    return make_hf_model(
        "llama2_mha",
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **overrides,
    )


def _save_peft_adapter(tok, seed: int, kw: dict, directory, **overrides) -> None:
    torch.manual_seed(seed)
    save = ["lm_head"] if seed == 1 else None
    pm = peft.get_peft_model(
        _hf_base(tok, **overrides),
        peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, modules_to_save=save, **kw),
    )
    with torch.no_grad():  # the lm_head copy must differ from the base's
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(directory)


def _logits(pm, ids) -> np.ndarray:
    with torch.no_grad():
        return pm(torch.as_tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The base directory, each adapter's directory, jaxlora's Model with all three loaded,
    and PEFT's logits (and greedy tokens) for every state the tests visit."""
    tmp = tmp_path_factory.mktemp("multi")
    tok = make_tokenizer()
    _hf_base(tok).save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    dirs = {n: tmp / n for n in ADAPTERS}
    for name, (seed, kw) in ADAPTERS.items():
        _save_peft_adapter(tok, seed, kw, dirs[name])
    ids = random_ids(2, 9, seed=3)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]

    pm = peft.PeftModel.from_pretrained(_hf_base(tok), dirs["a"], adapter_name="a")
    pm.load_adapter(dirs["b"], adapter_name="b")
    pm.load_adapter(dirs["c"], adapter_name="c")
    pm.eval()
    ref, greedy = {}, {}
    for name in ADAPTERS:
        pm.set_adapter(name)
        ref[name] = _logits(pm, ids)
        with torch.no_grad():
            greedy[name] = [
                tok.decode(
                    pm.generate(torch.as_tensor([p]), max_new_tokens=6, do_sample=False)[
                        0, len(p) :
                    ],
                    skip_special_tokens=True,
                )
                for p in prompt_ids
            ]
    with pm.disable_adapter():
        ref[None] = _logits(pm, ids)
    pm.set_adapter("a")
    with pytest.warns(UserWarning, match="Setting active adapter to b"):
        pm.delete_adapter("a")
    ref["deleted a"], ref["active after delete"] = _logits(pm, ids), pm.active_adapter
    pm.set_adapter("c")
    ref["merged c"] = _logits(pm.merge_and_unload(), ids)

    model = jaxlora.load_model(tmp / "base")
    for name in ADAPTERS:
        model = model.load_adapter(dirs[name], name=name)
    return types.SimpleNamespace(
        tmp=tmp, tok=tok, dirs=dirs, ids=ids, ref=ref, greedy=greedy, model=model
    )


def test_each_adapter_disabled_and_after_delete_equal_peft(world, caplog):
    model = world.model
    assert model.adapters == ("a", "b", "c")
    assert model.active_adapter == "a"  # the first loaded, as from_pretrained's
    for name in ADAPTERS:
        got = np.asarray(model.set_adapter(name)(world.ids))
        chex.assert_trees_all_close(got, world.ref[name], atol=MODEL_TOL, rtol=0)
    with model.disable_adapter() as base:
        assert base.active_adapter is None and base.lora is None
        chex.assert_trees_all_close(
            np.asarray(base(world.ids)), world.ref[None], atol=MODEL_TOL, rtol=0
        )
        # PEFT's in-place spelling would run the adapter here: it raises instead.
        with pytest.raises(LoraError, match="as base"):
            model(world.ids)
    assert model.active_adapter == "a"  # a value: the model outside the block is unchanged
    after = model.delete_adapter("a")
    assert "'a' was active" in caplog.text
    assert after.adapters == ("b", "c")
    assert after.active_adapter == world.ref["active after delete"] == "b"
    chex.assert_trees_all_close(
        np.asarray(after(world.ids)), world.ref["deleted a"], atol=MODEL_TOL, rtol=0
    )
    alone = after.delete_adapter("b").delete_adapter("c")
    assert alone.adapters == () and alone.adapter_set is None and alone.lora is None
    chex.assert_trees_all_close(
        np.asarray(alone(world.ids)), world.ref[None], atol=MODEL_TOL, rtol=0
    )


def test_merge_adapter_equals_peft_merge_and_unload(world):
    merged = world.model.merge_adapter("c")
    assert merged.adapters == () and merged.lora is None
    assert not any(isinstance(v, LoRAWeight) for v in flatten_dict(merged.params).values())
    chex.assert_trees_all_close(
        np.asarray(merged(world.ids)), world.ref["merged c"], atol=MODEL_TOL, rtol=0
    )


def test_save_adapter_writes_the_active_one(world, tmp_path):
    for name in ("a", "b"):
        out = world.model.set_adapter(name).save_adapter(tmp_path / name)
        want = read_file(world.dirs[name] / "adapter_model.safetensors")
        chex.assert_trees_all_equal(read_file(out / "adapter_model.safetensors"), want)


def test_the_base_is_held_once(world):
    """Every adapter's tree holds the base's own arrays (identity, not equal copies), and the
    distinct buffers of all of them together are the base plus each adapter's own leaves."""
    model = world.model
    base = flatten_dict(model.adapter_set.base, sep=".")
    buffers = {}
    for name in (None, *ADAPTERS):
        flat = flatten_dict(model.set_adapter(name).params if name else base, sep=".")
        overlay = model.adapter_set.named[name].overlay if name else {}
        for key, leaf in flat.items():
            if key not in overlay:
                assert leaf is base[key], key
            elif isinstance(leaf, LoRAWeight):
                assert leaf.base is base[key], key
            for arr in jax.tree_util.tree_leaves(leaf):
                buffers[arr.unsafe_buffer_pointer()] = arr.nbytes
    own = {
        n: sum(
            a.nbytes
            for k, v in ad.overlay.items()
            for a in ([v.a, v.b] if isinstance(v, LoRAWeight) else jax.tree_util.tree_leaves(v))
        )
        for n, ad in model.adapter_set.named.items()
    }
    base_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(base))
    assert own["a"] > own["b"] > 0  # a carries a whole lm_head copy
    assert sum(buffers.values()) == base_bytes + sum(own.values())


def test_a_4bit_base_is_shared_and_runs_as_with_one_adapter(world):
    """QLoRA: the adapters wrap the same ``NF4Tensor`` objects, and an adapter by name gives
    the logits of the same adapter loaded alone (the same tree, so the same program: equal)."""
    nf4 = jaxlora.load_model(world.tmp / "base", quant="nf4")
    model = nf4.load_adapter(world.dirs["a"], name="a").load_adapter(world.dirs["b"], name="b")
    base = flatten_dict(model.adapter_set.base, sep=".")
    assert isinstance(base["model.layers.0.self_attn.q_proj.weight"], NF4Tensor)
    for name in model.adapters:
        for key, leaf in flatten_dict(model.set_adapter(name).params, sep=".").items():
            if isinstance(leaf, LoRAWeight):
                assert leaf.base is base[key], key
    alone = nf4.load_adapter(world.dirs["b"])
    np.testing.assert_array_equal(
        np.asarray(model.set_adapter("b")(world.ids)), np.asarray(alone(world.ids))
    )


def test_generation_with_each_adapter_compiles_once_per_shape(world):
    """Greedy answers equal PEFT's ``generate`` with each adapter; ``a`` and ``c`` (same
    targets, ranks, scales and dropout: one tree structure) share one compiled loop, ``b`` and the
    base compile their own."""
    compiled = sampling.generate_ids._cache_size()
    for name in ("a", "c", "b"):
        answers = sampling.generate(world.model.set_adapter(name), PROMPTS, max_new_tokens=6)
        assert answers == world.greedy[name], name
    assert sampling.generate_ids._cache_size() - compiled == 2  # a = c, b
    with world.model.disable_adapter() as base:
        sampling.generate(base, PROMPTS, max_new_tokens=6)
    assert sampling.generate_ids._cache_size() - compiled == 3
    steps = sampling._decode_jit._cache_size()
    for name in ("a", "c"):
        *_, last = sampling.stream(world.model.set_adapter(name), PROMPTS, max_new_tokens=6)
        assert last.texts == world.greedy[name], name
    assert sampling._decode_jit._cache_size() - steps == 1


def test_bad_calls_name_the_problem_and_leave_the_model_as_it_was(world, tmp_path):
    model = world.model
    before = model(world.ids)
    with pytest.raises(AdapterError, match=r"no adapter named 'd'; loaded: \['a', 'b', 'c'\]"):
        model.set_adapter("d")
    with pytest.raises(AdapterError, match="no adapter named 'd'"):
        model.delete_adapter("d")
    with pytest.raises(AdapterError, match="'b' is already loaded"):
        model.load_adapter(world.dirs["b"], name="b")
    _save_peft_adapter(world.tok, 4, ADAPTERS["b"][1], tmp_path / "wide", hidden_size=48)
    with pytest.raises(UnsupportedAdapterError, match=r"do not fit the weight"):
        model.load_adapter(tmp_path / "wide", name="wide")
    pissa = tmp_path / "pissa"  # PiSSA's base is a residual: it cannot share the base
    shutil.copytree(world.dirs["b"], pissa)
    cfg = json.loads((pissa / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps(cfg | {"init_lora_weights": "pissa"}))
    with pytest.raises(AdapterError, match="changes the base itself"):
        model.load_adapter(pissa, name="pissa")
    with pytest.raises(LoraError, match="holds adapters by name"):
        model.load_adapter(world.dirs["b"])
    unnamed = jaxlora.load_model(world.tmp / "base").load_adapter(world.dirs["b"])
    with pytest.raises(LoraError, match="adapter without a name"):
        unnamed.load_adapter(world.dirs["a"], name="a")
    assert model.adapters == ("a", "b", "c") and model.active_adapter == "a"
    np.testing.assert_array_equal(np.asarray(model(world.ids)), np.asarray(before))
