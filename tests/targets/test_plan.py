"""The real train step (NF4 base + LoRA on every linear, packed [accum, batch, seq] batch,
remat, AdamW), built by the run builder ``python -m jaxlora.train`` uses, compiled for a TPU
topology and for 8 H100s from this CPU machine: it compiles, the Pallas NF4 kernel and flash
attention are in the compiled program (on 8 devices, inside shard_map, with no all-gather of
activations for attention), FSDP moves 4-bit codes, and each of 8 devices computes 1/8 of the
work; the FLOPs of a step that scans its layers are those of the unrolled step, loop bodies
counted once per iteration.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
from transformers import LlamaConfig

from jaxlora.targets import hlo
from tests.targets import _toolchain

pytestmark = [pytest.mark.aot, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "plan_run.py"
KERNEL_CALL = {"tpu": hlo.MOSAIC_CALL, "gpu": hlo.TRITON_CALL}
ATTENTION_KERNELS = {  # forward and backward kernels, by name (hlo.pallas_kernels)
    "tpu": {
        "splash_mha_fwd_segmented_residuals",
        "splash_mha_dq_segmented_no_residuals",
        "splash_mha_dkv_segmented_no_residuals",
    },
    "gpu": {"flash_fwd", "flash_dq", "flash_dkv"},
}
MISSING = _toolchain.missing()
VOCAB, HIDDEN, KV_WIDTH, RANK = 256, 1024, 512, 8  # the model below, plan_run.py's lora.r


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """config.json only: planning needs no weights. Widths hold a multiple of 8 NF4 blocks of
    64, so FSDP over 8 devices splits ``in`` on whole blocks (else the weight stays whole), and
    every per-device ``in`` is a multiple of 512, the TPU kernel's K tile (a smaller one is
    padded up to it, which the FLOPs count would show as extra work)."""
    d = tmp_path_factory.mktemp("plan_model")
    LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=512,
    ).save_pretrained(d)
    return d


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(
            p,
            marks=[
                pytest.mark.skipif(p in MISSING, reason=MISSING.get(p, "")),
                pytest.mark.xdist_group(f"plan_{p}"),
            ],
        )
        for p in ("tpu", "gpu")
    ],
)
def plans(request, tmp_path_factory, model_dir):
    """``(platform, [one device, the meshes])``: the compiles of plan_run.py (TPU: one device,
    data2×fsdp2×tensor2, fsdp=8 scanned; GPU: the same), made once per
    platform and test session (about a minute of one core each on the 2-core CI machine). Each platform's
    tests are an xdist group of their own (``plan_tpu``, ``plan_gpu``): one worker compiles a
    platform and runs its tests in turn, while the other goes on with other work (in one CI run
    the second TPU test waited 144 s on another worker for the compile), and xdist starts the
    two groups early, with the other groups, rather than where tests/targets/ falls in the
    collection (two thirds of the way through). Should a worker still meet a compile made
    elsewhere (groups ignored, as pytest 9.2 + pytest-xdist 3.8.0 did: pytest-dev/pytest-xdist
    #1386), the workers share it through the session's common temporary directory: the first
    to ask compiles, the others wait on a lock."""
    platform = request.param
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / f"jaxlora_plan_{platform}.json"
    with open(shared / f"jaxlora_plan_{platform}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not out.exists():
            tmp = out.with_suffix(".partial")
            _toolchain.run_script(
                SCRIPT, "--platform", platform, "--model", str(model_dir), "--out", str(tmp)
            )
            tmp.replace(out)
    return platform, json.loads(out.read_text())


def _runs(plans):
    """``(platform, one device, [the meshes' runs], scanned fsdp=8)``."""
    platform, runs = plans
    one, *meshes = [r for r in runs if r["quant"] == "nf4"]
    (scanned,) = [r for r in meshes if r["scan_layers"]]
    return platform, one, meshes, scanned


def test_real_step_compiles_sharded_with_the_kernel(plans):
    platform, one, meshes, scanned = _runs(plans)
    assert one["devices"] == 1 and not one["scan_layers"]
    assert [r["devices"] for r in meshes] == [8] * len(meshes)
    assert scanned["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    meshes_compiled = [r["mesh"] for r in meshes if not r["scan_layers"]]
    assert meshes_compiled == [{"data": 2, "fsdp": 2, "tensor": 2}]
    for run in (one, *meshes):
        assert run["kernels"]["matmul"] == {"tpu": "mosaic", "gpu": "triton"}[platform]
        assert KERNEL_CALL[platform] in run["custom_calls"], run["custom_calls"]
        # flash attention, on one device and on each device's rows and heads of a mesh
        # (shard_map): splash on TPU, Pallas flash for packed rows on GPU, forward and backward
        assert run["kernels"]["attention"] == {"tpu": "splash", "gpu": "pallas_gpu"}[platform]
        assert ATTENTION_KERNELS[platform] <= set(run["pallas_kernels"]), run["pallas_kernels"]
    # FSDP over 8 devices holds 1/8 of every LoRA factor and of its Adam moments on each (the
    # `b` of q/k/v/gate/up too, whose `out` the default rules give the unused tensor axis);
    # only the optimizer's step counts (scalars) are whole on every device
    u, s = one["per_device"], scanned["per_device"]
    assert 8 * s["trainable_bytes"] == u["trainable_bytes"], (s, u)
    scalars = u["optimizer_bytes"] - 2 * u["trainable_bytes"]
    assert 8 * (s["optimizer_bytes"] - scalars) == u["optimizer_bytes"] - scalars, (s, u)
    for run in meshes:
        # the kernel runs where the activations already are: no all-gather made for attention
        assert run["attention_gathers"] == [], run["attention_gathers"]
        # FSDP gathers the 4-bit codes and the 8-bit codes of their absmax; the only other
        # gathers are small float leaves (XLA may gather them after their cast to bf16, the
        # TPU's matmul input at the default precision), never a 16-bit copy of a 4-bit weight:
        # in the decoder layers, where the 4-bit weights are, every 16-bit array gathered has
        # the LoRA rank as a dimension (a LoRA factor); outside them, a vocabulary dimension
        # (the unquantized lm_head, or one loss chunk's logits or their gradient, which XLA
        # may gather instead of the head's hidden split)
        assert run["gathered_bytes"].get("u8", 0) > 0, run["gathered_bytes"]
        vocab = {VOCAB, VOCAB // run["mesh"]["tensor"]}
        for dims, in_layers in run["gathered_16bit"]:
            ok = RANK in dims if in_layers else bool(vocab & set(dims))
            assert ok, run["gathered_16bit"]
        # the embedding lookup gathers rows of its table (2-D; and the rows' token ids, an
        # integer array), never the batch's embeddings [rows, seq, hidden]: with the table
        # split on its width, XLA looked up width-split embeddings and moved the whole batch's
        # to the rows' split (data2×fsdp2×tensor2; XLA:GPU warned of an "involuntary full
        # rematerialization")
        floats = [d for t, d in run["lookup_gathered"] if t in ("bf16", "f16", "f32")]
        assert all(len(d) <= 2 for d in floats), run["lookup_gathered"]


def test_fsdp_gathers_adapter_factors_never_activations(plans):
    """Over fsdp=8, with the NF4 base and with a bf16 one (whose matmuls XLA partitions
    itself): in the decoder layers every all-gather is of a weight or a LoRA factor (FSDP, each
    factor where it is used: weights.lora.FactorUse), none of activations, which carry the
    sequence axis. Left to itself, XLA:GPU all-gathered the whole batch's activations to where
    a factor split over fsdp lay."""
    platform, runs = plans
    fsdp8 = [r for r in runs if r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}]
    assert sorted(r["quant"] for r in fsdp8) == ["nf4", "none"]
    for run in fsdp8:
        assert run["gathered_in_layers"], run  # FSDP gathers something in every layer
        for dtype, dims in run["gathered_in_layers"]:
            if dtype in ("bf16", "f16", "f32"):  # not the rows' integer segment ids
                assert run["seq"] not in dims, (run["quant"], dtype, dims)
    # the same adapters, split the same way, whatever the base
    trainable = {r["quant"]: r["per_device"]["trainable_bytes"] for r in fsdp8}
    assert trainable["none"] == trainable["nf4"], trainable


def test_step_flops_count_every_loop_iteration(plans):
    platform, one, meshes, scanned = _runs(plans)
    # FLOPs per device, counted from the HLO on both platforms (jaxlora.targets.flops: dots,
    # convolutions, NF4 and flash attention calls), every loop body × its trip count: the
    # accumulation's 3, the loss chunks' 2 (1024 tokens / 512), the 4 quarters of the chunk the
    # last loss token falls in (a branch of a conditional: counted as computed, the upper
    # bound) and, scanned, the layers' 2 forward and 2 backward. XLA:GPU writes each trip
    # count, and it is the one the loop's induction variable gives; XLA:TPU writes none, and
    # the induction variable gives them all.
    for run in (one, *meshes):
        assert run["flops_source"] == "hlo_matmuls", run["flops_source"]
        assert run["flops_per_device"] == sum(run["flops_by_kind"].values())
        trips = sorted(lp["derived"] for lp in run["loops"])
        assert trips == ([2, 2, 2, 3, 4] if run is scanned else [2, 3, 4]), run["loops"]
        for lp in run["loops"]:
            assert lp["known"] == (lp["derived"] if platform == "gpu" else None), lp
    # The scanned step on 8 devices runs 1/8 of the unrolled one-device step's matmuls and one
    # more: the first layer's input gradient through q, k and v (the NF4 base and LoRA's A),
    # which the unrolled step drops (nothing before that layer trains) and a loop body, the
    # same for every layer, cannot. Over the 8 devices, per micro-batch: the 8 × 128 tokens.
    # (fsdp=8 unrolled computes exactly 1/8 of the one-device step, to the FLOP, on both
    # platforms: plan_run.py.)
    tokens, accum = 8 * 128, scanned["accum"]
    s, u = scanned["flops_by_kind"], one["flops_by_kind"]
    assert 8 * s["nf4"] - u["nf4"] == accum * 2 * tokens * HIDDEN * (HIDDEN + 2 * KV_WIDTH)
    lora_dx = accum * 3 * 2 * tokens * RANK * HIDDEN
    assert 8 * (s["dot"] + s["convolution"]) - (u["dot"] + u["convolution"]) == lora_dx
    # Each of 8 devices computes 1/8 of the step (scanned: and the extra gradient above, 4 %
    # of it) and of its NF4 matmuls, and exactly 1/8 of its flash attention: its batch rows
    # and heads.
    for run in meshes:
        kinds = run["flops_by_kind"]
        assert kinds["nf4"] * 8 == pytest.approx(u["nf4"], rel=0.10)
        ratio = run["flops_per_device"] * 8 / one["flops_per_device"]
        assert 0.9 <= ratio <= 1.1, ratio
        assert kinds["attention"] * 8 == u["attention"], run


@pytest.mark.skipif("gpu" in MISSING, reason=MISSING.get("gpu", ""))
def test_plan_command_on_a_gpu_without_flash_kernels_names_the_fallbacks():
    """``python -m jaxlora.plan`` as a user runs it, for a T4 (sm_75): the NF4 matmul
    dequantizes and attention is chunked (neither Triton nor cuDNN flash runs there), the
    step compiles, and the printed plan says so."""
    out = _toolchain.run_plan("recipe=demo", "target=t4-1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "plan for t4-1: 1 device(s)" in out.stdout
    assert "kernels           matmul dequant, attention chunked" in out.stdout
    assert "fits" in out.stdout and "flops per device" in out.stdout
