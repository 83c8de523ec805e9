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
