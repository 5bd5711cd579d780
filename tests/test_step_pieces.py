# ruff: noqa: E501  (the HLO excerpt keeps XLA's own long lines)
"""bench_steps --pieces: the optimised-HLO parser and the sorting of a step's ops into pieces (no compile: the HLO
below is an excerpt of XLA's own dump of ufm.solve's GD loop at the medium size, float64, jax 0.10.2)."""

from benchmarks.step_pieces import classify, hlo_instructions

HLO = """
%fused_computation.1 (param_0.3: f64[], param_1.4: f64[162048], param_2: f64[162048]) -> f64[] {
  %param_1.4 = f64[162048]{0} parameter(1)
  %param_2 = f64[162048]{0} parameter(2)
  %sub.14 = f64[162048]{0} subtract(%param_1.4, %param_2), metadata={op_name="jit(run_jit)/while/body/sub"}
  %multiply.123 = f64[162048]{0} multiply(%sub.14, %sub.14)
  %param_0.3 = f64[] parameter(0)
  ROOT %reduce.18 = f64[] reduce(%multiply.123, %param_0.3), dimensions={0}, to_apply=%add
}
%fused_computation.5 (param_0.8: f64[128,1000], param_1.9: f64[128,1000]) -> f64[128,128] {
  %param_0.8 = f64[128,1000]{1,0} parameter(0)
  %param_1.9 = f64[128,1000]{1,0} parameter(1)
  ROOT %dot_general.20 = f64[128,128]{1,0} dot(%param_0.8, %param_1.9), lhs_contracting_dims={1}
}
%fused_computation.7 (param_0.10: f64[128,128], param_1.11: f64[128,1000]) -> f64[128,1000] {
  %param_0.10 = f64[128,128]{1,0} parameter(0)
  %param_1.11 = f64[128,1000]{1,0} parameter(1)
  ROOT %dot.22 = f64[128,1000]{1,0} dot(%param_0.10, %param_1.11), lhs_contracting_dims={1}
}
%fused_computation.11 (param_0.17: f64[], param_1.18: f64[128,1000]) -> f64[] {
  %param_0.17 = f64[] parameter(0)
  %param_1.18 = f64[128,1000]{1,0} parameter(1)
  ROOT %reduce.3 = f64[] reduce(%param_1.18, %param_0.17), dimensions={0,1}, to_apply=%add
}
%fused_computation.15 (param_0.22: f64[128,128], param_1.23: f64[128,1000]) -> f64[128,1000] {
  %param_0.22 = f64[128,128]{1,0} parameter(0)
  %param_1.23 = f64[128,1000]{1,0} parameter(1)
  ROOT %dot.9 = f64[128,1000]{1,0} dot(%param_0.22, %param_1.23), lhs_contracting_dims={1}
}
%body (p: (f64[128,1000], f64[128,128])) -> (f64[128,1000], f64[128,128]) {
  %p = (f64[128,1000]{1,0}, f64[128,128]{1,0}) parameter(0)
  %get-tuple-element.1 = f64[128,1000]{1,0} get-tuple-element(%p), index=0
  %get-tuple-element.2 = f64[128,128]{1,0} get-tuple-element(%p), index=1
  %add_multiply_fusion = f64[162048]{0} fusion(%get-tuple-element.1), kind=kLoop, calls=%fused_computation.36, metadata={op_name="jit(run_jit)/while/body/mul"}
  %transpose_copy_fusion.1 = f64[128,128]{1,0} fusion(%get-tuple-element.2), kind=kLoop, calls=%fused_computation.46, metadata={op_name="jit(run_jit)/while/body/jvp()/transpose"}
  %ynn_fusion.15 = f64[128,1000]{1,0} fusion(%get-tuple-element.2, %get-tuple-element.1), kind=kCustom, calls=%fused_computation.15, metadata={op_name="jit(run_jit)/while/body/jvp()/dot_general"}, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %ynn_fusion.7 = f64[128,1000]{1,0} fusion(%transpose_copy_fusion.1, %ynn_fusion.15), kind=kCustom, calls=%fused_computation.7, metadata={op_name="jit(run_jit)/while/body/transpose(jvp(jvp()))/transpose"}
  %compare_select_fusion = f64[128,1000]{1,0} fusion(%ynn_fusion.7, %ynn_fusion.15), kind=kLoop, calls=%fused_computation.42, metadata={op_name="jit(run_jit)/while/body/transpose(jvp())/select_n"}
  %ynn_fusion.5 = f64[128,128]{1,0} fusion(%compare_select_fusion, %get-tuple-element.1), kind=kCustom, calls=%fused_computation.5, metadata={op_name="jit(run_jit)/while/body/transpose(jvp(jvp()))/dot_general"}
  %ynn_fusion.11 = f64[] fusion(%constant.163, %get-tuple-element.1), kind=kCustom, calls=%fused_computation.11, metadata={op_name="jit(run_jit)/while/body/jvp()/reduce_sum"}
  %ynn_fusion.1 = f64[] fusion(%constant.163, %add_multiply_fusion, %add_multiply_fusion), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(run_jit)/while/body/dot_general"}
  %bitcast_concatenate_fusion = f64[162048]{0} fusion(%compare_select_fusion, %ynn_fusion.5), kind=kLoop, calls=%fused_computation.37, metadata={op_name="jit(run_jit)/while/body/transpose(jvp())/concatenate"}
  %slice_bitcast_fusion.3 = f64[128,1000]{1,0} fusion(%add_multiply_fusion), kind=kLoop, calls=%fused_computation.55, metadata={op_name="jit(run_jit)/while/body/split"}
  ROOT %tuple.9 = (f64[128,1000]{1,0}, f64[128,128]{1,0}) tuple(%compare_select_fusion, %ynn_fusion.5)
}
"""


def test_a_steps_ops_sort_into_their_pieces():
    """Each op of the excerpt lands in the piece its HLO says: a fusion around a dot is a product (forward when
    its op_name is the JVP's, dW when its d x d output has no N = 1000 axis, dH otherwise), a fusion around a
    reduce is a reduction, a transpose fusion a copy, a concatenate or split the driver's flat x (ravel/unravel,
    inside value_and_grad or not), an op outside value_and_grad (no "jvp(" in its op_name: the driver's flat update
    and norms) the solver loop, and a loop's bookkeeping ops no piece at all."""
    hlo = hlo_instructions(HLO)
    assert hlo["instrs"]["ynn_fusion.15"][:3] == ("f64[128,1000]", "fusion", "fused_computation.15")
    expected = {
        "ynn_fusion.15": "forward products",
        "ynn_fusion.7": "dH products",
        "ynn_fusion.5": "dW products",
        "ynn_fusion.11": "reductions",
        "transpose_copy_fusion.1": "copies/transposes",
        "compare_select_fusion": "elementwise",
        "add_multiply_fusion": "update and solver loop",
        "ynn_fusion.1": "update and solver loop",
        "bitcast_concatenate_fusion": "ravel/unravel of x and g",
        "slice_bitcast_fusion.3": "ravel/unravel of x and g",
        "get-tuple-element.1": None,
        "tuple.9": None,
        "not_an_op": None,
    }
    assert {op: classify(hlo, op, N=1000) for op in expected} == expected
