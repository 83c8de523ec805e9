"""Sharded train steps equal the single-device run (8 fake CPU devices, each run in its own
process), and two processes × 4 devices equal one process × 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.multidevice, pytest.mark.slow, pytest.mark.xdist_group("multidevice")]

SCRIPT = Path(__file__).parent / "multidevice" / "mesh_run.py"


def _run(tmp_path, mesh, quant, devices=8, env=None, name=None):
    out = tmp_path / f"{name or mesh.replace(',', '_')}_{quant}.json"
    cmd = [sys.executable, str(SCRIPT), "--mesh", mesh, "--quant", quant,
           "--devices", str(devices), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_same(a, b):
    """Losses within 1e-5 relative; every adapter array within 1e-5 of its largest entry
    (sharded reductions add in another order, so exact equality is not expected)."""
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    assert a["adapters"].keys() == b["adapters"].keys()
    for k in a["adapters"]:
        x, y = np.asarray(a["adapters"][k]), np.asarray(b["adapters"][k])
        assert np.max(np.abs(x - y)) <= 1e-5 * np.max(np.abs(y)), k


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    return {q: _run(d, "1,1,1", q, devices=1) for q in ("none", "nf4")}


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("mesh", ["1,8,1", "1,4,2", "2,2,2"])
def test_mesh_equals_single_device(single, tmp_path, mesh, quant):
    res = _run(tmp_path, mesh, quant)
    assert res["devices"] == 8
    # the weights really are split: some spec names fsdp (and tensor when the mesh has it)
    assert any("fsdp" in s for s in res["specs"])
    if mesh.endswith(",2"):
        assert any("tensor" in s for s in res["specs"])
    _assert_same(res, single[quant])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    one = _run(tmp_path, "1,8,1", "nf4", name="one")
    port = _free_port()
    outs = [tmp_path / f"two_{i}.json" for i in range(2)]
    procs = []
    for i in range(2):
        env = {**os.environ, "JAXLORA_COORDINATOR": f"127.0.0.1:{port}",
               "JAXLORA_NUM_PROCESSES": "2", "JAXLORA_PROCESS_ID": str(i)}  # fmt: skip
        cmd = [sys.executable, str(SCRIPT), "--mesh", "1,8,1", "--quant", "nf4",
               "--devices", "4", "--out", str(outs[i])]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    two = json.loads(outs[0].read_text())
    assert (two["processes"], two["devices"]) == (2, 8)
    assert not outs[1].exists()  # results are written once, by process 0
    _assert_same(two, one)


def _train_cmd(assets, out, *extra):
    return [sys.executable, "-m", "jaxlora.train",
            f"model.path={assets['model']}", f"data.path={assets['train']}", "data.val_size=0",
            f"data.eval_path={assets['eval']}", "data.max_seq_len=192", "train.batch_size=8",
            "train.max_steps=6", "train.log_every=1", "train.eval_every=3", "train.save_every=3",
            "train.sample_every=3", "train.sample_prompts=['What is 2 plus 3?']",
            "train.lr=1e-3", f"output_dir={out}", *extra]  # fmt: skip


def test_train_cli_two_processes_equal_one(tmp_path):
    """The real entry point on 2 hosts x 4 devices: same losses and adapter as 1 host x 8;
    metrics, config and adapter written once (by process 0)."""
    from jaxlora.safetensors_io import SafetensorsFile
    from tests.hf_models import make_run_assets

    assets = make_run_assets(tmp_path / "assets")
    root = Path(__file__).parents[1]
    env8 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            "JAX_PLATFORMS": "cpu"}  # fmt: skip
    one = subprocess.run(_train_cmd(assets, tmp_path / "one"), env=env8, cwd=root,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_PLATFORMS": "cpu", "JAXLORA_COORDINATOR": f"127.0.0.1:{port}",
               "JAXLORA_NUM_PROCESSES": "2", "JAXLORA_PROCESS_ID": str(i)}  # fmt: skip
        procs.append(subprocess.Popen(_train_cmd(assets, tmp_path / "two"), env=env, cwd=root,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m2] == list(range(1, 7))  # logged once, not once per process
    np.testing.assert_allclose([r["loss"] for r in m2], [r["loss"] for r in m1], rtol=1e-5)
    a = SafetensorsFile(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = SafetensorsFile(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():  # relative error of each whole array (hosts reduce in another order)
        x, y = np.asarray(a.get(k)), np.asarray(b.get(k))
        assert np.linalg.norm(x - y) <= 1e-5 * np.linalg.norm(x), k
