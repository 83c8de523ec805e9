"""jaxlora.targets.flops on modules shaped like XLA's compiled ones, without a toolchain: each
matmul instruction's FLOPs (dots, convolutions, NF4 and flash attention calls) × the times its
computation runs, loop trip counts as XLA:GPU writes them or as a loop's induction variable
gives them (XLA:TPU writes none), nested loops multiplied; and what cannot be counted refused,
naming it. The compiled steps themselves: tests/targets/test_plan.py."""

from __future__ import annotations

import pytest

from jaxlora.targets import hlo
from jaxlora.targets.flops import FlopsUnknown, flops_by_kind, loops, matmul_flops

# From the real step compiled for one H100 (tests/targets/plan_run.py), cut: a GEMM fusion
# (its dot's operands are the computation's parameters), a Pallas flash forward call, and a
# splash kernel as XLA:TPU names it.
STEP_HLO = """
%gemm_fusion_dot.99_computation (parameter_0: f32[1024,8,128], parameter_1: f32[8,8,128]) -> f32[8,1024,8] {
  %parameter_0 = f32[1024,8,128]{2,1,0} parameter(0), metadata={scheduling_name="parameter_0"}
  %parameter_1 = f32[8,8,128]{2,1,0} parameter(1), metadata={scheduling_name="parameter_1"}
  ROOT %dot.170 = f32[8,1024,8]{2,1,0} dot(%parameter_0, %parameter_1), lhs_batch_dims={1}, lhs_contracting_dims={2}, rhs_batch_dims={1}, rhs_contracting_dims={2}, metadata={op_name="jit(step)/q_proj/dot_general"}
}

ENTRY %main.1 (p.1: f32[1024,8,128], p.2: f32[8,8,128]) -> f32[8,128,16,64] {
  %p.1 = f32[1024,8,128]{2,1,0} parameter(0)
  %p.2 = f32[8,8,128]{2,1,0} parameter(1)
  %gemm_fusion_dot.99 = f32[8,1024,8]{2,1,0} fusion(%p.1, %p.2), kind=kCustom, calls=%gemm_fusion_dot.99_computation
  %pallas_call.24 = (f32[8,4,4,128,64]{4,3,2,1,0}, f32[8,4,4,128]{3,2,1,0}) custom-call(%a, %b, %c, %d), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={f32[8,4,4,128,64]{4,3,2,1,0}, f32[8,4,128,64]{3,2,1,0}, f32[8,4,128,64]{3,2,1,0}, s32[8,128]{1,0}}, api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(step)/layers/0/self_attn/jvp(flash_fwd)/pallas_call"}
  ROOT %splash_mha_dq_segmented_no_residuals.3 = f32[8,16,128,64]{3,2,1,0:T(8,128)} custom-call(%e), custom_call_target="tpu_custom_call", operand_layout_constraints={s8[1,1,1]{2,1,0}, f32[8,16,128,64]{3,2,1,0}}
}
"""


def test_step_flops_and_kernels_from_the_hlo():
    dot = 2 * (8 * 1024 * 8) * 128  # |out| · the contracted 128 of parameter_0
    product = 2 * 8 * 16 * 128 * 128 * 64  # one [S, S] product: B 8, H 16, S 128, D 64
    # Pallas flash forward: QKᵀ and PV (q [B, KV, G, S, D]: 4 kv heads × 4); splash dq: QKᵀ,
    # dO·Vᵀ, dS·K (q [B, H, S, D], its first floating operand)
    assert flops_by_kind(STEP_HLO) == {
        "dot": dot,
        "convolution": 0,
        "nf4": 0,
        "attention": 2 * product + 3 * product,
    }
    assert matmul_flops(STEP_HLO) == dot + 5 * product
    assert hlo.pallas_kernels(STEP_HLO) == {
        "flash_fwd": 1,
        "splash_mha_dq_segmented_no_residuals": 1,
    }


# A scanned step's shape: an accumulation loop (i < 3, the way XLA:TPU leaves it: compare in
# the condition, the increment through a copy, no trip count written) around a loop over 7
# layers (the way XLA:GPU leaves it: compare and increment inside fusions, known_trip_count
# written), a GEMM fusion in the layer, a splash call (its kernel_metadata on lines of their
# own) in the accumulation body, and a convolution (XLA:TPU's dot) outside both.
LOOPS_HLO = r"""HloModule jit_step, is_scheduled=true

%fused_dot (parameter_0: f32[128,64], parameter_1: f32[64,32]) -> f32[128,32] {
  %parameter_0 = f32[128,64]{1,0} parameter(0)
  %parameter_1 = f32[64,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[128,32]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_compare (param_0: s32[]) -> pred[] {
  %param_0 = s32[] parameter(0)
  %constant.7 = s32[] constant(7)
  ROOT %lt.1 = pred[] compare(%param_0, %constant.7), direction=LT
}

%fused_add (param_0.1: s32[]) -> s32[] {
  %param_0.1 = s32[] parameter(0)
  %constant.1 = s32[] constant(1)
  ROOT %add.1 = s32[] add(%param_0.1, %constant.1)
}

%layers_cond (arg.1: (s32[], f32[128,64], f32[64,32])) -> pred[] {
  %arg.1 = (s32[], f32[128,64]{1,0}, f32[64,32]{1,0}) parameter(0)
  %gte.1 = s32[] get-tuple-element(%arg.1), index=0
  ROOT %compare_fusion = pred[] fusion(%gte.1), kind=kLoop, calls=%fused_compare
}

%layers_body (arg.2: (s32[], f32[128,64], f32[64,32])) -> (s32[], f32[128,64], f32[64,32]) {
  %arg.2 = (s32[], f32[128,64]{1,0}, f32[64,32]{1,0}) parameter(0)
  %gte.2 = s32[] get-tuple-element(%arg.2), index=0
  %gte.3 = f32[128,64]{1,0} get-tuple-element(%arg.2), index=1
  %gte.4 = f32[64,32]{1,0} get-tuple-element(%arg.2), index=2
  %gemm_fusion = f32[128,32]{1,0} fusion(%gte.3, %gte.4), kind=kCustom, calls=%fused_dot
  %add_fusion = s32[] fusion(%gte.2), kind=kLoop, calls=%fused_add
  ROOT %tuple.1 = (s32[], f32[128,64]{1,0}, f32[64,32]{1,0}) tuple(%add_fusion, %gte.3, %gte.4)
}

%accum_cond (arg.3: (s32[], f32[128,64], f32[64,32])) -> pred[] {
  %constant.3 = s32[]{:T(128)} constant(3)
  %arg.3 = (s32[]{:T(128)}, f32[128,64]{1,0}, f32[64,32]{1,0}) parameter(0)
  %gte.5 = s32[]{:T(128)} get-tuple-element(%arg.3), index=0
  ROOT %lt.2 = pred[]{:T(512)} compare(%gte.5, %constant.3), direction=LT
}

%accum_body (arg.4: (s32[], f32[128,64], f32[64,32])) -> (s32[], f32[128,64], f32[64,32]) {
  %arg.4 = (s32[]{:T(128)}, f32[128,64]{1,0}, f32[64,32]{1,0}) parameter(0)
  %gte.6 = s32[]{:T(128)} get-tuple-element(%arg.4), index=0
  %gte.7 = f32[128,64]{1,0} get-tuple-element(%arg.4), index=1
  %gte.8 = f32[64,32]{1,0} get-tuple-element(%arg.4), index=2
  %constant.0 = s32[]{:T(128)} constant(0)
  %tuple.2 = (s32[], f32[128,64]{1,0}, f32[64,32]{1,0}) tuple(%constant.0, %gte.7, %gte.8)
  %while.1 = (s32[], f32[128,64]{1,0}, f32[64,32]{1,0}) while(%tuple.2), condition=%layers_cond, body=%layers_body, metadata={op_name="jit(step)/while/body/layers/while"}, backend_config={"known_trip_count":{"n":"7"},"known_init_step":{"init":"0","step":"1"},"known_induction_variable":{"tuple_index":"0"},"dynamic_variables":[]}
  %splash_mha_fwd_segmented_residuals.1 = (f32[2,4,128,64]{3,2,1,0:T(8,128)}, f32[2,4,128,128]{3,2,1,0:T(8,128)}) custom-call(%x, %y, %z), custom_call_target="tpu_custom_call", operand_layout_constraints={s8[1,1,1]{2,1,0}, f32[2,4,128,64]{3,2,1,0}, f32[2,2,128,64]{3,2,1,0}}, frontend_attributes={kernel_metadata={
"xprof_metadata":"{\"block_q\": 128, \"use_fused_bwd_kernel\": false}"
}}, metadata={op_name="jit(step)/while/body/self_attn/splash_mha_fwd_segmented_residuals/pallas_call"}
  %copy.2 = s32[]{:T(128)} copy(%gte.6)
  %constant.2 = s32[]{:T(128)} constant(1)
  %add.2 = s32[]{:T(128)} add(%copy.2, %constant.2)
  ROOT %tuple.3 = (s32[], f32[128,64]{1,0}, f32[64,32]{1,0}) tuple(%add.2, %gte.7, %gte.8)
}

ENTRY %main.9 (x.1: f32[128,64], w.1: f32[64,32], p.1: f32[1024,1024], r.1: f32[8,1024]) -> f32[1024,8] {
  %x.1 = f32[128,64]{1,0} parameter(0)
  %w.1 = f32[64,32]{1,0} parameter(1)
  %p.1 = f32[1024,1024]{1,0} parameter(2)
  %r.1 = f32[8,1024]{1,0} parameter(3)
  %constant.4 = s32[]{:T(128)} constant(0)
  %copy.3 = s32[]{:T(128)} copy(%constant.4)
  %tuple.4 = (s32[], f32[128,64]{1,0}, f32[64,32]{1,0}) tuple(%copy.3, %x.1, %w.1)
  %while.2 = (s32[], f32[128,64]{1,0}, f32[64,32]{1,0}) while(%tuple.4), condition=%accum_cond, body=%accum_body, metadata={op_name="jit(step)/while"}
  ROOT %convolution.1 = f32[1024,8]{1,0:T(8,128)} convolution(%p.1, %r.1), dim_labels=bf_oi->bf, metadata={op_name="jit(step)/lm_head/dot_general"}
}
"""
LAYER_DOT = 2 * 128 * 32 * 64
SPLASH_FWD = 2 * (2 * 2 * 4 * 128 * 128 * 64)  # QKᵀ and PV: B 2, H 4, S 128, D 64
CONVOLUTION = 2 * (1024 * 8) * 1024  # |out| · |rhs| / o: rhs [o 8, i 1024]


def test_loop_bodies_count_once_per_iteration_and_nested_loops_multiply():
    assert [(lp.name, lp.body, lp.known, lp.derived) for lp in loops(LOOPS_HLO)] == [
        ("while.1", "layers_body", 7, 7),  # XLA's trip count, and the induction variable's
        ("while.2", "accum_body", None, 3),  # none written (XLA:TPU): the induction variable's
    ]
    assert flops_by_kind(LOOPS_HLO) == {
        "dot": 3 * 7 * LAYER_DOT,
        "convolution": CONVOLUTION,
        "nf4": 0,
        "attention": 3 * SPLASH_FWD,
    }
    (splash,) = (i for i in hlo.instructions(LOOPS_HLO) if hlo.kernel_name(i))
    assert splash.name == "splash_mha_fwd_segmented_residuals.1"
    assert "pallas_call" in splash.text  # the metadata after kernel_metadata's own lines


def test_a_loop_without_a_trip_count_is_refused_not_guessed():
    # i != 3 is not a canonical loop (i < n): no trip count can be read, and XLA wrote none
    untold = LOOPS_HLO.replace(
        "compare(%gte.5, %constant.3), direction=LT", "compare(%gte.5, %constant.3), direction=NE"
    )
    assert [lp.trips for lp in loops(untold)] == [7, None]
    with pytest.raises(FlopsUnknown, match=r"while loop %while.2 \(body %accum_body\)"):
        matmul_flops(untold)
    # ... where XLA wrote one, it is used
    told = untold.replace(
        'metadata={op_name="jit(step)/while"}',
        'metadata={op_name="jit(step)/while"}, backend_config={"known_trip_count":{"n":"3"}}',
    )
    assert flops_by_kind(told) == flops_by_kind(LOOPS_HLO)
    # a loop that computes nothing needs no trip count
    idle = untold.replace("calls=%fused_dot", "calls=%fused_add").replace(
        'custom_call_target="tpu_custom_call"', 'custom_call_target="AllocateBuffer"'
    )
    idle = idle.replace("%splash_mha_fwd_segmented_residuals.1 =", "%allocate.1 =")
    assert matmul_flops(idle) == CONVOLUTION


def test_a_start_and_step_other_than_0_and_1():
    # for (i = 2; i < 7; i += 2): 2, 4, 6
    odd = LOOPS_HLO.replace(
        "%constant.0 = s32[]{:T(128)} constant(0)", "%constant.0 = s32[]{:T(128)} constant(2)"
    )
    odd = odd.replace("%constant.1 = s32[] constant(1)", "%constant.1 = s32[] constant(2)")
    odd = odd.replace('backend_config={"known_trip_count":{"n":"7"},', "backend_config={")
    assert [(lp.known, lp.derived) for lp in loops(odd)] == [(None, 3), (None, 3)]
    assert flops_by_kind(odd)["dot"] == 3 * 3 * LAYER_DOT


@pytest.mark.parametrize(
    ("swap", "refused"),
    [
        (  # a Mosaic kernel jaxlora does not know
            ("%splash_mha_fwd_segmented_residuals.1 =", "%my_kernel.1 ="),
            r"custom call %my_kernel.1 runs 'my_kernel' \(tpu_custom_call\)",
        ),
        (  # a cuBLAS GEMM (XLA:GPU keeps its GEMMs as fusions of dots; a call is not counted)
            ('custom_call_target="tpu_custom_call"', 'custom_call_target="__cublas$gemm"'),
            r"\(__cublas\$gemm\), whose FLOPs",
        ),
    ],
)
def test_a_kernel_whose_flops_are_not_known_is_refused(swap, refused):
    with pytest.raises(FlopsUnknown, match=refused):
        flops_by_kind(LOOPS_HLO.replace(*swap))


def test_a_conditional_counts_its_most_expensive_branch():
    # which branch runs is data (the chunked loss skips chunks past the last loss token):
    # the count is the upper bound, the branch that computes most, once per run
    branchy = LOOPS_HLO.replace(
        "%while.1 = (s32[], f32[128,64]{1,0}, f32[64,32]{1,0}) while(%tuple.2), condition=%layers_cond, body=%layers_body,",
        "%while.1 = (s32[], f32[128,64]{1,0}, f32[64,32]{1,0}) conditional(%gte.6, %tuple.2, %tuple.2), branch_computations={%layers_cond, %layers_body},",
    )
    assert flops_by_kind(branchy) == {
        "dot": 3 * LAYER_DOT,  # layers_body once per run of accum_body, not 7 times
        "convolution": CONVOLUTION,
        "nf4": 0,
        "attention": 3 * SPLASH_FWD,
    }


def test_an_async_computation_counts_once():
    # XLA names the computation an async op runs on its -start, -update and -done alike
    run_async = STEP_HLO.replace(
        "%gemm_fusion_dot.99 = f32[8,1024,8]{2,1,0} fusion(%p.1, %p.2), kind=kCustom, "
        "calls=%gemm_fusion_dot.99_computation",
        "%async-start = ((f32[1024,8,128]{2,1,0}, f32[8,8,128]{2,1,0}), f32[8,1024,8]{2,1,0}, "
        's32[]) async-start(%p.1, %p.2), async_execution_thread="parallel", '
        "calls=%gemm_fusion_dot.99_computation\n"
        "  %async-done = f32[8,1024,8]{2,1,0} async-done(%async-start), "
        "calls=%gemm_fusion_dot.99_computation",
    )
    assert "async-done" in run_async
    assert flops_by_kind(run_async) == flops_by_kind(STEP_HLO)
