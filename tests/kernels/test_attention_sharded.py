"""Flash attention kernels under shard_map (jaxlora.kernels.attention_sharded): the layout each
mesh and head count gets, its refusals, the choice ``kernels_for`` makes on a mesh, and (8 fake
CPU devices, own process) output and gradients equal to unsharded eager attention."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxlora.kernels.attention_sharded import AttentionMesh, layout
from jaxlora.weights.dispatch import kernels_for

SCRIPT = Path(__file__).parent / "attention_sharded_run.py"
ROWS = ("data", "fsdp")
MIXED = AttentionMesh(AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor")), ROWS, "tensor")


def test_kv_heads_split_when_they_divide_else_query_groups_with_kv_replicated():
    kv = layout(MIXED, batch=4, kv_heads=8, groups=4)
    assert (kv.q, kv.kv, kv.segments, kv.heads) == (
        P(ROWS, "tensor"),
        P(ROWS, "tensor"),
        P(ROWS),
        "kv",
    )
    mqa = layout(MIXED, batch=4, kv_heads=1, groups=8)
    assert (mqa.q, mqa.kv, mqa.heads) == (P(ROWS, None, "tensor"), P(ROWS), "groups")


def test_rows_that_do_not_divide_go_to_every_device():
    assert layout(MIXED, batch=3, kv_heads=2, groups=1).q == P(None, "tensor")


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match=r"3 kv heads × 3 query heads .* 'tensor' \(size 2\)"):
        layout(MIXED, batch=4, kv_heads=3, groups=3)
    with pytest.raises(ValueError, match="no axis 'model'"):
        AttentionMesh(MIXED.mesh, ROWS, "model")
    with pytest.raises(ValueError, match="both the batch and the heads"):
        AttentionMesh(MIXED.mesh, ROWS, "fsdp")


class _Tpu:
    platform = "tpu"


def test_kernels_for_a_mesh_keeps_the_kernel_where_the_heads_split():
    eight = [_Tpu()] * 8
    on_mesh = kernels_for(eight, seq_len=2048, mesh=MIXED, heads=(8, 4))
    assert (on_mesh.attention, on_mesh.attention_mesh) == ("splash", MIXED)
    # no layout keeps whole heads on each device: chunked (logged with the reason)
    odd = kernels_for(eight, seq_len=2048, mesh=MIXED, heads=(3, 3))
    assert (odd.attention, odd.attention_mesh) == ("chunked", None)
    # several devices and no mesh roles given (Model on jax.devices()): chunked
    assert kernels_for(eight, seq_len=2048).attention == "chunked"
    assert kernels_for([_Tpu()], seq_len=2048, mesh=MIXED, heads=(8, 4)).attention_mesh is None


@pytest.mark.multidevice
@pytest.mark.slow
@pytest.mark.xdist_group("attention_sharded")
def test_sharded_kernels_equal_eager_attention(tmp_path):
    out = tmp_path / "attention.json"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["devices"] == 8
    assert len(res["results"]) == 6
    assert {r["heads"] for r in res["results"]} == {"whole", "kv", "groups"}
    for r in res["results"]:
        # float32, interpret mode: the per-device kernel is the one-device kernel on fewer rows
        # and heads, so only the kernel's own reduction order separates it from eager (as in
        # tests/models/test_flash_attention.py)
        assert r["out_err"] <= 1e-5 and r["grad_err"] <= 1e-5, r
        assert r["padding_max"] == 0.0, r
        # rows over (data, fsdp), heads over tensor where they split: each device its own
        assert "('data', 'fsdp')" in r["out_spec"] or "fsdp" in r["out_spec"], r
        assert ("tensor" in r["out_spec"]) == (r["heads"] != "whole"), r
