"""The update's per-part breakdown: the matmul-FLOP counter against hand-computed programs (scans,
conds, remat) and a tiny run of every part."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import bench_breakdown  # noqa: E402


def flops(fn, *shapes):
    return bench_breakdown.program_matmul_flops(jax.make_jaxpr(fn)(*(jnp.zeros(s) for s in shapes)).jaxpr)


def test_matmul_flops_count_scans_conds_batches_and_remat():
    assert flops(lambda a, b: a @ b, (3, 4), (4, 5)) == 2 * 3 * 4 * 5
    assert flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), (2, 3, 4), (2, 4, 5)) == 2 * 2 * 3 * 4 * 5
    scanned = lambda a, w: jax.lax.scan(lambda x, wi: (x @ wi, None), a, w)[0]  # noqa: E731
    assert flops(scanned, (3, 4), (6, 4, 4)) == 6 * 2 * 3 * 4 * 4
    branchy = lambda p, a, b, c: jax.lax.cond(p.sum() > 0, lambda: a @ b @ c, lambda: a @ b)  # noqa: E731
    assert flops(branchy, (1,), (3, 4), (4, 5), (5, 5)) == 2 * 3 * 4 * 5 + 2 * 3 * 5 * 5  # the costlier branch
    plain = flops(jax.grad(lambda a, b: jnp.sum(jnp.tanh(a @ b) @ b.T)), (3, 4), (4, 5))
    remat = flops(jax.grad(lambda a, b: jnp.sum(jax.checkpoint(lambda x: jnp.tanh(x @ b))(a) @ b.T)), (3, 4), (4, 5))
    assert remat == plain + 2 * 3 * 4 * 5  # the checkpointed matmul runs again in the backward pass


@pytest.mark.slow
def test_tiny_breakdown_reports_every_part(tmp_path):
    report = bench_breakdown.main(["--tiny", "--out", str(tmp_path / "breakdown.json")])
    parts = report["shapes"]["tiny/none"]["parts"]
    assert set(parts) == {"old_log_probs", "layers_fwd_bwd", "model_fwd_bwd", "head_fwd_bwd", "optimizer", "rl_update"}
    for name, part in parts.items():
        if name != "optimizer":  # recompute only adds work: every program does at least the model's
            assert part["program_over_model"] >= 0.99, (name, part)
    assert parts["head_fwd_bwd"]["program_over_model"] == pytest.approx(4 / 3, rel=0.01)  # the chunk's logits twice
    assert (tmp_path / "breakdown.json").exists()
