"""Whole-model parity with PEFT (torch, CPU, float32, 1e-4 on logits).

Each case builds a PEFT model with random, non-zero A and B (``init_lora_weights=False``), a
perturbed DoRA magnitude, perturbed trainable biases and ``modules_to_save`` copies, saves it with
PEFT, then checks: jaxlora imports it with PEFT's logits; jaxlora's export of it has PEFT's key
set, loads in ``PeftModel.from_pretrained`` with no missing/unexpected keys and PEFT's logits;
the merged export loads in transformers and equals ``merge_and_unload()``.
"""

from __future__ import annotations

import copy
import json
import types
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

import jaxlora
from jaxlora.interop.peft import UnsupportedAdapterError
from jaxlora.interop.safetensors import read_file
from jaxlora.lora import LoraConfig, LoRAWeight, combine, partition
from tests.hf_models import make_hf_model, random_ids

MODEL_TOL = 1e-4
LAYER_TOL = 1e-5

# name: (family, peft.LoraConfig kwargs, check the merged export)
CASES = {
    "plain_llama": (
        "llama2_mha",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        True,
    ),
    "rslora_qwen2_all_linear": (
        "qwen2",
        dict(r=4, lora_alpha=6, use_rslora=True, target_modules="all-linear"),
        True,
    ),
    "dora_qwen3": (
        "qwen3",
        dict(
            r=3,
            lora_alpha=5,
            use_dora=True,
            target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
        ),
        True,
    ),
    "dora_bias_all": ("llama_bias", dict(r=3, lora_alpha=4, use_dora=True, bias="all"), True),
    "bias_lora_only": (
        "llama_bias",
        dict(r=2, lora_alpha=3, bias="lora_only", target_modules=["q_proj", "o_proj", "gate_proj"]),
        True,
    ),
    "bias_all_qwen2": (
        "qwen2",
        dict(r=2, bias="all", target_modules=["k_proj", "down_proj"]),
        False,
    ),
    "save_head_and_embed": (
        "llama2_mha",
        dict(r=4, modules_to_save=["lm_head", "embed_tokens"]),
        True,
    ),
    "save_all_norms_qwen3": ("qwen3", dict(r=2, modules_to_save=["norm"]), False),
    "rank_alpha_patterns": (
        "llama2_mha",
        dict(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 5},
            alpha_pattern={"v_proj": 3, r"layers\.1\.mlp\..*proj": 11},
        ),
        True,
    ),
    "layers_to_transform": (
        "qwen2",
        dict(r=3, target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1]),
        False,
    ),
    "regex_mistral": (
        "mistral_window",
        dict(r=3, target_modules=r".*\.layers\.0\.(self_attn\.(q|k)_proj|mlp\.gate_proj)"),
        False,
    ),
    "phi3_fused": (
        "phi3",
        dict(r=3, lora_alpha=5, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
        True,
    ),
    "dora_tied_all_linear": (
        "llama3_gqa_tied_rope",
        dict(r=3, target_modules="all-linear", use_dora=True),
        True,
    ),
    # Gemma: soft-capped, tied (Gemma 2); q/k norms, untied, per-layer-type RoPE (Gemma 3)
    "gemma2_all_linear": (
        "gemma2_softcap",
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        True,
    ),
    "gemma3_attention_mlp": (  # scale alpha/sqrt(r) = 1.4: with random A and B at 2.9 the
        # float32 model itself is 1e-4 from float64 (measured), too close to the tolerance
        "gemma3_text_untied",
        dict(
            r=2,
            lora_alpha=2,
            use_rslora=True,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
        False,
    ),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """``family -> (directory, jaxlora Model)`` of the random base, built once per module."""
    cache = {}

    def get(family: str):
        if family not in cache:
            directory = tmp_path_factory.mktemp(f"base_{family}")
            make_hf_model(family, directory)
            cache[family] = directory, jaxlora.load_model(directory)
        return cache[family]

    return get


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def _perturb(pm, seed: int = 0) -> None:
    """Make everything the adapter carries differ from its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * noise)
            elif "modules_to_save" in name or (name.endswith("bias") and p.requires_grad):
                p.add_(0.1 * noise)


def _file_shapes(directory) -> dict[str, tuple]:
    return {k: v.shape for k, v in read_file(directory / "adapter_model.safetensors").items()}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, bases, tmp_path_factory):
    family, kw, _ = CASES[request.param]
    base_dir, base = bases(family)
    pm = peft.get_peft_model(
        make_hf_model(family),
        peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw),
    )
    pm.eval()
    _perturb(pm)
    ids = random_ids(2, 9, seed=3)  # 18 tokens < 40 features: base and adapter run apart
    ids_long = random_ids(3, 16, seed=4)  # 48 tokens >= features: one stacked matmul
    peft_dir = tmp_path_factory.mktemp(f"peft_{request.param}")
    pm.save_pretrained(peft_dir)
    ours = base.load_adapter(peft_dir)
    ours_dir = ours.save_adapter(tmp_path_factory.mktemp(f"ours_{request.param}"))
    return types.SimpleNamespace(
        name=request.param,
        family=family,
        pm=pm,
        ids=ids,
        ref=torch_logits(pm, ids),
        ids_long=ids_long,
        ref_long=torch_logits(pm, ids_long),
        peft_dir=peft_dir,
        ours=ours,
        ours_dir=ours_dir,
        base_dir=base_dir,
        tmp=tmp_path_factory,
    )


def test_peft_adapter_imports_with_peft_logits(case):
    assert case.ours.lora is not None
    assert any(isinstance(v, LoRAWeight) for v in flatten_dict(case.ours.params, sep=".").values())
    got = np.asarray(case.ours(case.ids))
    chex.assert_trees_all_close(got, case.ref, atol=MODEL_TOL, rtol=0)
    got_long = np.asarray(case.ours(case.ids_long))
    chex.assert_trees_all_close(got_long, case.ref_long, atol=MODEL_TOL, rtol=0)


def test_exported_adapter_has_peft_keys_and_config_fields(case):
    assert _file_shapes(case.ours_dir) == _file_shapes(case.peft_dir)
    ours = json.loads((case.ours_dir / "adapter_config.json").read_text())
    theirs = json.loads((case.peft_dir / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)


def test_exported_adapter_loads_in_peft_with_peft_logits(case):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(make_hf_model(case.family), case.ours_dir)
    assert not [w for w in caught if "missing" in str(w.message) or "unexpected" in str(w.message)]
    loaded.eval()
    chex.assert_trees_all_close(torch_logits(loaded, case.ids), case.ref, atol=MODEL_TOL, rtol=0)
    # The load result itself: nothing unexpected, no adapter or modules_to_save tensor missing.
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    fresh = peft.get_peft_model(
        make_hf_model(case.family), peft.LoraConfig.from_pretrained(case.ours_dir)
    )
    result = set_peft_model_state_dict(
        fresh, load_file(case.ours_dir / "adapter_model.safetensors")
    )
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k] == []


@pytest.mark.parametrize("case", sorted(n for n, c in CASES.items() if c[2]), indirect=True)
def test_merged_export_equals_merge_and_unload(case):
    reference = torch_logits(copy.deepcopy(case.pm).merge_and_unload(), case.ids)
    directory = case.ours.save_merged(case.tmp.mktemp(f"merged_{case.name}"), dtype="float32")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    chex.assert_trees_all_close(torch_logits(hf.eval(), case.ids), reference, atol=MODEL_TOL)
    chex.assert_trees_all_close(reference, case.ref, atol=MODEL_TOL)


# ---- adapters trained by jaxlora ----------------------------------------------------------------


def test_jaxlora_adapter_loads_in_peft(bases, tmp_path):
    """inject -> 'train' every trainable leaf -> save_adapter -> PEFT: same logits."""
    _, base = bases("llama_bias")
    cfg = LoraConfig(
        r=3,
        alpha=5,
        init="random",
        use_dora=True,
        target_modules="all-linear",
        bias="all",
        modules_to_save=("lm_head",),
    )
    model = base.apply_lora(cfg, key=jax.random.key(1))
    frozen, trainable = partition(model.params, cfg)
    leaves, tree = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    model = model.replace(params=combine(frozen, jax.tree.unflatten(tree, leaves)))
    model.save_adapter(tmp_path)
    loaded = peft.PeftModel.from_pretrained(make_hf_model("llama_bias"), tmp_path).eval()
    ids = random_ids(2, 7, seed=5)
    ours = np.asarray(model(ids))
    assert np.abs(ours - np.asarray(base(ids))).max() > 1e-2  # the adapter does something
    chex.assert_trees_all_close(torch_logits(loaded, ids), ours, atol=MODEL_TOL, rtol=0)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True


def test_overlapping_patterns_keep_their_order(bases, tmp_path):
    """The first matching pattern wins. PEFT's save_pretrained sorts pattern keys, which can
    change the winner (its in-memory model and its saved adapter then differ); jaxlora reads the
    file's order, as PEFT's from_pretrained does, and writes patterns in their given order."""
    _, base = bases("llama2_mha")
    cfg = LoraConfig(
        r=4,
        alpha=8,
        init="random",
        target_modules="all-linear",
        alpha_pattern={"v_proj": 3, r"layers\.1\..*proj": 11},
    )
    model = base.apply_lora(cfg, key=jax.random.key(3))
    lw = flatten_dict(model.params, sep=".")["model.layers.1.self_attn.v_proj.weight"]
    assert lw.scale == 3 / 4  # "v_proj" comes first, though "layers..." sorts first
    model.save_adapter(tmp_path, base_model_name_or_path="some/base")  # train.py's call form
    assert json.loads((tmp_path / "adapter_config.json").read_text())["alpha_pattern"] == {
        "v_proj": 3,
        r"layers\.1\..*proj": 11,
    }
    assert list(json.loads((tmp_path / "adapter_config.json").read_text())["alpha_pattern"]) == [
        "v_proj",
        r"layers\.1\..*proj",
    ]
    loaded = peft.PeftModel.from_pretrained(make_hf_model("llama2_mha"), tmp_path).eval()
    assert loaded.peft_config["default"].base_model_name_or_path == "some/base"
    ids = random_ids(2, 7, seed=8)
    chex.assert_trees_all_close(torch_logits(loaded, ids), np.asarray(model(ids)), atol=MODEL_TOL)


# ---- PiSSA ----------------------------------------------------------------------------------------


def test_pissa_reproduces_peft_initialisation(bases, tmp_path):
    family = "llama2_mha"
    base_dir, base = bases(family)
    targets = ["q_proj", "down_proj"]
    pm = peft.get_peft_model(
        make_hf_model(family),
        peft.LoraConfig(
            r=3,
            lora_alpha=6,
            init_lora_weights="pissa",
            target_modules=targets,
            task_type="CAUSAL_LM",
        ),
    )
    ours = base.apply_lora(LoraConfig(r=3, alpha=6, init="pissa", target_modules=tuple(targets)))
    flat = flatten_dict(ours.params, sep=".")
    n = 0
    for name, module in pm.base_model.model.named_modules():
        if not isinstance(module, peft.tuners.lora.LoraLayer):
            continue
        lw = flat[f"{name}.weight"]
        get = lambda t: t.detach().numpy()
        a, b = get(module.lora_A["default"].weight), get(module.lora_B["default"].weight)
        # Singular vectors are defined up to sign: compare the products and the residuals.
        chex.assert_trees_all_close(np.asarray(lw.b @ lw.a), b @ a, atol=LAYER_TOL, rtol=0)
        chex.assert_trees_all_close(
            np.asarray(lw.base), get(module.base_layer.weight), atol=LAYER_TOL, rtol=0
        )
        assert lw.scale == module.scaling["default"]
        n += 1
    assert n == 4
    # PEFT saves init_lora_weights="pissa" and re-derives the residual from the ORIGINAL base
    # when it loads; jaxlora does the same in both directions.
    _perturb_lora(pm)
    ids = random_ids(2, 8, seed=6)
    ref = torch_logits(pm.eval(), ids)
    pm.save_pretrained(tmp_path / "peft")
    imported = base.load_adapter(tmp_path / "peft")
    chex.assert_trees_all_close(np.asarray(imported(ids)), ref, atol=MODEL_TOL, rtol=0)
    imported.save_adapter(tmp_path / "ours")
    assert (
        json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"]
        == "pissa"
    )
    loaded = peft.PeftModel.from_pretrained(make_hf_model(family), tmp_path / "ours").eval()
    chex.assert_trees_all_close(torch_logits(loaded, ids), ref, atol=MODEL_TOL, rtol=0)


def _perturb_lora(pm) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


# ---- what is refused ------------------------------------------------------------------------------


def test_unsupported_adapters_are_refused_clearly(bases, tmp_path):
    _, base = bases("llama2_mha")
    # LoRA on the embedding layer.
    pm = peft.get_peft_model(
        make_hf_model("llama2_mha"),
        peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM"),
    )
    pm.save_pretrained(tmp_path / "embed")
    with pytest.raises(UnsupportedAdapterError, match="embedding LoRA is not supported"):
        base.load_adapter(tmp_path / "embed")
    # A module that does not exist in this model (adapter for another architecture).
    pm = peft.get_peft_model(make_hf_model("llama2_mha"), peft.LoraConfig(task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn"]
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedAdapterError, match="matches no module"):
        base.load_adapter(tmp_path / "other")
    # Tied embeddings trained as a separate copy (PEFT's modules_to_save on a tied model).
    _, tied = bases("llama3_gqa_tied_rope")
    pm = peft.get_peft_model(
        make_hf_model("llama3_gqa_tied_rope"),
        peft.LoraConfig(modules_to_save=["embed_tokens"], task_type="CAUSAL_LM"),
    )
    pm.save_pretrained(tmp_path / "tied")
    with pytest.raises(UnsupportedAdapterError, match="tied"):
        tied.load_adapter(tmp_path / "tied")
    # Pickled weights only.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(UnsupportedAdapterError, match="pickled"):
        base.load_adapter(tmp_path / "bin")
    # Valid JSON that is not an object.
    (tmp_path / "bin" / "adapter_config.json").write_text("[1]")
    with pytest.raises(UnsupportedAdapterError, match="adapter_config.json: a JSON list, not an"):
        base.load_adapter(tmp_path / "bin")
    # A different PEFT method.
    peft.get_peft_model(
        make_hf_model("llama2_mha"), peft.IA3Config(task_type="CAUSAL_LM")
    ).save_pretrained(tmp_path / "ia3")
    with pytest.raises(UnsupportedAdapterError, match="peft_type='IA3'"):
        base.load_adapter(tmp_path / "ia3")


@pytest.mark.parametrize("case", ["plain_llama"], indirect=True)
def test_load_model_with_adapter_argument(case):
    model = jaxlora.load_model(case.base_dir, adapter=case.peft_dir)
    chex.assert_trees_all_close(np.asarray(model(case.ids)), case.ref, atol=MODEL_TOL, rtol=0)
    assert jnp.asarray(model(case.ids)).dtype == jnp.float32
