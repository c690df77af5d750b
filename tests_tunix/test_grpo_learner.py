"""(b) Tunix's GRPO learner trains Tunix's own Qwen2 (random weights, 2 layers of width 32) with
``policy_loss_fn="fipo"``, ``num_iterations=2`` on a toy reward; and the README's Tunix snippet runs."""

import os
import re

import jax
import numpy as np
import optax
from flax import nnx
from grain import python as grain
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo.grpo_learner import GRPOConfig, GRPOLearner
from tunix.rl.rollout import base_rollout

from fipo_jax.integrations import tunix as fipo_tunix
from tests_tunix.helpers import tiny_qwen2

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
# The README's "five-line Tunix registration" is a ```py fence there (the main suite's README test
# runs only ```python fences, in the main environment, which has no Tunix); it runs here, with
# `rl_cluster`, `reward_fn` and `train_ds` Tunix's usual objects (`make_cluster`, `reward_fn`,
# `make_dataset`).
PROMPTS = ["input string", "hello world", "My name", "hello there"]


def make_cluster(vocab, max_steps: int) -> rl_cluster_lib.RLCluster:
    """A one-device RLCluster around a fresh tiny Qwen2: vanilla rollout, temperature 1, Adam."""
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={role: mesh for role in (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE,
                                              rl_cluster_lib.Role.ROLLOUT)},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(actor_optimizer=optax.adam(3e-2), eval_every_n_steps=1000,
                                                        max_steps=max_steps),
        rollout_config=base_rollout.RolloutConfig(max_tokens_to_generate=8, max_prompt_length=8, kv_cache_size=32,
                                                  temperature=1.0))
    return rl_cluster_lib.RLCluster(actor=tiny_qwen2(vocab.GetPieceSize()), reference=None, tokenizer=vocab,
                                    cluster_config=config)


def reward_fn(prompts, completions, **kwargs):
    """Toy reward: how often the completion says "hello", plus a little for length."""
    del prompts, kwargs
    return [float(text.split().count("hello")) + 0.01 * len(text) for text in completions]


def make_dataset():
    return grain.MapDataset.source(PROMPTS * 4).batch(2).map(lambda prompts: {"prompts": prompts})


def history(cluster, name):
    return np.asarray(cluster.actor_trainer.metrics_logger.get_metric_history("actor", name, "train"))


def test_fipo_trains_tunix_qwen2_with_two_iterations(vocab):
    fipo_tunix.register("fipo")
    cluster = make_cluster(vocab, max_steps=4)
    before = jax.tree.map(np.array, nnx.state(cluster.actor_trainer.model, nnx.Param))
    algo = GRPOConfig(num_generations=4, num_iterations=2, policy_loss_fn="fipo", loss_agg_mode="token-mean",
                      beta=0.0)
    learner = GRPOLearner(rl_cluster=cluster, reward_fns=reward_fn, algo_config=algo)
    logged = fipo_tunix.log_metrics(learner)
    learner.train(make_dataset())

    losses = history(cluster, "loss")
    assert len(losses) == 4 and np.all(np.isfinite(losses))  # 2 batches × 2 iterations
    for name in logged:
        assert len(history(cluster, name)) == 4, name
    raw, active = history(cluster, "influence_weights_mean_raw"), history(cluster, "influence_active_tokens")
    # iteration 1 of each batch: π_θ = π_old (the rollout model's log-probs), weights exactly inactive
    np.testing.assert_allclose(raw[0::2], 1.0, atol=1e-4)
    assert np.all(active[0::2] == 0)
    # iteration 2: the policy moved in iteration 1; Future-KL moves weights off 1
    assert np.all(np.abs(raw[1::2] - 1.0) > 1e-3) and np.any(active[1::2] > 0)
    assert np.any(history(cluster, "influence_weights_mean")[1::2] > 1.0)
    after = nnx.state(cluster.actor_trainer.model, nnx.Param)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_dapo_official_trains(vocab):
    fipo_tunix.register_dapo("dapo_official")
    cluster = make_cluster(vocab, max_steps=2)
    algo = fipo_tunix.grpo_config(num_generations=4, num_iterations=2, policy_loss_fn="dapo_official")
    learner = GRPOLearner(rl_cluster=cluster, reward_fns=reward_fn, algo_config=algo)
    assert set(fipo_tunix.log_metrics(learner)) >= set(fipo_tunix.DAPO_LOGGED_METRICS)
    learner.train(make_dataset())
    assert np.all(np.isfinite(history(cluster, "loss"))) and len(history(cluster, "pg_clipfrac_lower")) == 2


def readme_snippet() -> str:
    """The README's ```py block with the Tunix registration."""
    with open(README, encoding="utf-8") as file:
        text = file.read()
    blocks = [b for b in re.findall(r"```py\n(.*?)```", text, flags=re.DOTALL) if "fipo_tunix.register" in b]
    assert len(blocks) == 1, "README.md must hold one ```py block with the Tunix registration"
    return blocks[0]


def test_readme_tunix_snippet_runs(vocab):
    cluster = make_cluster(vocab, max_steps=2)
    namespace = {"rl_cluster": cluster, "reward_fn": reward_fn, "train_ds": make_dataset()}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)  # noqa: S102
    assert len(history(cluster, "influence_weights_mean")) == 2
    assert np.all(np.isfinite(history(cluster, "loss")))
