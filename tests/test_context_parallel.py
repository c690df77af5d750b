"""Context parallelism: Future-KL and the FIPO loss with the time axis split over a mesh axis of 8
fake CPU devices equal the unsplit computation, and no device gathers a whole row.
Runs in a subprocess: the device count is fixed when JAX starts."""

import pytest

import fipo_jax as fj
from fipo_jax.core.future_kl import METHODS
from tests.multi_device import run_json

pytestmark = pytest.mark.slow  # one 8-device subprocess for the module (11 s)

SCRIPT = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import fipo_jax as fj
from fipo_jax.core.future_kl import METHODS, context_parallel_future_kl, future_kl

assert jax.device_count() == 8
B, T, SHARDS = 4, 96, 4  # 24 tokens per shard
mesh = Mesh(np.asarray(jax.devices()).reshape(2, SHARDS), ("data", "context"))  # Auto axes, as the trainer's
split = NamedSharding(mesh, P("data", "context"))
rng = np.random.default_rng(0)
delta = (rng.normal(size=(B, T)) * 0.6).astype(np.float32)
delta[0, 30] = 4.0  # filtered (r > c = e^1.5)
mask = rng.random((B, T)) > 0.15
mask[3, 70:] = False  # right padding
# Segments: row 0 one sequence (the tail crosses three shards); row 1 boundaries exactly at shard
# edges and inside shards; row 2 a sequence spanning shards 1-3 whole; row 3 short runs, an id reused.
segments = np.zeros((B, T), np.int32)
segments[1] = np.repeat([0, 1, 2, 3, 4, 5], [24, 10, 14, 24, 5, 19])
segments[2] = np.repeat([0, 1, 2], [20, 70, 6])
segments[3] = np.repeat([5, 6, 5, 7, 8, 9, 9 + 1], [7, 20, 9, 30, 4, 16, 10])


def gathered_shapes(fn, *args):
    text = fn.lower(*args).compile().as_text()
    return sorted({line.split("=")[1].split(" all-gather")[0].strip() for line in text.splitlines()
                   if re.search(r"= \S+ all-gather", line)})


def reference(ids):  # float64, one sequence at a time
    gamma, out = 2.0 ** (-1 / 8.0), np.zeros((B, T))
    x = np.where(mask & (delta <= 1.5), delta, 0.0).astype(np.float64)
    for b in range(B):
        tail = 0.0
        for t in reversed(range(T)):
            continues = t + 1 < T and (ids is None or ids[b, t + 1] == ids[b, t])
            tail = x[b, t] + (gamma * tail if continues else 0.0)
            out[b, t] = tail
    return out


out = {"future_kl": {}}
with jax.set_mesh(mesh):
    for method in METHODS:
        for name, ids in (("rows", None), ("segments", segments)):
            fn = jax.jit(lambda d, m, i: context_parallel_future_kl(d, m, 8.0, "context", filter_threshold=np.exp(1.5),
                                                                    method=method, block_size=8, segment_ids=i))
            args = (jax.device_put(delta, split), jax.device_put(mask, split),
                    None if ids is None else jax.device_put(ids, split))
            got = fn(*args)
            out["future_kl"][method + "/" + name] = {
                "error": float(np.max(np.abs(np.asarray(got) - reference(ids)))),
                "sharding": str(got.sharding.spec), "gathered_shapes": gathered_shapes(fn, *args)}

    def loss_and_grad(config, ids, count):
        def fn(lp, old, adv, m, i):
            (loss, metrics), grad = jax.value_and_grad(
                lambda x: fj.policy_loss(x, old, adv, m, config, segment_ids=i, num_sequences=count),
                has_aux=True)(lp)
            return loss, grad, metrics
        return jax.jit(fn)

    old = (-np.abs(rng.normal(size=(B, T))) * 2).astype(np.float32)
    new = old + delta * 0.5
    adv = np.where(rng.random((B, T)) > 0.5, 1.0, -1.0).astype(np.float32)
    out["loss"] = {}
    for aggregation in ("token-mean", "seq-mean-token-mean"):
        for name, ids, count in (("rows", None, None), ("segments", segments, 16)):
            base = fj.PolicyLossConfig(aggregation=aggregation, decay_rate=8.0, future_kl_method="scan")
            split_config = fj.PolicyLossConfig(aggregation=aggregation, decay_rate=8.0, future_kl_method="scan",
                                               future_kl_context_axis="context")
            want = jax.jit(loss_and_grad(base, ids, count))(new, old, adv, mask, ids)
            args = [jax.device_put(a, split) for a in (new, old, adv, mask)]
            got = loss_and_grad(split_config, ids, count)(*args, None if ids is None else jax.device_put(ids, split))
            grad_only = jax.jit(jax.grad(lambda *a: fj.policy_loss(*a[:4], split_config, segment_ids=a[4],
                                                                  num_sequences=count)[0]))
            metric_errors = {k: abs(float(got[2][k]) - float(want[2][k])) / max(1.0, abs(float(want[2][k])))
                             for k in want[2]}
            out["loss"][aggregation + "/" + name] = {
                "loss": [float(want[0]), float(got[0])],
                "grad_error": float(np.max(np.abs(np.asarray(got[1]) - np.asarray(want[1])))),
                "grad_scale": float(np.max(np.abs(np.asarray(want[1])))),
                "worst_metric": max(metric_errors.items(), key=lambda kv: kv[1]),
                "weights_active": float(want[2]["influence_weights_mean"]) != 1.0,
                "gathered_shapes": gathered_shapes(grad_only, *args, None if ids is None else jax.device_put(ids, split))}
    errors = {}
    for label, call in (
        ("axis", lambda: context_parallel_future_kl(delta, mask, 8.0, "sequence")),
        ("divisible", lambda: context_parallel_future_kl(delta[:, :90], mask[:, :90], 8.0, "context")),
    ):
        try:
            call()
            errors[label] = "no error"
        except ValueError as error:
            errors[label] = str(error)
    out["errors"] = errors
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    return run_json(SCRIPT)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", ["rows", "segments"])
def test_future_kl_split_over_four_devices_equals_the_whole_row(results, method, layout):
    case = results["future_kl"][f"{method}/{layout}"]
    assert case["error"] < 2e-5, case  # against a float64 per-sequence recurrence
    assert case["sharding"] == "P('data', 'context')"
    assert_no_row_is_gathered(case["gathered_shapes"])


def assert_no_row_is_gathered(shapes, floats_only=False):
    # The only gathers are the carries, [rows, shards] values, never a row of T = 96 tokens (nor
    # half of one). Without the context axis XLA gathers the whole row for the scan: f32[96,2].
    rows = [shape for shape in shapes if ("96" in shape or "48" in shape)
            and not (floats_only and shape.startswith(("s32", "pred")))]
    assert shapes and not rows, shapes


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("layout", ["rows", "segments"])
def test_fipo_loss_split_over_time_equals_the_unsplit_loss(results, aggregation, layout):
    case = results["loss"][f"{aggregation}/{layout}"]
    want, got = case["loss"]
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), case
    assert case["grad_error"] <= 1e-5 * case["grad_scale"], case
    assert case["worst_metric"][1] <= 1e-5, case
    assert case["weights_active"], case  # the Future-KL really moves the weights here
    # The gradient program (metrics dropped). With segments, the per-sequence sums of the loss
    # number the runs by a cumsum over the row, which XLA gathers: for the drop rule the integer
    # ids and a boolean row; a seq-mean aggregation's scatter also gathers the float per-token
    # losses (docs/functional-api.md: context parallelism). The Future-KL itself never gathers a row.
    if layout == "rows" or aggregation == "token-mean":
        assert_no_row_is_gathered(case["gathered_shapes"], floats_only=layout == "segments")


def test_bad_axis_and_indivisible_length_are_named(results):
    assert "mesh axis 'sequence' is not in the mesh's axes ('data', 'context')" in results["errors"]["axis"]
    assert "time axis (90) must divide by the size of mesh axis 'context' (4)" in results["errors"]["divisible"]


@pytest.mark.parametrize("axis", ["", 3])
def test_loss_config_refuses_a_bad_context_axis(axis):
    with pytest.raises(ValueError, match="future_kl_context_axis must be a mesh axis name or None"):
        fj.PolicyLossConfig(future_kl_context_axis=axis)
