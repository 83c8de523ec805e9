"""The training benchmark harness (tools/bench_train.py): its pieces, one end-to-end run per mode
on a very small config, and its refusals (degenerate tokens, sides that start apart)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tools import bench_common as bc

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--shape",
    "tiny",
    "--batch",
    "1",
    "--seq",
    "32",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--rank",
    "3",
]


def bench(*args: str, cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "bench_train.py"), *args, "--cache-dir", str(cache)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_cache")


def test_cost_model_matches_reference():
    # REFERENCE.md: Llama-3-8B at S=2048 ≈ 31.9 GFLOP/token for LoRA (r=16, all linears)
    shape = bc.SHAPES["llama-8b"]
    assert bc.matmul_params(shape) == 7_504_658_432  # 8.03B minus the embedding table
    assert bc.flops_per_token(shape, 2048, 16, remat=False) == pytest.approx(31.9e9, rel=2e-3)
    extra = bc.flops_per_token(shape, 2048, 16, True) - bc.flops_per_token(shape, 2048, 16, False)
    assert extra == 2 * bc.matmul_params(shape)
    assert bc.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989e12
    assert bc.peak_flops("NVIDIA H100 PCIe", "bfloat16")[0] == 756e12
    assert bc.peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16")[0] == 312e12
    assert bc.peak_flops("NVIDIA H100 80GB HBM3", "float32")[0] is None
    assert bc.peak_flops("cpu", "float32")[0] is None


def test_packed_batches_layout():
    (b,) = bc.packed_batches(1, 3, 23, 50, seed=1, min_doc=2)
    assert {k: v.shape for k, v in b.items()} == dict.fromkeys(b, (3, 23))
    for row in range(3):
        seg, pos = b["segment_ids"][row], b["positions"][row]
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and seg.min() > 0  # no padding
        assert seg.max() > 1  # several documents per row
        starts = np.flatnonzero(np.diff(seg)) + 1
        assert np.all(pos[starts] == 0) and pos[0] == 0
        inside = np.diff(seg) == 0  # a target is the next input inside a document
        assert np.array_equal(b["targets"][row][:-1][inside], b["input_ids"][row][1:][inside])
    assert b["loss_mask"].min() == 1.0
    again = bc.packed_batches(1, 3, 23, 50, seed=1, min_doc=2)[0]
    assert all(np.array_equal(b[k], again[k]) for k in b)


def test_degenerate_tokens_are_refused():
    with pytest.raises(bc.DegenerateTokensError, match="every token id is 0"):
        bc.check_tokens(np.zeros(100, np.int32), 50, "x")
    with pytest.raises(bc.DegenerateTokensError, match="every token id is 7"):
        bc.packed_batches(1, 2, 16, 50, stream=np.full(40, 7))
    with pytest.raises(bc.DegenerateTokensError, match=r"span \[0, 50\], vocab is 50"):
        bc.check_tokens(np.arange(51), 50, "x")
    bc.check_tokens(np.array([0, 3, 0, 1]), 50, "x")  # zeros among other ids are fine


def test_all_zero_token_file_is_refused_before_anything_runs(tmp_path):
    zeros = tmp_path / "zeros.npy"
    np.save(zeros, np.zeros(4096, np.int64))
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = bench(*SMALL, "--tokens", str(zeros), cache=cache)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to time a degenerate all-0 input" in proc.stderr
    assert not any(cache.iterdir())  # refused before building anything


@pytest.mark.slow
@pytest.mark.parametrize("mode, rounds", [("lora", 2), ("qlora", 1)])
def test_end_to_end_small_run(tmp_path, cache, mode, rounds):
    out = tmp_path / "r.json"
    proc = bench(*SMALL, "--mode", mode, "--rounds", str(rounds), "--out", str(out), cache=cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    ref = "PEFT+bnb" if mode == "qlora" else "PEFT"
    assert set(r["sides"]) == {"jaxlora", ref}
    assert r["probe"]["ok"] and r["probe"]["max_abs_diff"] < 1e-4
    assert r["probe"]["max_abs_logit"] > 1e-2  # the probe compared something
    for side in r["sides"].values():
        assert len(side["rounds"]) == rounds
        assert all(len(x["step_times"]) == 2 for x in side["rounds"])
        assert side["tokens_per_s"]["median"] > 0 and side["first_step_s"] > 0
        assert side["peak_memory"] > 0
    assert r["ratio"]["tokens_per_s"] > 0
    # same start, same first batch: the first losses agree (float32)
    first = r["first_step_loss"]
    assert first["jaxlora"] == pytest.approx(first["peft"], rel=1e-5)
    assert "| tokens/s, median (min–max over rounds) |" in proc.stdout
    assert f"jaxlora / {ref}" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("side", ["peft", "jaxlora"])
def test_sides_that_start_apart_are_refused(cache, side):
    proc = bench(*SMALL, "--rounds", "1", "--perturb", side, cache=cache)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "do not start from the same logits" in proc.stderr
    assert "round 1/1" not in proc.stdout  # nothing was timed
