"""Checks a run's config against the machine before anything is built.

A config is valid on its own (`fipo_jax.config` checks it on construction); whether it can run
*here* is a separate question, answered in seconds rather than after a model has loaded:

* every path it reads exists (``model.path``, ``data.train_path``, ``data.eval_path``);
* the scratch model's task vocabulary spells every stop string;
* ``model.attention_impl`` runs on this backend (`build.check_attention`: a GPU kernel asked for on a CPU);
* the mesh fits the devices (`jax.device_count()`), and the update's micro-batch rows split over
  its data axis (`config.micro_batch_rows`, the planner's rule too);
* the rollout's response arrays fit in host memory: a lower bound, since it counts only the
  fixed-width response arrays a round holds on the host (ids, masks, log-probs), not prompts,
  the model or its KV cache;
* the memory planner's peak (`fipo_jax.train.plan`) fits the device memory (`memory_stats()`), or, on a
  CPU, the host memory the mesh's devices share — refused only when even the planner's lowest
  reading (its peak over `memory_model.HIGHEST_MEASURED_RATIO`, the most it has over-counted)
  does not fit. Skipped when the planner cannot tell the architecture (a ``.gguf`` path).

`preflight` raises `ConfigError` naming the field, the value and, for memory, the estimate.
"""

from __future__ import annotations

import math
import os

import jax

from fipo_jax.config import ConfigError, TrainConfig, micro_batch_rows
from fipo_jax.core import _checks
from fipo_jax.train.build import check_attention

# Host bytes per response slot of a round: int32 token + float32 sampler log-prob + bool mask
# (`fipo_jax.train.rollouts.Rollouts`), each ``max_response_tokens`` wide whatever the response's length.
HOST_BYTES_PER_TOKEN = 9


def preflight(config: TrainConfig, device_count: int | None = None, host_memory: int | None = None) -> None:
    """Raise `ConfigError` if ``config`` cannot run on this machine (see the module docstring)."""
    check_paths(config)
    check_stop_strings(config)
    check_attention(config)
    check_mesh(config.mesh_shape, jax.device_count() if device_count is None else device_count,
               config.rollout_mesh_shape)
    micro_batch_rows(config)
    check_host_memory(config, physical_memory() if host_memory is None else host_memory)
    check_planned_memory(config, physical_memory() if host_memory is None else host_memory)


def check_paths(config: TrainConfig) -> None:
    """Every file or folder the run reads exists."""
    paths = [("data.train_path", config.data.train_path), ("data.eval_path", config.data.eval_path)]
    if config.model.source == "hf":
        paths.insert(0, ("model.path", config.model.path))
    for field, path in paths:
        _checks.require(not path or os.path.exists(path), f"{field}: {path} does not exist", error=ConfigError)


def check_stop_strings(config: TrainConfig) -> None:
    """The scratch model's task vocabulary can spell every stop string."""
    if config.model.source != "scratch":
        return
    from fipo_jax.data import CharTokenizer

    for text in config.rollout.stop:
        try:
            CharTokenizer().encode(text)
        except ValueError as err:
            raise ConfigError(f"rollout.stop {text!r}: {err} of the scratch model") from None


def check_mesh(mesh_shape: tuple[int, ...], device_count: int, rollout_mesh_shape: tuple[int, ...] = ()) -> None:
    """The meshes (training, then rollout when split) need no more devices than there are."""
    need = math.prod(mesh_shape) + (math.prod(rollout_mesh_shape) if rollout_mesh_shape else 0)
    meshes = f"mesh_shape {list(mesh_shape)}" + (f" + rollout_mesh_shape {list(rollout_mesh_shape)}"
                                                 if rollout_mesh_shape else "")
    _checks.require(need <= device_count,
                    f"{meshes} needs {need} devices, this machine has {device_count} (for CPU "
                    f"runs set XLA_FLAGS=--xla_force_host_platform_device_count={need})", error=ConfigError)


def rollout_host_bytes(config: TrainConfig) -> int:
    """A lower bound on the host bytes of the largest batch of responses a run holds at once
    (a dynamic-sampling round, the update batch or an evaluation)."""
    ro = config.rollout
    rows = max(ro.prompts_per_round * ro.n, ro.prompts_per_step * ro.n, config.data.eval_prompts * config.eval.k)
    return rows * ro.max_response_tokens * HOST_BYTES_PER_TOKEN


def check_host_memory(config: TrainConfig, host_memory: int) -> None:
    """The rollout arrays fit in ``host_memory`` bytes."""
    need = rollout_host_bytes(config)
    _checks.require(
        need <= host_memory,
        f"rollout sizes cannot fit in memory: rollout.prompts_per_round / prompts_per_step "
        f"({config.rollout.prompts_per_round} / "
        f"{config.rollout.prompts_per_step}) × rollout.n ({config.rollout.n}) responses of "
        f"rollout.max_response_tokens = {config.rollout.max_response_tokens} slots need at least {_bytes(need)} "
        f"of host memory for their response arrays alone; this machine has {_bytes(host_memory)}",
        error=ConfigError)


def check_planned_memory(config: TrainConfig, host_memory: int) -> None:
    """The planner's peak of each device group, at its most optimistic reading, fits this machine
    (see the module doc)."""
    from fipo_jax.train import memory_model
    from fipo_jax.train import plan as plan_lib

    try:
        groups = plan_lib.plan_groups(config)
    except ConfigError:
        return  # the architecture is unknown without loading it: nothing to check here
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit is None:  # CPU: the groups' devices on this host share its memory
        counts = {name: min(math.prod(group.mesh_shape.values()), jax.local_device_count())
                  for name, group in groups.items()}
        need = sum(group.shared_memory_need(counts[name]) for name, group in groups.items())
        have, what = host_memory, f"host memory ({sum(counts.values())} CPU device(s))"
    else:
        need, have, what = max(group.peak for group in groups.values()), limit, "memory per device"
    meshes = f"--mesh {','.join(map(str, config.mesh_shape))}" + (
        f" --rollout-mesh {','.join(map(str, config.rollout_mesh_shape))}" if config.rollout_mesh_shape else "")
    _checks.require(
        need / memory_model.HIGHEST_MEASURED_RATIO <= have,
        f"the memory planner puts this run's peak at {_bytes(need)} of {what} (at least "
        f"{_bytes(need / memory_model.HIGHEST_MEASURED_RATIO)}), and this machine has {_bytes(have)}; "
        f"`fipo-plan --config <this config> {meshes}` shows the pieces and the settings that would fit",
        error=ConfigError)


def physical_memory() -> int:
    """This host's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PiB"
