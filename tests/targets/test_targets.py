"""jaxlora.targets without any compile toolchain: the registry's numbers, the NF4 kernel each
target gets, the GPU target configs, the JAX version pin, the install hints, and the HLO
readers on text shaped like XLA:TPU's and XLA:GPU's compiled modules: collectives, kernels by
name (the FLOPs of a step: tests/targets/test_flops.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import types
from pathlib import Path

import jax
import pytest

from jaxlora import targets
from jaxlora.targets import flops, hlo, registry, toolchain
from tests.targets import _toolchain

GiB = 2**30
REQUIRED = [
    "tpu-v5e-1",
    "tpu-v5e-8",
    "tpu-v4-8",
    "tpu-v5p-8",
    "tpu-v6e-1",
    "tpu-v6e-8",
    "h100-1",
    "h100-8",
    "h200-1",
    "a100-40g-1",
    "a100-80g-1",
    "l4-1",
    "rtx4090-1",
    "t4-1",
]
# Vendor memory per chip; v4's compile-only devices are TensorCores (half a chip each).
VENDOR_GIB = {
    "tpu-v5e": 16,
    "tpu-v4": 32 / 2,
    "tpu-v5p": 95,
    "tpu-v6e": 32,
    "h100": 80,
    "h200": 141,
    "a100-40g": 40,
    "a100-80g": 80,
    "l4": 24,
    "rtx4090": 24,
    "t4": 16,
}


def test_registry_has_every_target_with_vendor_memory():
    assert set(REQUIRED) <= set(targets.TARGETS)
    for name in REQUIRED:
        t = targets.get_target(name)
        assert t.platform == ("tpu" if name.startswith("tpu") else "gpu")
        assert t.num_devices == int(name.rsplit("-", 1)[1]) or name == "tpu-v5p-8"
        nominal = VENDOR_GIB[name.rsplit("-", 1)[0]] * GiB
        # GPUs: what the driver reports (ECC and reserved memory take up to ~8%)
        assert 0.9 * nominal <= t.memory_bytes <= 1.0 * nominal, name
    assert targets.get_target("tpu-v5p-8").num_devices == 4  # megacore: 4 chips, 8 cores


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(KeyError, match="tpu-v5e-8"):
        targets.get_target("tpu-v9-8")
    # the command, in its own process (main() sets JAX's platform and puts the toolchain on
    # sys.path: not in the test process); it fails before any compile
    model = _toolchain.ROOT / "assets" / "configs" / "Llama-3.2-1B"
    out = _toolchain.run_plan(
        "recipe=llama_qlora", f"model.path={model}", "model.tokenizer=null", "target=tpu-v9-8"
    )
    assert out.returncode == 2, out.stderr[-3000:]
    err = out.stderr.strip().splitlines()[-1]
    # the message itself, not the repr a KeyError's str() gives
    assert err.startswith("jaxlora.plan: unknown target 'tpu-v9-8'; known: tpu-v5e-1,"), err


def test_nf4_kernel_per_target():
    assert {targets.get_target(n).nf4_kernel for n in REQUIRED if n.startswith("tpu")} == {"mosaic"}
    for name in ("h100-8", "h200-1", "a100-40g-1", "l4-1", "rtx4090-1"):
        assert targets.get_target(name).nf4_kernel == "triton", name
    t4 = targets.get_target("t4-1")
    assert (t4.nf4_kernel, t4.pallas_kernels) == ("dequant", False)
    assert "8.0+" in t4.nf4_kernel_reason and "7.5" in t4.nf4_kernel_reason
    assert targets.nf4_kernel_for("cpu") == "dequant"
    assert targets.nf4_kernel_for("gpu", (8, 0)) == "triton"


def test_gpu_configs_hold_every_field_and_match_the_registry():
    fields = [
        "cuda_compute_capability",
        "threads_per_block_limit",
        "threads_per_warp",
        "shared_memory_per_block",
        "shared_memory_per_core",
        "shared_memory_per_block_optin",
        "threads_per_core_limit",
        "core_count",
        "fpus_per_core",
        "registers_per_core_limit",
        "registers_per_block_limit",
        "memory_bandwidth",
        "l2_cache_size",
        "clock_rate_ghz",
        "device_memory_size",
        "device_description_str",
    ]
    gpus = [t for t in targets.TARGETS.values() if t.platform == "gpu"]
    for t in gpus:
        text = t.gpu_config_text()
        for f in fields:
            assert f in text, (t.name, f)
        got = registry.gpu_config_fields(text)
        assert got == {
            "device_kind": t.device_kind,
            "memory_bytes": t.memory_bytes,
            "compute_capability": t.compute_capability,
        }
    shipped = {p.name for p in (Path(registry.__file__).parent / "gpu").glob("*.pbtxt")}
    assert shipped == {t.gpu_config for t in gpus}


def test_jax_version_pin(monkeypatch):
    if jax.__version__ == toolchain.JAX_VERSION:
        toolchain.check_jax_version()
    monkeypatch.setattr(jax, "__version__", "0.11.0")
    with pytest.raises(
        targets.ToolchainError, match=r"written for jax/jaxlib 0\.10\.2.*jax 0\.11\.0"
    ):
        toolchain.check_jax_version()


def test_missing_toolchain_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(toolchain, "check_jax_version", lambda: None)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n in ("libtpu",) else real(n, *a)
    )
    toolchain._compile_devices.cache_clear()
    with pytest.raises(targets.ToolchainError, match=r"pip install 'libtpu==0\.0\.42\.\*'"):
        targets.compile_devices("tpu-v5e-8")
    assert "tpu" in targets.missing_toolchains()
    toolchain._compile_devices.cache_clear()


# Lines in the shapes XLA prints them (compiled modules of tests/targets/compile_run.py, cut).
TPU_HLO = """
%region_0.2 (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %add.1 = bf16[] add(%a, %b)
}

ENTRY %main.1 (p.1: f32[2,4,512]) -> bf16[64,512] {
  %all-gather.34 = f32[2,4,512]{2,1,0:T(4,128)S(1)} all-gather(%bitcast.52), channel_id=1, dimensions={0}
  %all-gather.36 = u8[512,256]{1,0:T(32,128)(4,1)S(1)} all-gather(%copy-done.1), channel_id=1, dimensions={1}
  %nf4_matmul_fwd_tpu.4 = bf16[64,512]{1,0:T(8,128)(2,1)S(1)} custom-call(%copy-done, %fusion.5, %reshape.99), custom_call_target="tpu_custom_call", operand_layout_constraints={bf16[64,512]{1,0}, u8[256,512]{1,0}, f32[8,512]{1,0}}, metadata={op_name="jit(loss)/jvp()/shard_map/nf4_matmul_fwd_tpu/pallas_call"}
  ROOT %psum.28 = bf16[64,512]{1,0:T(8,128)(2,1)S(1)} all-reduce(%nf4_matmul_fwd_tpu.4), channel_id=1, to_apply=%region_0.2
}
"""
GPU_HLO = """
ENTRY %main.2 (p0: u8[128,512]) -> bf16[64,256] {
  %all-gather-start = ((u8[128,512]{1,0}, f32[4,512]{1,0}, u8[256,256]{1,0}, f32[256,8]{1,0}, u8[128,512]{1,0}, /*index=5*/f32[4,512]{1,0}), (u8[256,512]{1,0}, f32[8,512]{1,0}, u8[512,256]{1,0}, f32[512,8]{1,0}, u8[256,512]{1,0}, /*index=5*/f32[8,512]{1,0})) all-gather-start(%p0, %p1, %p2, %p3, %p4, %p5), channel_id=3, dimensions={1}
  %all-gather-done = (u8[256,512]{1,0}, f32[8,512]{1,0}) all-gather-done(%all-gather-start)
  ROOT %pallas_call.30 = bf16[64,256]{1,0} custom-call(%wrapped_add.1, %gte.8, %gte.10), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={bf16[64,512]{1,0}, u8[512,256]{1,0}, f32[512,8]{1,0}}, metadata={op_name="jit(loss)/transpose(jvp())/shard_map/nf4_matmul_dx/pallas_call"}
}
"""


def test_hlo_readers():
    assert hlo.custom_call_targets(TPU_HLO) == {hlo.MOSAIC_CALL}
    assert hlo.custom_call_targets(GPU_HLO) == {hlo.TRITON_CALL}
    tpu = hlo.collectives(TPU_HLO)
    assert [(c.op, c.dtypes, c.nbytes) for c in tpu] == [
        ("all-gather", {"f32"}, 2 * 4 * 512 * 4),
        ("all-gather", {"u8"}, 512 * 256),
        ("all-reduce", {"bf16"}, 64 * 512 * 2),
    ]
    (ag,) = hlo.collectives(GPU_HLO, "all-gather")  # async: the results half, once
    assert ag.dtypes == {"u8", "f32"}
    assert ag.nbytes == 3 * (256 * 512) + 3 * (8 * 512 * 4)  # u8 codes + f32 absmax
    assert flops.flops_by_kind(TPU_HLO)["nf4"] == 2 * 64 * 512 * 512
    assert flops.flops_by_kind(GPU_HLO)["nf4"] == 2 * 64 * 256 * 512
    assert hlo.pallas_kernels(GPU_HLO) == {"nf4_matmul_dx": 1}


def test_a_step_the_compiler_refuses_is_a_plan_that_does_not_fit(monkeypatch):
    """XLA:TPU refuses, when compiling, a program larger than the chip (Llama-3.1-8B LoRA with
    its bf16 base on one v5e chip: "RESOURCE_EXHAUSTED: Ran out of memory on HBM ..."): the plan
    says it does not fit, with the compiler's figure, and a batch search counts it as too big."""
    from jaxlora.plan import render
    from jaxlora.training import plan as plan_mod

    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (16.58G) exceeds available HBM (15.75G).\nmore detail"
    )
    report = plan_mod.refused_report(message, 16 * GiB)
    assert report["fits"] is False and report["total_bytes"] is None
    assert (
        report["refused"].startswith("Ran out of memory on HBM") and "16.58G" in report["refused"]
    )
    assert "does not fit" in plan_mod.memory_line(report) and "16.58G" in plan_mod.memory_line(
        report
    )
    trees = {"frozen_bytes": 15 * GiB, "trainable_bytes": GiB // 8, "optimizer_bytes": GiB // 4}
    refused = plan_mod.Plan(
        target="tpu-v5e-1",
        devices=1,
        mesh={"data": 1, "fsdp": 1, "tensor": 1},
        micro_batch=1,
        seq_len=2048,
        per_device=trees | report,
        flops_per_device=None,
        flops_source="none: not compiled",
        kernels={"matmul": "mosaic", "attention": "splash"},
        compile_s=12.0,
    )
    text = render(refused)
    assert "DOES NOT FIT" in text and "16.58G" in text and "15.00 GiB" in text
    assert "to make it fit" not in text  # no advice given
    tries = [{"set": ["quant.type=nf4"], "why": "4 bits"}, {"set": [], "why": "more devices"}]
    text = render(dataclasses.replace(refused, advice=tries))
    assert text.endswith(
        "to make it fit, try (docs/memory.md):\n    quant.type=nf4 -- 4 bits\n    more devices"
    )

    # search_batch: micro-batch 1 fits, 2 is refused by the compiler -> 1
    def fake_compile(cfg, target, *, micro_batch=None):
        fits = {"fits": True, "total_bytes": 10 * GiB, "device_bytes": 16 * GiB}
        per_device = trees | (fits if micro_batch == 1 else report)
        return dataclasses.replace(refused, micro_batch=micro_batch, per_device=per_device)

    class Mesh:
        shape = {"data": 1, "fsdp": 1, "tensor": 1}

    monkeypatch.setattr(plan_mod, "compile_step", fake_compile)
    monkeypatch.setattr(plan_mod.targets, "compile_mesh", lambda *a, **k: Mesh())
    monkeypatch.setattr(plan_mod.targets, "get_target", lambda name: None)
    cfg = types.SimpleNamespace(mesh=types.SimpleNamespace(data=1, fsdp=1, tensor=1))
    found = plan_mod.search_batch(cfg, "tpu-v5e-1")
    assert found.largest == 1 and found.plan.micro_batch == 1 and found.first is found.plan
    assert [(t["micro_batch"], t["fits"], t["total_bytes"]) for t in found.tried] == [
        (1, True, 10 * GiB),
        (2, False, None),
    ]
    assert found.to_json()["first"]["micro_batch"] == 1
    assert found.to_json()["at_limit"] is False  # a boundary: 2 was compiled and did not fit
    # what the command prints after the plan: the answer and every micro-batch compiled
    from jaxlora.plan import _search_lines

    assert _search_lines(found) == (
        "  largest micro-batch that fits: 1\n  compiled micro-batches: 1 fits, 2 does not"
    )

    # not even one row fits: no largest, and the first plan (the refusal) comes back
    monkeypatch.setattr(
        plan_mod,
        "compile_step",
        lambda cfg, target, *, micro_batch=None: dataclasses.replace(
            refused, micro_batch=micro_batch, per_device=trees | report
        ),
    )
    found = plan_mod.search_batch(cfg, "tpu-v5e-1")
    assert (found.largest, found.plan) == (0, None) and found.first.per_device["refused"]
    assert _search_lines(found).startswith("  no micro-batch fits")


@pytest.mark.parametrize(
    "profile",
    [
        "linear",  # bytes grow by the same amount per row: the line predicts the boundary
        "kinked",  # growth doubles past 9 rows (a buffer laid out anew): the guess overshoots
        "flat",  # the same bytes at every micro-batch: everything up to the limit fits
        "refused",  # past 13 rows the compiler refuses the step (no byte figures)
    ],
)
@pytest.mark.parametrize("unit", [1, 4])
def test_batch_search_finds_the_boundary_bisection_finds_in_fewer_compiles(
    monkeypatch, profile, unit
):
    """search_batch against every micro-batch compiled in turn: the same largest micro-batch
    that fits, and, where bytes grow linearly, 4 compiles (1, 2, the line's guess and the one
    above it) where doubling and bisecting take about 2·log2 of the answer."""
    from jaxlora.training import plan as plan_mod

    device = 80 * GiB
    base, per_row = 20 * GiB, (3 * GiB) // 2

    def total(rows: int) -> int | None:
        k = rows // unit
        if profile == "flat":
            return base
        if profile == "refused" and k > 13:
            return None
        grow = per_row * k if profile != "kinked" else per_row * (k + max(0, k - 9))
        return base + grow

    compiled = []

    def fake_compile(cfg, target, *, micro_batch=None):
        compiled.append(micro_batch)
        t = total(micro_batch)
        fits = t is not None and t <= (1 - plan_mod.HEADROOM) * device
        per_device = {"total_bytes": t, "device_bytes": device, "fits": fits}
        return types.SimpleNamespace(micro_batch=micro_batch, per_device=per_device)

    class Mesh:
        shape = {"data": 1, "fsdp": unit, "tensor": 1}

    monkeypatch.setattr(plan_mod, "compile_step", fake_compile)
    monkeypatch.setattr(plan_mod.targets, "compile_mesh", lambda *a, **k: Mesh())
    monkeypatch.setattr(plan_mod.targets, "get_target", lambda name: None)
    cfg = types.SimpleNamespace(mesh=types.SimpleNamespace(data=1, fsdp=unit, tensor=1))
    limit = 256
    expected = max(
        (
            k * unit
            for k in range(1, limit // unit + 1)
            if fake_compile(cfg, "", micro_batch=k * unit).per_device["fits"]
        ),
        default=0,
    )
    compiled.clear()
    found = plan_mod.search_batch(cfg, "h100-8", limit=limit)
    assert found.largest == expected and found.plan.micro_batch == expected
    assert found.first.micro_batch == unit  # one row per device: the plan without a search
    assert [t["micro_batch"] for t in found.tried] == compiled
    assert len(compiled) == len(set(compiled))  # no micro-batch compiled twice
    assert all(b % unit == 0 for b in compiled)
    # only a search that fitted up to its limit says its answer is a lower bound
    assert found.at_limit == (profile == "flat")
    if profile == "linear":
        # (72 - 20) / 1.5 = 34.67: 34 units fit, 35 do not
        assert expected == 34 * unit and compiled == [unit * k for k in (1, 2, 34, 35)]
    if profile == "flat":
        assert expected == limit
        from jaxlora.plan import _search_lines

        assert _search_lines(found).startswith(
            f"  largest micro-batch that fits: {limit} or more (the search's limit"
        )
