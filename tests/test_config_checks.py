"""Bad configs are named before anything is built: fields the run would ignore, values that cannot
work, paths that do not exist, meshes and sizes the machine cannot hold (issue 10, items 2 and 13)."""

import json

import pytest

from fipo_jax.config import ConfigError, apply_overrides, cpu_default, ignored_fields, load_config, qwen25_7b_fipo
from fipo_jax.train.preflight import check_host_memory, check_mesh, preflight, rollout_host_bytes


@pytest.mark.parametrize("override, message", [
    ("data.train_path=/nope.parquet", r"data\.train_path is set \('/nope\.parquet'\) but data\.task='chain' does not "
                                      r"read files"),
    ("model.path=/nope", r"model\.path is set \('/nope'\) but model\.source='scratch' does not read it"),
    ("data.max_steps=2", r"override data\.max_steps is given but has no effect: data\.task='chain' does not use it"),
    ("steps=nan", r"steps must be an int, got 'nan'"),
    ("seed=-1", r"seed must be an int in \[0, 4294967295\], got -1"),
    ("rollout.temperature=inf", r"rollout\.temperature \(RL sampling\) must be a finite number >= 0\.01, got inf"),
    ("rollout.temperature=1e-30", r"rollout\.temperature \(RL sampling\) must be a finite number >= 0\.01"),
    ("eval.temperature=1e-30", r"eval\.temperature must be 0 \(greedy\) or >= 0\.01"),
    ("reward.verify_timeout_s=inf", r"reward\.verify_timeout_s must be a finite number > 0, got inf"),
    ("mesh_shape=[0]", r"mesh_shape \(data axis\) must be a positive int, got 0"),
    ("mesh_shape=[1,1,1,1]", r"mesh_shape must be a list of 1 to 3 sizes"),
    ("data.n_terms=0", r"data\.n_terms must be an int >= 2, got 0"),
    ("data.ops=xyz", r"data\.ops must be a non-empty string over"),
    ("rollout.sampler=vllm", r"rollout\.sampler must be one of \('engine', 'static'\), got 'vllm'"),
    ("rollout.engine_slots=0", r"rollout\.engine_slots must be a positive int, got 0"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(cpu_default(), [override])


def test_fields_the_source_or_task_ignores():
    ignored = ignored_fields(cpu_default())
    assert "model.path" in ignored and "data.train_path" in ignored and "sft.steps" not in ignored
    assert "model.num_layers" not in ignored and "data.n_terms" not in ignored
    pretrained = ignored_fields(qwen25_7b_fipo())
    assert {"model.num_layers", "data.n_terms", "sft.steps"} <= set(pretrained) and "data.train_path" not in pretrained
    with pytest.raises(ConfigError, match=r"sft\.steps is given but has no effect: the SFT warm start runs only"):
        apply_overrides(qwen25_7b_fipo(), ["sft.steps=5"])
    assert "rollout.engine_slots" not in ignored
    with pytest.raises(ConfigError, match=r"rollout\.engine_slots is given but has no effect: rollout\.sampler='static'"):
        apply_overrides(cpu_default(), ["rollout.sampler=static", "rollout.engine_slots=64"])
    # Switching the task makes the file fields used (and the chain fields ignored).
    config = apply_overrides(cpu_default(), ["data.task=file", "data.train_path=/x.jsonl"])
    assert config.data.train_path == "/x.jsonl"


@pytest.mark.parametrize("content, message", [
    (b"{\"steps\": 3,,}", r"config file .*c\.json: not valid JSON: .* at line 1 column"),
    (b"[1, 2]", r"config file .*c\.json: must hold a JSON object of TrainConfig fields, got list"),
    (b"{\"steps\": \"\xff\"}", r"config file .*c\.json: not UTF-8 text"),
    (b"{\"rollout\": {\"nn\": 3}}", r"config file .*c\.json: unknown config field 'rollout\.nn' \(did you mean 'n'\?\)"),
    (b"{\"data\": {\"max_steps\": 2}}", r"config file .*c\.json: field data\.max_steps is given but has no effect"),
])
def test_bad_config_files_are_named(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_preflight_names_missing_paths_mesh_and_memory(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path: /path/to/Qwen2\.5-Math-7B does not exist"):
        preflight(qwen25_7b_fipo())
    model = tmp_path / "model"
    model.mkdir()
    config = apply_overrides(qwen25_7b_fipo(), [f"model.path={model}"])
    with pytest.raises(ConfigError, match=r"data\.train_path: /path/to/dapo-math-17k\.parquet does not exist"):
        preflight(config)
    with pytest.raises(ConfigError, match=r"mesh_shape \[2, 4\] needs 8 devices, this machine has 4"):
        check_mesh((2, 4), 4)
    huge = apply_overrides(cpu_default(), ["rollout.n=1e12"])
    assert rollout_host_bytes(huge) == 48 * 10**12 * 64 * 9  # prompts_per_round × n × max_response_tokens × 9 B
    with pytest.raises(ConfigError, match=r"rollout sizes cannot fit in memory: .*rollout\.n \(1000000000000\) .* need "
                                          r"at least 24\.6 PiB of host memory .* this machine has 16\.0 GiB"):
        check_host_memory(huge, 16 * 2**30)
    check_host_memory(cpu_default(), 16 * 2**30)
    preflight(cpu_default())


@pytest.mark.parametrize("preset", [cpu_default, qwen25_7b_fipo])
def test_a_saved_config_json_loads_again(tmp_path, preset):
    """config.json holds every field, ignored ones at their defaults: not an error."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps(preset().to_dict()))
    assert load_config(str(path)) == preset()


def test_dynamic_sampling_exhaustion_advice_fits_the_setting():
    from fipo_jax.config import RolloutSpec
    from fipo_jax.train.rollouts import _exhausted_message

    padded = _exhausted_message(7, 0, 1.0, RolloutSpec(on_exhausted="pad"))
    assert "only 0 of 32 prompt groups" in padded and "all correct or all wrong" in padded
    assert "on_exhausted='pad'" not in padded  # it already is
    assert "set rollout.on_exhausted='pad'" in _exhausted_message(7, 3, 0.5, RolloutSpec(on_exhausted="error"))


def test_model_and_prompt_file_errors_reach_the_command_line_as_one_line(tmp_path):
    """build_policy / build_prompts turn the loaders' named errors into ConfigError (train.py: exit 2)."""
    from fipo_jax.train.build import build_policy, build_prompts
    from fipo_jax.data import CharTokenizer

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{")
    config = apply_overrides(cpu_default(), ["model.source=hf", f"model.path={model}"])
    with pytest.raises(ConfigError, match=r"model\.path: .*config\.json is not valid JSON"):
        build_policy(config, None, lambda s: None)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Q: 1+2=", "ground_truth": "3"}\n{"prompt": "Q: 2+2=", "ground_truth": true}\n')
    config = apply_overrides(cpu_default(), ["data.task=file", f"data.train_path={prompts}"])
    with pytest.raises(ConfigError, match=r"data\.train_path: .*p\.jsonl line 2: .*must be a string"):
        build_prompts(config, CharTokenizer(), lambda s: None)
    config = apply_overrides(cpu_default(), ["model.attention_impl=splash"])  # a TPU kernel on this CPU
    with pytest.raises(ConfigError, match=r"model\.attention_impl: attention_impl='splash' runs on tpu, not on this"):
        build_policy(config, None, lambda s: None)
    with pytest.raises(ConfigError, match=r"model\.attention_impl must be one of"):
        apply_overrides(cpu_default(), ["model.attention_impl=flash"])
    lines = []
    build_policy(cpu_default(), None, lines.append)
    assert "[model] attention: xla (auto on cpu: no fused kernel verified on this backend yet)" in lines[-1]


def test_grpo_clip_follows_clip_ratio_low_through_every_path(tmp_path):
    """GRPO's clip_ratio_high defaults to "= clip_ratio_low": one rule through the CLI flag, --set,
    a JSON config and the Python API; an explicit clip_ratio_high stays (issue 24, item 3)."""
    import os
    import sys

    from fipo_jax.core.losses import PolicyLossConfig

    from fipo_jax.train import cli as train_cli

    flag = train_cli.resolve_config(train_cli.build_parser().parse_args(["--algo", "grpo", "--set",
                                                                 "algo.loss.clip_ratio_low=0.1"]))
    overrides = apply_overrides(cpu_default(), ["algo.loss.loss_mode=grpo", "algo.loss.clip_ratio_low=0.1"])
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps({"algo": {"loss": {"loss_mode": "grpo", "clip_ratio_low": 0.1}}}))
    api = PolicyLossConfig.grpo().replace(clip_ratio_low=0.1)
    for loss in (flag.algo.loss, overrides.algo.loss, load_config(str(path)).algo.loss, api):
        assert (loss.loss_mode, loss.clip_ratio_low, loss.clip_ratio_high) == ("grpo", 0.1, 0.1)
    assert PolicyLossConfig.grpo(clip_ratio_high=0.3).replace(clip_ratio_low=0.1).clip_ratio_high == 0.3
    assert PolicyLossConfig().replace(clip_ratio_low=0.1).clip_ratio_high == 0.28  # fipo's default is fixed
    assert PolicyLossConfig.grpo().replace(loss_mode="dapo").clip_ratio_high == 0.28
    saved = apply_overrides(cpu_default(), ["algo.loss.clip_ratio_high=0.25"]).to_dict()["algo"]["loss"]
    assert (saved["clip_ratio_high"], saved["aggregation"]) == (0.25, None)  # given vs the mode's default


@pytest.mark.parametrize("raw, stops", [
    ('[END]', ("[END]",)), (')', (")",)), ('Answer: 3, done', ("Answer: 3, done",)), ('"Question:"', ("Question:",)),
    ('["Question:", "Q:"]', ("Question:", "Q:")), ('[]', ()),
])
def test_a_stop_string_is_json_or_taken_literally(raw, stops):
    """Never split or stripped (issue 24, item 4): valid JSON of the field's type, else one literal string."""
    config = apply_overrides(load_config("gemma3-270m-fipo"), [f"rollout.stop={raw}"])
    assert config.rollout.stop == stops


@pytest.mark.parametrize("raw", ['""', '[""]', '["ok", ""]'])
def test_an_empty_stop_string_is_refused(raw):
    with pytest.raises(ConfigError, match=r"rollout\.stop must be a list of non-empty strings"):
        apply_overrides(load_config("gemma3-270m-fipo"), [f"rollout.stop={raw}"])


def test_a_number_list_must_be_json():
    with pytest.raises(ConfigError, match=r"mesh_shape must be a JSON list like \[2, 2, 2\], got '2,2,2'"):
        apply_overrides(cpu_default(), ["mesh_shape=2,2,2"])
    assert apply_overrides(cpu_default(), ["mesh_shape=[1,1]"]).mesh_shape == (1, 1)


def test_the_planner_refuses_a_run_that_cannot_fit_before_anything_is_built():
    """rollout.n=400000 passed the host-array lower bound but the planner puts it at ~640 GiB (issue 24,
    item 15); the CPU default fits."""
    from fipo_jax.train.preflight import check_planned_memory

    check_planned_memory(cpu_default(), 8 * 2**30)
    with pytest.raises(ConfigError, match=r"the memory planner puts this run's peak at [\d,.]+ GiB of host memory "
                                          r"\(1 CPU device\(s\)\) \(at least [\d,.]+ GiB\), and this machine has "
                                          r"23\.5 GiB; `fipo-plan --config"):
        check_planned_memory(apply_overrides(load_config("cpu_skewed_chain"), ["rollout.n=400000"]),
                             int(23.5 * 2**30))


# Issue 25, item 4: the fields no check covered. Each bad value is refused through `--set` (the
# command line's path) and through the dataclass itself (the Python API's path), naming the field.
UNCHECKED_BEFORE = [
    ("model", "dtype", "float16", r"model\.dtype must be one of \('float32', 'bfloat16'\), got 'float16'"),
    ("model", "compute_dtype", "int8", r"model\.compute_dtype must be one of \('float32', 'bfloat16'\)"),
    ("model", "remat", "some", r"model\.remat must be one of \('none', 'full', 'dots'\), got 'some'"),
    ("model", "rope_theta", 0.0, r"model\.rope_theta must be a finite number > 0, got 0\.0"),
    ("model", "rope_theta", float("inf"), r"model\.rope_theta must be a finite number > 0, got inf"),
    ("rollout", "dynamic_sampling", 1, r"rollout\.dynamic_sampling must be a bool, got 1"),
    ("reward", "overlong_shaping", "no", r"reward\.overlong_shaping must be a bool, got 'no'"),
    ("sft", "enabled", 0, r"sft\.enabled must be a bool, got 0"),
    ("sft", "cache_dir", "", r"sft\.cache_dir must be a non-empty string or None, got ''"),
    (None, "name", "", r"name must be a non-empty string usable as a directory name .*, got ''"),
    (None, "name", "a/b", r"name must be a non-empty string usable as a directory name .*, got 'a/b'"),
    (None, "name", "..", r"name must be a non-empty string usable as a directory name .*, got '\.\.'"),
    (None, "name", "a\0b", r"name must be a non-empty string usable as a directory name .*, got 'a\\x00b'"),
    (None, "tensorboard", 1, r"tensorboard must be a bool, got 1"),
]


@pytest.mark.parametrize("section, field, value, message", UNCHECKED_BEFORE)
def test_every_field_is_checked_by_the_dataclass(section, field, value, message):
    import dataclasses

    config = cpu_default()
    with pytest.raises(ConfigError, match=message):
        if section is None:
            dataclasses.replace(config, **{field: value})
        else:
            dataclasses.replace(getattr(config, section), **{field: value})


@pytest.mark.parametrize("override, message", [
    ("model.dtype=float16", r"model\.dtype must be one of \('float32', 'bfloat16'\), got 'float16'"),
    ("model.compute_dtype=int8", r"model\.compute_dtype must be one of"),
    ("model.remat=some", r"model\.remat must be "),
    ("model.rope_theta=-1", r"model\.rope_theta must be a finite number > 0, got -1\.0"),
    ("model.rope_theta=nan", r"model\.rope_theta must be a finite number > 0, got nan"),
    ("rollout.dynamic_sampling=2", r"rollout\.dynamic_sampling must be a bool, got 2"),
    ("reward.overlong_shaping=maybe", r"reward\.overlong_shaping must be a bool, got 'maybe'"),
    ("sft.enabled=[]", r"sft\.enabled must be a bool, got \[\]"),
    ('sft.cache_dir=""', r"sft\.cache_dir must be a non-empty string or None, got ''"),
    ("sft.cache_dir=3", r"sft\.cache_dir must be a string, got 3"),
    ('name=""', r"name must be a non-empty string usable as a directory name"),
    ("name=runs/x", r"name must be a non-empty string usable as a directory name .*got 'runs/x'"),
    ("name=.", r"name must be a non-empty string usable as a directory name .*got '\.'"),
    ("tensorboard=2", r"tensorboard must be a bool, got 2"),
])
def test_every_field_is_checked_on_the_command_line(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        apply_overrides(cpu_default(), [override])
    assert "\n" not in str(err.value)


def test_the_good_values_of_the_newly_checked_fields_pass():
    config = apply_overrides(cpu_default(), ["model.dtype=bfloat16", "model.compute_dtype=bfloat16", "model.remat=true",
                                             "model.rope_theta=1e6", "rollout.dynamic_sampling=false",
                                             "reward.overlong_shaping=false", "sft.enabled=false", "sft.cache_dir=null",
                                             "name=my run.v2", "tensorboard=true"])
    assert (config.model.remat, config.sft.cache_dir, config.name, config.tensorboard) == ("full", None, "my run.v2", True)


def test_choice_lists_have_one_declaration():
    """The config validates against the tables the code dispatches on (issue 25, item 2): every key
    is accepted, anything else is refused with the one table's choices in the message."""
    import typing

    from fipo_jax.core import losses
    from fipo_jax.train import update as update_lib
    from fipo_jax.core.advantages import ADVANTAGE_ESTIMATORS
    from fipo_jax.config import DATA_TASKS, ignored
    from fipo_jax.core.future_kl import METHOD_CHOICES, METHODS, FutureKLMethod
    from fipo_jax.models.config import SUPPORTED_DTYPES

    assert update_lib.ADVANTAGE_ESTIMATORS is ADVANTAGE_ESTIMATORS
    for name in ADVANTAGE_ESTIMATORS:
        assert apply_overrides(cpu_default(), [f"algo.advantage={name}"]).algo.advantage == name
        assert update_lib.UpdateConfig(losses.PolicyLossConfig(), 2, advantage=name).advantage == name
    with pytest.raises(ConfigError, match=rf"algo\.advantage must be one of {re_tuple(tuple(ADVANTAGE_ESTIMATORS))}, "
                                          r"got 'ppo'"):
        apply_overrides(cpu_default(), ["algo.advantage=ppo"])
    for weighting in losses.MICRO_BATCH_WEIGHTINGS:
        assert apply_overrides(cpu_default(), [f"algo.micro_batch_weighting={weighting}"]).algo.micro_batch_weighting \
            == weighting
    with pytest.raises(ConfigError, match=rf"algo\.micro_batch_weighting must be one of "
                                          rf"{re_tuple(losses.MICRO_BATCH_WEIGHTINGS)}, got 'mean'"):
        apply_overrides(cpu_default(), ["algo.micro_batch_weighting=mean"])
    with pytest.raises(ValueError, match=r"UpdateConfig\.micro_batch_weighting must be one of"):
        update_lib.UpdateConfig(losses.PolicyLossConfig(), 2, micro_batch_weighting="mean")
    with pytest.raises(ConfigError, match=rf"model\.dtype must be one of {re_tuple(SUPPORTED_DTYPES)}"):
        apply_overrides(cpu_default(), ["model.dtype=float16"])
    # The tuples are the Literals' arguments, not second lists.
    assert losses.LOSS_MODES == typing.get_args(losses.LossMode)
    assert losses.AGGREGATIONS == typing.get_args(losses.Aggregation)
    assert losses.MICRO_BATCH_WEIGHTINGS == typing.get_args(losses.MicroBatchWeighting)
    assert ("auto",) + METHODS == METHOD_CHOICES == typing.get_args(FutureKLMethod)
    assert set(ignored._TASK_FIELDS) == set(DATA_TASKS)  # the ignored-field table covers every task


def re_tuple(choices: tuple) -> str:
    """A tuple's repr as a regular expression."""
    import re

    return re.escape(repr(choices))


def test_runtime_configs_copy_every_field():
    """One constructor per runtime config (issue 25, item 3): each copies the run config's values."""
    from fipo_jax.train import runtime_configs, shapes
    from fipo_jax.data import CharTokenizer

    config = apply_overrides(cpu_default(), ["algo.advantage=rloo", "algo.micro_batch_weighting=official",
                                             "model.logprob_chunk_size=64", "reward.overlong_factor=0.5",
                                             "reward.verify_timeout_s=3", "reward.score_budget_s=9", "eval.top_p=0.5",
                                             "rollout.top_k=7", "data.max_prompt_tokens=100"])
    update = runtime_configs.update_config(config)
    assert (update.loss, update.group_size, update.advantage, update.micro_batch_weighting,
            update.logprob_chunk_size) == (config.algo.loss, 8, "rloo", "official", 64)
    reward = runtime_configs.reward_config(config)
    assert (reward.max_response_length, reward.overlong_buffer, reward.overlong_factor, reward.verify_timeout_s,
            reward.batch_budget_s) == (64, 16, 0.5, 3.0, 9.0)
    unshaped = apply_overrides(config, ["reward.overlong_shaping=false"])
    assert runtime_configs.reward_config(unshaped).overlong_buffer is None
    tokenizer = CharTokenizer()
    train = runtime_configs.sampling_config(config, tokenizer, [(5, 6)])
    evaluation = runtime_configs.sampling_config(config, tokenizer, evaluation=True)
    assert (train.temperature, train.top_p, train.top_k, train.stop_sequences) == (1.0, 1.0, 7, ((5, 6),))
    assert (evaluation.temperature, evaluation.top_p, evaluation.top_k, evaluation.stop_sequences) == (1.0, 0.5, 0, ())
    for sampling in (train, evaluation):
        assert sampling.max_new_tokens == 64 and sampling.eos_token_ids == (tokenizer.eos_token_id,)
        assert sampling.prompt_length_buckets == (16, 32, 64, 100 + shapes.PROMPT_BUCKET_SLACK)


def test_a_moved_field_is_named_in_one_line(tmp_path):
    """`algo.loss.ratio_quantiles` (a metrics switch) moved to `metrics.ratio_quantiles`: an override or a
    config file of an earlier version is told where, and the switch is no part of the resume fingerprint."""
    from fipo_jax.config import MetricsSpec, TrainConfig
    from fipo_jax.config.specs import without_paths as _without_paths

    with pytest.raises(ConfigError, match=r"^config field 'algo.loss.ratio_quantiles' moved to "
                                          r"'metrics.ratio_quantiles'$"):
        apply_overrides(cpu_default(), ["algo.loss.ratio_quantiles=false"])
    old = tmp_path / "config.json"
    old.write_text(json.dumps({"algo": {"loss": {"ratio_quantiles": False}}}))
    with pytest.raises(ConfigError, match="moved to 'metrics.ratio_quantiles'"):
        load_config(str(old))
    quiet = apply_overrides(cpu_default(), ["metrics.ratio_quantiles=false"])
    assert quiet.metrics == MetricsSpec(ratio_quantiles=False) and quiet.fingerprint() == cpu_default().fingerprint()
    saved = TrainConfig().fingerprint()
    saved["algo"]["loss"]["ratio_quantiles"] = True  # what an earlier version's checkpoint holds
    now = json.loads(json.dumps(TrainConfig().fingerprint()))  # as checkpoint metadata holds it
    assert _without_paths(saved, ["algo.loss.ratio_quantiles", "no.such.path"]) == now
    assert saved["algo"]["loss"]["ratio_quantiles"] is True  # the saved metadata itself is left alone


def test_a_field_added_since_a_checkpoint_is_no_difference_at_its_default():
    from fipo_jax.config import TrainConfig
    from fipo_jax.train.checkpoint import config_differences

    now = json.loads(json.dumps(apply_overrides(cpu_default(), ["algo.loss.behaviour_weight_cap=2"]).fingerprint()))
    default = json.loads(json.dumps(TrainConfig().fingerprint()))
    saved = json.loads(json.dumps(cpu_default().fingerprint()))
    for section, key in (("algo", "old_log_probs"), ("algo.loss", "behaviour_weight_cap")):  # written before them
        node = saved
        for part in section.split("."):
            node = node[part]
        node.pop(key)
    assert config_differences(saved, now, defaults=default) == [
        "algo.loss.behaviour_weight_cap: checkpoint None vs now 2.0"]  # not at its default: a difference
    same = json.loads(json.dumps(cpu_default().fingerprint()))
    assert config_differences(saved, same, defaults=default) == []
    assert config_differences(saved, same) != []  # without defaults every added field differs
