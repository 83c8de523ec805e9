"""The model card's front matter from a run's config, the upload folder of a single-file export,
and the upload's refusal without a token. The card of a real run and the upload through
``python -m jaxlora.export ... push_to_hub=`` are tested in tests/test_train_cli.py."""

from __future__ import annotations

import re

import huggingface_hub
import pytest
import yaml

from jaxlora.config import load_config
from jaxlora.interop import hub


def _front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def test_front_matter_names_hub_base_and_dataset_and_the_loading_library(tmp_path):
    cfg = load_config("demo", ["model.path=org/base-model", "data.path=org/instructions"])
    for fmt, library in [("peft", "peft"), ("merged", "transformers"), ("bnb4", "transformers")]:
        meta = _front_matter(hub.model_card(cfg, fmt, 3, tmp_path, "me/tuned"))
        assert meta["base_model"] == "org/base-model" and meta["datasets"] == ["org/instructions"]
        assert meta["library_name"] == library and meta["pipeline_tag"] == "text-generation"
        assert {"jaxlora", "lora", "qlora"} <= set(meta["tags"])  # demo trains on an NF4 base
        assert "license" not in meta  # the base's card is not on this machine: unknown
    meta = _front_matter(hub.model_card(cfg, "gguf", 3, tmp_path, "me/tuned"))
    assert "library_name" not in meta and "gguf" in meta["tags"]
    with pytest.raises(ValueError, match="format='onnx'.*'peft'"):
        hub.model_card(cfg, "onnx", 3, tmp_path, "me/tuned")


def test_local_base_and_data_stay_out_of_the_metadata_but_the_license_is_read(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# base\n")
    (tmp_path / "train.jsonl").write_text("")
    cfg = load_config("demo", [f"model.path={base}", f"data.path={tmp_path / 'train.jsonl'}"])
    meta = _front_matter(hub.model_card(cfg, "peft", 3, tmp_path, "me/tuned"))
    assert meta["license"] == "apache-2.0"
    assert "base_model" not in meta and "datasets" not in meta  # not Hub ids
    # license: other comes with its name and link (as Qwen's and Llama's cards have them)
    other = "license: other\nlicense_name: qwen-research\nlicense_link: https://x/LICENSE\n"
    (base / "README.md").write_text(f"---\n{other}---\n# base\n")
    meta = _front_matter(hub.model_card(cfg, "peft", 3, tmp_path, "me/tuned"))
    assert (meta["license"], meta["license_name"]) == ("other", "qwen-research")
    assert meta["license_link"] == "https://x/LICENSE"
    # malformed or non-mapping metadata: license unknown, the card is still written
    for bad in ("license: [apache\n", "- a list\n"):
        (base / "README.md").write_text(f"---\n{bad}---\n# base\n")
        assert "license" not in _front_matter(hub.model_card(cfg, "peft", 3, tmp_path, "me/t"))


def test_a_single_file_export_is_uploaded_from_a_folder_beside_it(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(7)))
    folder = hub.upload_folder(gguf, "---\n{}\n---\ncard\n")
    assert folder == tmp_path / "model.gguf.hub"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.gguf"]
    assert (folder / "model.gguf").stat().st_ino == gguf.stat().st_ino  # a link, not a copy
    assert hub.upload_folder(gguf, "again") == folder  # a second push rebuilds it
    with pytest.raises(FileNotFoundError, match="no export"):
        hub.upload_folder(tmp_path / "missing", "card")


def test_a_gguf_upload_holds_its_modelfile_and_lora_and_the_card_says_how_to_run_it(tmp_path):
    """With ``gguf.lora=true`` the export is the base, ``<stem>-lora.gguf`` and a Modelfile
    naming both: all three go up, and the card runs them in llama.cpp and Ollama. A Modelfile
    that is another export's stays out; one naming a missing adapter is an error."""
    cfg = load_config("demo", [])
    base, lora = tmp_path / "m.gguf", tmp_path / "m-lora.gguf"
    base.write_bytes(b"GGUF base")
    lora.write_bytes(b"GGUF lora")
    (tmp_path / "Modelfile").write_text("FROM ./m.gguf\nADAPTER ./m-lora.gguf\n")
    card = hub.model_card(cfg, "gguf", 3, tmp_path, "me/tuned", export=base)
    folder = hub.upload_folder(base, card)
    assert sorted(p.name for p in folder.iterdir()) == [
        "Modelfile",
        "README.md",
        "m-lora.gguf",
        "m.gguf",
    ]
    assert (folder / "m-lora.gguf").stat().st_ino == lora.stat().st_ino
    assert (
        "`hf download me/tuned --local-dir m`, then `llama-cli -m m/m.gguf --lora m/m-lora.gguf`"
        in card
    )
    assert (
        "`hf download me/tuned --local-dir m && ollama create m -f m/Modelfile && ollama run m`"
        in card
    )

    (tmp_path / "Modelfile").write_text("FROM ./other.gguf\n")  # another export's
    card = hub.model_card(cfg, "gguf", 3, tmp_path, "me/tuned", export=base)
    assert sorted(p.name for p in hub.upload_folder(base, card).iterdir()) == [
        "README.md",
        "m.gguf",
    ]  # the first push's Modelfile and LoRA are gone from the rebuilt folder
    assert "`llama-cli --hf-repo me/tuned --hf-file m.gguf`" in card
    assert "`ollama run hf.co/me/tuned`" in card

    (tmp_path / "Modelfile").write_text("FROM ./m.gguf\nADAPTER ./m-lora.gguf\n")
    lora.unlink()
    with pytest.raises(
        FileNotFoundError, match="names the adapter .*m-lora.gguf, which is missing"
    ):
        hub.upload_folder(base, "card")


def test_without_a_token_huggingface_hubs_refusal_says_how_to_retry(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    with pytest.raises(hub.HubError) as e:
        hub.push(tmp_path, "me/tuned")
    assert "LocalTokenNotFoundError" in str(e.value) and "hf auth login" in str(e.value)
    assert f"hf upload me/tuned {tmp_path}" in str(e.value)


@pytest.mark.parametrize(
    "ranks, expected", [("lora.r=8", 8), ("lora.r=17", 32), ("lora.r=300", 320)]
)
def test_vllm_max_lora_rank_is_the_smallest_choice_holding_the_rank(ranks, expected, tmp_path):
    assert hub.vllm_max_lora_rank(load_config("demo", [ranks])) == expected
    assert hub.vllm_max_lora_rank(load_config("demo", ["lora.r=513"])) is None
    big = load_config("demo", ["lora.r=8", "lora.rank_pattern.q_proj=513"])
    card = hub.model_card(big, "peft", 1, tmp_path, "me/big")
    assert "--enable-lora" not in card and "serve the merged model instead" in card


def test_the_card_labels_the_reports_step_and_names_what_vllm_refuses(tmp_path):
    """report.json holds the run's last step: exporting an earlier one labels its column with
    that step. An adapter vLLM's PEFTHelper refuses gets the merged model's advice, not a
    serve command that fails."""
    import json

    (tmp_path / "report.json").write_text(
        json.dumps({"before": {"eval_loss": 2.0}, "after": {"eval_loss": 0.5}})
    )
    rows = [{"step": 100, "eval_loss": 1.7}, {"step": 1000, "eval_loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("demo", [])
    card = hub.model_card(cfg, "peft", 100, tmp_path, "me/tuned")
    assert "| measure | before training | after step 1000 (not this one) |" in card
    assert "| eval loss | 2.0000 | 0.5000 |" in card and "Eval loss at step 100: 1.7000." in card
    card = hub.model_card(cfg, "peft", 1000, tmp_path, "me/tuned")
    assert "| measure | before training | after training |" in card
    assert "--enable-lora" in card
    for override, named in [
        ("lora.use_dora=true", "DoRA"),
        ("lora.modules_to_save=[lm_head]", "modules_to_save"),
        ("lora.bias=all", "bias='all'"),
        ("lora.init=pissa", "init='pissa' (a changed base)"),
    ]:
        card = hub.model_card(load_config("demo", [override]), "peft", 3, tmp_path, "me/tuned")
        assert f"vLLM cannot serve this adapter ({named}): serve the merged model." in card, card
        assert "--enable-lora" not in card
