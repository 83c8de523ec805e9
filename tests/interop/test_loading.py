"""Checkpoint loading: hub ids through the real hub code path (offline cache), sharded files,
pickled-weight refusal, corrupt and mismatched checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import jaxlora
from jaxlora.interop.hf import fingerprint
from jaxlora.interop.safetensors import CheckpointError
from tests.hf_models import make_hf_model, random_ids


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2")
    return directory, make_hf_model("qwen2", directory, seed=7)


def _logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.as_tensor(ids)).logits.numpy()


def test_hub_id_loads_through_snapshot_download(ckpt, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub (here from an offline cache laid out as the hub's)."""
    directory, hf_model = ckpt
    repo = tmp_path / "hub" / "models--jaxlora-tests--tiny-qwen2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(directory, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = jaxlora.load_model("jaxlora-tests/tiny-qwen2")
    ids = random_ids(2, 6)
    np.testing.assert_allclose(model(ids), _logits(hf_model, ids), atol=1e-4, rtol=0)


def test_sharded_checkpoint_with_index_loads(ckpt, tmp_path):
    directory, hf_model = ckpt
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = jaxlora.load_model(tmp_path)
    ids = random_ids(2, 6)
    np.testing.assert_allclose(model(ids), _logits(hf_model, ids), atol=1e-4, rtol=0)


def test_saving_again_removes_the_previous_saves_weights(ckpt, tmp_path):
    """A sharded float32 save, then a single-file bfloat16 one into the same folder: the old
    index and shards go (loaders would read them first), and the reverse leaves no stale
    model.safetensors; files that are not weights stay."""
    from jaxlora.interop.hf import save_pretrained
    from jaxlora.interop.safetensors import checkpoint_files, read_file

    directory, _ = ckpt
    model = jaxlora.load_model(directory)
    (tmp_path / "notes.txt").write_text("mine")
    save_pretrained(model.params, model.config, tmp_path, max_shard_bytes=20_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    save_pretrained(model.params, model.config, tmp_path, dtype="bfloat16")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "notes.txt",
    ]
    (single,) = checkpoint_files(tmp_path)  # what a loader reads: the new file only
    assert {str(a.dtype) for a in read_file(single).values()} == {"bfloat16"}
    save_pretrained(model.params, model.config, tmp_path, max_shard_bytes=20_000)
    assert not (tmp_path / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.glob("model-*.safetensors")) == shards


def test_pickled_checkpoint_is_refused(ckpt, tmp_path):
    directory, hf_model = ckpt
    shutil.copy(directory / "config.json", tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled"):
        jaxlora.load_model(tmp_path)


def test_truncated_file_is_a_clear_error(ckpt, tmp_path):
    directory, _ = ckpt
    shutil.copytree(directory, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        jaxlora.load_model(tmp_path / "m")


def test_shape_mismatch_names_the_tensor(ckpt, tmp_path):
    directory, _ = ckpt
    shutil.copytree(directory, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 36
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        jaxlora.load_model(tmp_path / "m")


def test_missing_tensor_is_named(ckpt, tmp_path):
    directory, hf_model = ckpt
    sd = {k: v for k, v in hf_model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    from safetensors.torch import save_file

    (tmp_path / "m").mkdir()
    shutil.copy(directory / "config.json", tmp_path / "m")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.mlp\.up_proj\.weight"):
        jaxlora.load_model(tmp_path / "m")


def test_nonexistent_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        jaxlora.load_model(str(tmp_path / "nope"))


def test_fingerprint_tells_checkpoints_apart(ckpt, tmp_path):
    directory, _ = ckpt
    make_hf_model("qwen2", tmp_path, seed=8)
    assert fingerprint(directory) == fingerprint(directory)
    assert fingerprint(directory) != fingerprint(tmp_path)
