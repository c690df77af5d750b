"""What the planner plans is what the trainer allocates: one derivation of a run's sizes
(`fipo_jax.train.shapes.run_shapes`), checked against the arrays of real steps, against the loaded
model of every family, and on every preset and generated configs against the code paths the
trainer and the rollouts take (the sampler's bucket, the update's packing)."""

import dataclasses
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fipo_jax.config import PRESETS, apply_overrides, load_config, micro_batch_rows
from fipo_jax.core.packing import micro_batch_shape, pack_batch
from fipo_jax.data import CharTokenizer
from fipo_jax.generation import engine as engine_lib
from fipo_jax.models import ModelOptions, load_pretrained
from fipo_jax.train import plan as plan_lib
from fipo_jax.train import rollouts as rollouts_lib
from fipo_jax.train import runtime_configs, shapes
from fipo_jax.train.trainer import Trainer
from tests.test_trainer import tiny_config

# A tokenizer stand-in for the sampler's config: only its special-token ids are read.
TOKENS = types.SimpleNamespace(pad_token_id=0, eos_token_id=1)


def observed_step(config, tmp_path, monkeypatch) -> dict:
    """One real RL step of ``config``: the sizes its arrays took."""
    rows = []  # what each sampler call decodes at once: the engine's slots, the static sampler's rows
    real_engine, real_static = engine_lib.generate_with_stats, rollouts_lib.generate

    def engine_spy(policy, ids, mask, key, sampling, engine, **kwargs):
        rows.append(engine.num_slots)
        return real_engine(policy, ids, mask, key, sampling, engine, **kwargs)

    def static_spy(policy, ids, mask, key, sampling, **kwargs):
        rows.append(len(ids))
        return real_static(policy, ids, mask, key, sampling, **kwargs)

    monkeypatch.setattr(engine_lib, "generate_with_stats", engine_spy)
    monkeypatch.setattr(rollouts_lib, "generate", static_spy)
    trainer = Trainer(config, str(tmp_path / "run"), progress=False, log=lambda s: None)
    trainer.step()
    batch, _ = trainer.host_batch(trainer.last_rollouts)
    return {"model": trainer.policy.config, "sampler_rows": rows[0],
            "sampler_prompt_width": trainer.last_rollouts.prompt_ids.shape[1],
            "row_tokens": batch.input_ids.shape[-1], "micro_batch_rows": batch.input_ids.shape[-2],
            "trainer": trainer.shapes}


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["engine", "static"])
def test_the_planned_sizes_are_the_sizes_of_a_real_step(sampler, tmp_path, monkeypatch):
    engine = ["rollout.engine_slots=8"] if sampler == "engine" else []
    config = tiny_config(str(tmp_path / "sft"), f"rollout.sampler={sampler}", *engine,
                         "rollout.dynamic_sampling=false", "eval.every=0", "steps=1")
    planned = plan_lib.plan(config, config.mesh_shape).shapes
    seen = observed_step(config, tmp_path, monkeypatch)
    assert seen.pop("trainer") == planned
    assert seen == {"model": planned.model, "sampler_rows": planned.sampler_rows,
                    "sampler_prompt_width": planned.sampler_prompt_width, "row_tokens": planned.row_tokens,
                    "micro_batch_rows": planned.micro_batch_rows}
    assert planned.sampler_rows == (8 if sampler == "engine" else 24)  # 6 prompts × 4 responses a round


@pytest.mark.slow
def test_the_planned_model_is_the_loaded_one_in_every_family(tmp_path):
    from tests.test_trainer_hf import FAMILIES, write_folder

    options = ModelOptions(dtype="bfloat16", compute_dtype="float32", remat="dots", attention_chunk_size=64)
    for family in FAMILIES:
        folder = write_folder(tmp_path / family, family)
        config = apply_overrides(load_config("qwen2.5-7b-fipo"), [
            f"model.path={folder}", "model.dtype=bfloat16", "model.compute_dtype=float32", "model.remat=dots",
            "model.attention_chunk_size=64"])
        assert config.model.options == options
        assert shapes.model_config(config) == load_pretrained(folder, options).config, family


def trainer_side_sizes(config, mesh_shape) -> dict:
    """The sizes the trainer's own code paths give ``config``'s longest prompt (no model needed)."""
    config = dataclasses.replace(config, mesh_shape=tuple(mesh_shape))
    sampling = runtime_configs.sampling_config(config, TOKENS)
    longest = shapes.longest_prompt(config)
    width = sampling.prompt_length(longest)  # the bucket the sampler pads this round to
    ro, n = config.rollout, config.rollout.n
    rows = ro.prompts_per_step * n
    lengths = np.full(rows, 3)
    prompt_mask = np.zeros((rows, width), bool)
    prompt_mask[:, width - longest:] = True
    used = shapes.update_prompt_width(longest, width)  # what Trainer.host_batch keeps
    split = shapes.run_shapes(config).data_split
    if rows * (used + ro.max_response_tokens) <= 2**22:  # the packing itself; else its row rule (presets' GiBs)
        fields = {"prompt_ids": np.zeros((rows, used), np.int32), "prompt_mask": prompt_mask[:, -used:],
                  "tokens": np.zeros((rows, ro.max_response_tokens), np.int32),
                  "response_mask": np.arange(ro.max_response_tokens) < lengths[:, None],
                  "scores": np.ones(rows, np.float32), "sampler_log_probs": np.zeros((rows, ro.max_response_tokens))}
        batch, _ = pack_batch(fields, config.algo.mini_batches, micro_batch_rows(config), row_multiple=split,
                              layout="padded")
        micro_rows, row_tokens = batch.input_ids.shape[-2:]
    else:
        micro_rows = micro_batch_shape(rows // config.algo.mini_batches, micro_batch_rows(config), split)[1]
        row_tokens = used + ro.max_response_tokens
    round_rows = ro.prompts_per_round * n
    return {"sampler_prompt_width": width, "row_tokens": row_tokens,
            "micro_batch_rows": micro_rows, "step_rows": rows,
            "sampler_rows": (shapes.engine_slots(ro.engine_slots, round_rows, split) if ro.sampler == "engine"
                             else round_rows)}


def planned_sizes(config, mesh_shape) -> dict:
    planned = plan_lib.plan(config, mesh_shape)
    assert planned.kv_cache_rows == -(-planned.shapes.sampler_rows // planned.shapes.data_split)
    assert (planned.row_tokens, planned.micro_batch_rows) == (planned.shapes.row_tokens,
                                                              planned.shapes.micro_batch_rows)
    return {name: getattr(planned.shapes, name) for name in
            ("sampler_prompt_width", "row_tokens", "micro_batch_rows", "step_rows", "sampler_rows")}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_planned_at_the_sizes_the_trainer_takes(preset):
    config = load_config(preset)
    for mesh in {tuple(config.mesh_shape), (1,)}:
        if config.algo.micro_batch_size % shapes.run_shapes(config, mesh).data_split == 0:
            assert planned_sizes(config, mesh) == trainer_side_sizes(config, mesh), (preset, mesh)


@given(task=st.sampled_from(["chain", "file"]), sampler=st.sampled_from(["engine", "static"]),
       n_terms=st.integers(2, 40), max_prompt=st.sampled_from([60, 100, 511, 512, 1000, 2048, 5000]),
       slots=st.integers(1, 300), per_round=st.integers(2, 12), data=st.sampled_from([1, 2, 4]))
def test_generated_configs_are_planned_at_the_sizes_the_trainer_takes(task, sampler, n_terms, max_prompt, slots,
                                                                      per_round, data):
    base = [f"rollout.sampler={sampler}", f"rollout.prompts_per_round={per_round}", "rollout.prompts_per_step=2",
            "rollout.n=4", "algo.mini_batches=2", "algo.micro_batch_size=4", f"data.max_prompt_tokens={max_prompt}"]
    base += [f"rollout.engine_slots={slots}"] if sampler == "engine" else []
    if task == "chain":
        if shapes.longest_prompt(apply_overrides(load_config("cpu_default"), [f"data.n_terms={n_terms}"])) > max_prompt:
            return  # refused by the config checks of the chain task
        config = apply_overrides(load_config("cpu_default"), base + [f"data.n_terms={n_terms}"])
    else:
        config = apply_overrides(load_config("qwen2.5-7b-fipo"), base)
    assert planned_sizes(config, (data,)) == trainer_side_sizes(config, (data,))


def test_the_sampler_buckets_and_the_scratch_model_are_decided_once():
    config = load_config("cpu_default")
    assert runtime_configs.sampling_config(config, CharTokenizer()).prompt_length_buckets == \
        shapes.prompt_buckets(config)
    model = shapes.model_config(config)
    assert (model.rope_theta, model.max_position_embeddings) == (config.model.rope_theta, 4096)
    assert model.options == config.model.options
