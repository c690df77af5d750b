"""The decode-op counter of `experiments/bench_decode_ops.py` on programs whose ops are known, and the
bench's JSON fields (no timing asserted)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import bench_decode_ops  # noqa: E402

# A hand-written program: a loop of 4 known trips whose body calls a computation, runs a fusion and a
# conditional (branches of 2 and 1 kernels), and a loop of unknown trips inside (one sort).
HLO = """HloModule m

%fused (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %n = f32[2]{0} negate(%p)
}

%callee (a: f32[2]) -> f32[2] {
  %a = f32[2]{0} parameter(0)
  ROOT %d = f32[2]{0} dot(%a, %a), lhs_contracting_dims={}, rhs_contracting_dims={}
}

%big (b: f32[2]) -> f32[2] {
  %b = f32[2]{0} parameter(0)
  %s = f32[2]{0} scatter(%b, %b, %b), update_window_dims={}, to_apply=%callee
  ROOT %g = f32[2]{0} gather(%s, %b), offset_dims={}
}

%small (c: f32[2]) -> f32[2] {
  %c = f32[2]{0} parameter(0)
  ROOT %k = f32[2]{0} copy(%c)
}

%inner (t: (s32[], f32[2])) -> (s32[], f32[2]) {
  %t = (s32[], f32[2]{0}) parameter(0)
  %x = f32[2]{0} get-tuple-element(%t), index=1
  %i = s32[] get-tuple-element(%t), index=0
  %o = f32[2]{0} sort(%x), dimensions={0}, to_apply=%callee
  ROOT %r = (s32[], f32[2]{0}) tuple(%i, %o)
}

%cond (t: (s32[], f32[2])) -> pred[] {
  %t = (s32[], f32[2]{0}) parameter(0)
  ROOT %q = pred[] constant(true)
}

%body (t: (s32[], f32[2])) -> (s32[], f32[2]) {
  %t = (s32[], f32[2]{0}) parameter(0)
  %x = f32[2]{0} get-tuple-element(%t), index=1
  %y = f32[2]{0} call(%x), to_apply=%callee
  %z = f32[2]{0} fusion(%y), kind=kLoop, calls=%fused
  %w = f32[2]{0} conditional(%i, %z, %z), branch_computations={%big, %small}
  %loop = (s32[], f32[2]{0}) while(%t), condition=%cond, body=%inner
  ROOT %r = (s32[], f32[2]{0}) tuple(%i, %w)
}

ENTRY %main (a: f32[2]) -> f32[2] {
  %a = f32[2]{0} parameter(0)
  %t = (s32[], f32[2]{0}) tuple(%a, %a)
  %loop = (s32[], f32[2]{0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %out = f32[2]{0} get-tuple-element(%loop), index=1
}
"""


def test_parses_computations_and_opcodes():
    computations, entry = bench_decode_ops.parse_computations(HLO)
    assert entry == "main"
    assert set(computations) == {"fused", "callee", "big", "small", "inner", "cond", "body", "main"}
    assert bench_decode_ops.instruction_opcode("%w = (s32[], f32[2]{0}) while(%t), body=%b") == "while"
    assert bench_decode_ops.instruction_opcode("ROOT %n = f32[2,3]{1,0} negate(%p)") == "negate"
    assert bench_decode_ops.called(computations["body"][4], "branch_computations") == ["big", "small"]


def test_counts_one_step_of_the_decode_loop():
    computations, entry = bench_decode_ops.parse_computations(HLO)
    assert bench_decode_ops.decode_loop_body(computations, entry) == "body"
    own = bench_decode_ops.own_ops(computations, "body")
    assert own == {"parameter": 1, "get-tuple-element": 1, "call": 1, "fusion": 1, "conditional": 1, "while": 1,
                   "tuple": 1}
    step = bench_decode_ops.step_ops(computations, "body")
    # the call's dot inlined, the costlier branch (scatter + gather), the inner loop once (unknown trips)
    assert step["dot"] == 1 and step["scatter"] == 1 and step["gather"] == 1 and step["copy"] == 0
    assert step["sort"] == 1 and step["fusion"] == 1 and step["negate"] == 0  # a fusion is one kernel
    whole = bench_decode_ops.step_ops(computations, entry)
    assert whole["dot"] == 4 and whole["sort"] == 4 and whole["while"] == 1 + 4  # the known 4 trips
    summary = bench_decode_ops.summarise(step)
    assert summary["instructions"] == sum(step.values())
    assert summary["kernels"] == summary["instructions"] - 4 - 3 - 2  # parameters, get-tuple-elements, tuples


def sorted_products_hlo() -> str:
    """Compiled HLO of a loop of 3 trips, each one dot and one sort."""
    def fn(x, w):
        return jax.lax.fori_loop(0, 3, lambda i, c: jnp.sort(c @ w, axis=-1), x)

    return jax.jit(fn).lower(jnp.ones((4, 4)), jnp.ones((4, 4))).compile().as_text()


def test_counts_a_compiled_loop():
    counts = bench_decode_ops.loop_op_counts(sorted_products_hlo())
    assert counts["body"]["by_opcode"]["dot"] == 1 and counts["body"]["by_opcode"]["sort"] == 1
    assert counts["per_step"]["by_opcode"]["while"] == 0


def tiny_args(tmp_path, *extra):
    return ["--layers", "1", "--hidden", "32", "--intermediate", "64", "--vocab", "64", "--rows", "2", "--prompt",
            "4", "--new-tokens", "4", "--sync", "2", "--out", str(tmp_path / "ops.json"), *extra]


def check_ops(ops: dict) -> None:
    for sampler in ("static", "engine"):
        for part in ("body", "per_step"):
            counts = ops[sampler][part]
            assert counts["kernels"] <= counts["instructions"]
            assert {"fusion", "dot", "scatter", "sort", "while", "other"} <= set(counts["by_opcode"])
    assert ops["static"]["per_step"]["by_opcode"]["sort"] == 0  # top-p = 1, top-k = 0: no vocabulary sort


def test_bench_json_fields(tmp_path, monkeypatch):
    """main's JSON with the samplers' programs replaced by the small compiled loop (fast)."""
    counts = bench_decode_ops.loop_op_counts(sorted_products_hlo())
    monkeypatch.setattr(bench_decode_ops, "op_counts", lambda model, args: {"static": counts, "engine": counts})
    bench_decode_ops.main(tiny_args(tmp_path, "--skip-timing"))
    written = json.loads((tmp_path / "ops.json").read_text())
    assert {"jax", "platform", "model", "ops", "load_before", "load_after"} <= set(written)
    assert written["ops"]["static"] == counts and "timing" not in written
    assert {"body", "per_step", "program_instructions"} <= set(counts)
    assert {"instructions", "kernels", "by_opcode"} <= set(counts["per_step"])


@pytest.mark.slow
def test_bench_json_has_the_op_counts(tmp_path):
    result = bench_decode_ops.main(tiny_args(tmp_path, "--skip-timing"))
    written = json.loads((tmp_path / "ops.json").read_text())
    assert written["model"]["layers"] == 1 and "timing" not in written
    check_ops(written["ops"])
    assert result["ops"] == written["ops"]


@pytest.mark.slow
def test_bench_json_has_the_timing(tmp_path):
    bench_decode_ops.main(tiny_args(tmp_path, "--repeats", "1"))
    timing = json.loads((tmp_path / "ops.json").read_text())["timing"]
    assert set(timing["ms_per_step"]) == {"static", "engine"} and timing["engine_over_static"] > 0
    assert timing["tokens_equal"]
