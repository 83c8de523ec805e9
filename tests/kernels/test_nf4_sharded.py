"""The NF4 matmul under shard_map (jaxlora.kernels.nf4_sharded): the plan each weight layout
gets, its refusals, and (8 fake CPU devices, one process per kernel) output and dx equal to
the unsharded reference for fsdp=8, data2×fsdp2×tensor2 and fsdp4×tensor2 meshes, with a
float32 and a double-quantized absmax."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxlora.kernels import nf4_sharded

SCRIPT = Path(__file__).parent / "nf4_sharded_run.py"
MESH = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
ROWS = ("data", "fsdp")
CODE = tuple(float(i) / 15 for i in range(16))


def _plan(x_spec, w_spec, m=8, n=16, k=256, mesh=MESH):
    return nf4_sharded.plan(
        mesh, x_spec, w_spec, ((m, k), (n, k)), code=CODE, blocksize=64, kernel="triton"
    )


def test_column_parallel_gathers_k_over_fsdp_and_keeps_n_on_tensor():
    # q/k/v/gate/up: W [heads|mlp -> tensor, embed -> fsdp], x rows over (data, fsdp)
    p = _plan(P(ROWS, None), P("tensor", "fsdp"))
    assert (p.gather_n, p.gather_k, p.keep_n, p.keep_k) == ((), ("fsdp",), ("tensor",), ())
    assert p.out_spec == P(ROWS, "tensor")


def test_row_parallel_gathers_n_over_fsdp_and_sums_k_over_tensor():
    # o/down: W [embed -> fsdp, heads|mlp -> tensor], x [rows, K over tensor]
    p = _plan(P(ROWS, "tensor"), P("fsdp", "tensor"))
    assert (p.gather_n, p.gather_k, p.keep_n, p.keep_k) == (("fsdp",), (), (), ("tensor",))
    assert p.out_spec == P(ROWS, None)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="leading part"):  # x's K split W does not share
        _plan(P(ROWS, "tensor"), P("fsdp", None))
    with pytest.raises(ValueError, match="absmax blocks"):  # 3 blocks over fsdp=2
        _plan(P(ROWS, None), P("tensor", "fsdp"), k=192)
    with pytest.raises(ValueError, match="rows of x"):
        _plan(P(ROWS, None), P("tensor", "fsdp"), m=6)
    with pytest.raises(ValueError, match="no axis 'model'"):
        _plan(P(ROWS, None), P("model", "fsdp"))
    with pytest.raises(ValueError, match="kernel must be one of"):
        nf4_sharded.plan(MESH, P(), P(), ((8, 64), (8, 64)), code=CODE, blocksize=64, kernel="cuda")


@pytest.mark.multidevice
@pytest.mark.slow
@pytest.mark.xdist_group("nf4_sharded")
@pytest.mark.parametrize("kernel", ["mosaic", "triton", "dequant"])
def test_sharded_matmul_equals_unsharded_reference(tmp_path, kernel):
    out = tmp_path / f"{kernel}.json"
    cmd = [sys.executable, str(SCRIPT), "--kernel", kernel, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["devices"] == 8
    assert len(res["results"]) == 12
    for case, r in res["results"].items():
        # float32, interpret mode: sharded sums add in another order, nothing else differs
        # (a double-quantized absmax is dequantized on each device with the same arithmetic)
        assert r["y_err"] <= 1e-5 and r["dx_err"] <= 1e-5, (case, r)
        # FSDP moves 4-bit codes (u8) and their absmax: float32, or double-quantized as its
        # 8-bit codes (u8), nothing else
        want = {"u8", "f32"} if case.endswith("/f32") else {"u8"}
        assert set(r["gather_dtypes"]) == want, (case, r)
        if kernel == "mosaic":  # operands staged once (a tiled MLP's), the same products
            errs = [r[f"staged_{v}_err"] for v in ("y", "y2", "dx")]
            assert max(errs) <= 1e-5 and r["staged_specs"] == [r["y_spec"], r["dx_spec"]], r
        if case.startswith(("data2_fsdp2_tensor2", "fsdp4_tensor2")):
            spec = r["y_spec"] if "/column/" in case else r["dx_spec"]
            assert "tensor" in spec, (case, r)  # column: y split on N; row: dx split on K
