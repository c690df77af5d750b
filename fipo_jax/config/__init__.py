"""Run configuration: frozen dataclasses, validated on construction, loadable from JSON
and overridable field by field (``--set rollout.n=8``).

Unknown field names and impossible values are errors that name the field. Split by concern:

* `specs` — `ConfigError`, the sections (`ModelSpec` … `SFTSpec`), `TrainConfig` and their checks;
* `parsing` — JSON / command-line values → a `TrainConfig` (`from_dict`, `apply_overrides`, `load_config`);
* `ignored` — the fields a config does not read, and the refusal of a value given for one;
* `presets` — the named configs (`PRESETS`) and `with_algo`.

>>> load_config("cpu_default").name
'cpu_default'
"""

from fipo_jax.config.ignored import check_given_fields, ignored_fields
from fipo_jax.config.parsing import apply_overrides, from_dict, load_config
from fipo_jax.config.presets import (
                                     PRESETS,
                                     cpu_default,
                                     gemma3_270m_fipo,
                                     gemma3_270m_fipo_accelerator,
                                     qwen25_7b_fipo,
                                     qwen25_32b_fipo,
                                     with_algo,
)
from fipo_jax.config.specs import (
                                     DATA_TASKS,
                                     MODEL_SOURCES,
                                     ON_EXHAUSTED,
                                     PLACEMENT_FIELDS,
                                     SAMPLERS,
                                     AlgoSpec,
                                     ConfigError,
                                     DataSpec,
                                     EvalSpec,
                                     MetricsSpec,
                                     ModelSpec,
                                     OptimSpec,
                                     RewardSpec,
                                     RolloutSpec,
                                     SFTSpec,
                                     TrainConfig,
                                     fipo_inert_reason,
                                     micro_batch_rows,
                                     sampler_as_old_warning,
)

__all__ = [
    "DATA_TASKS", "MODEL_SOURCES", "ON_EXHAUSTED", "PLACEMENT_FIELDS", "PRESETS", "SAMPLERS",
    "AlgoSpec", "ConfigError", "DataSpec", "EvalSpec", "MetricsSpec", "ModelSpec", "OptimSpec", "RewardSpec",
    "RolloutSpec", "SFTSpec",
    "TrainConfig",
    "apply_overrides", "check_given_fields", "cpu_default", "fipo_inert_reason", "from_dict", "gemma3_270m_fipo",
    "gemma3_270m_fipo_accelerator", "ignored_fields", "load_config", "micro_batch_rows", "qwen25_32b_fipo",
    "qwen25_7b_fipo", "sampler_as_old_warning", "with_algo",
]
