"""What a run starts from: the tokenizer, the prompt splits, the policy, the SFT warm start.

In that order (the trainer's): `build_tokenizer`, then `build_prompts` (the train and held-out
prompt records for ``config.data``, checked with the tokenizer alone, so a bad prompt file is named
before a model loads), then `build_model` (on the mesh, sharded by the rules table), then for the
scratch model on the chain task `warm_start` (SFT, cached on disk); `build_policy` is the first and
third together.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Protocol

import numpy as np

import fipo_jax._requires.train  # noqa: F401  one-line ImportError without fipo_jax[train]

# isort: split
import jax
from flax import nnx

from fipo_jax.config import ConfigError, TrainConfig
from fipo_jax.data import (
    ChainTask,
    CharTokenizer,
    PromptRecord,
    WordProblemTask,
    load_prompt_records,
    word_problem_splits,
)
from fipo_jax.data.encoding import encode_prompt
from fipo_jax.parallel import distributed
from fipo_jax.train.shapes import scratch_model_config

Log = Callable[[str], None]


class Bar(Protocol):
    """The part of a tqdm bar `warm_start` uses."""

    n: int

    def update(self, n: int) -> object: ...

    def set_postfix(self, **kwargs: Any) -> object: ...

    def close(self) -> object: ...


ProgressBar = Callable[[int, str], Bar | None]  # (total, description) → a tqdm-like bar, or None


def build_tokenizer(config: TrainConfig):
    """The tokenizer of ``config.model``: the scratch model's task vocabulary, or the pretrained
    checkpoint's (its folder, or the tokenizer a ``.gguf`` file carries)."""
    spec = config.model
    if spec.source == "scratch":
        return CharTokenizer()
    from fipo_jax.models.file_checks import check_model_path, read_json_object
    from fipo_jax.models.hf_io import CheckpointFileError
    from fipo_jax.models.tokenizer import load_tokenizer

    path = _checkpoint_path(config)
    try:
        check_model_path(path)  # the checkpoint itself is named first, as when its weights load
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
            read_json_object(os.path.join(path, "config.json"))
        return load_tokenizer(path)
    except (CheckpointFileError, FileNotFoundError, NotADirectoryError) as err:
        raise ConfigError(f"model.path: {err}") from err


def build_model(config: TrainConfig, tokenizer, mesh, log: Log):
    """The policy of ``config.model`` (on the mesh, sharded by the rules table): the scratch Qwen2 on
    the task vocabulary, or a pretrained checkpoint (Hugging Face folder, ``.gguf``, or the packaged
    Gemma 3 270M), whose vocabulary must hold every id of ``tokenizer``."""
    spec = config.model
    if spec.source == "scratch":
        from fipo_jax.models import CausalLM

        return CausalLM(scratch_model_config(config), rngs=nnx.Rngs(config.seed))
    from fipo_jax.models import load_pretrained
    from fipo_jax.models.config import UnsupportedConfigError
    from fipo_jax.models.hf_io import CheckpointFileError, CheckpointMismatchError

    path = _checkpoint_path(config)
    log(f"[model] loading {path}")
    try:
        model = load_pretrained(path, spec.options, mesh=mesh)
    except (CheckpointFileError, CheckpointMismatchError, UnsupportedConfigError, FileNotFoundError,
            NotADirectoryError) as err:  # each names the file or tensor at fault: one line for train.py
        raise ConfigError(f"model.path: {err}") from err
    check_vocabulary(model.config.vocab_size, len(tokenizer), path)
    return model


def adapt(config: TrainConfig, model, log: Log) -> str | None:
    """Put ``config.model.lora``'s adapters on the policy (`fipo_jax.models.lora.apply_lora`, in place);
    returns the base's SHA-256 (None, model untouched, when model.lora.rank is 0)."""
    lora = config.model.lora.config()
    if lora is None:
        return None
    from fipo_jax.models.lora import apply_lora, base_digest

    try:
        apply_lora(model, lora)
    except ValueError as err:  # a rule that matches nothing, a rank above a projection's side
        raise ConfigError(f"model.lora: {err}") from None
    adapters = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    total = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    log(f"[lora] rank {lora.rank}, α {lora.alpha:g} on {lora.module_path}: {adapters:,} trained parameters "
        f"({100 * adapters / total:.2f} % of {total:,}); base {lora.base_dtype or 'as loaded'}, sha256 "
        f"{base_digest(model)}")
    return base_digest(model)


def build_policy(config: TrainConfig, mesh, log: Log):
    """(tokenizer, model) for ``config.model`` (`build_tokenizer`, then `build_model`)."""
    tokenizer = build_tokenizer(config)
    attention = check_attention(config)  # e.g. a GPU kernel asked for on a CPU: before any weight is loaded
    model = build_model(config, tokenizer, mesh, log)
    log(f"[model] attention: {attention}")
    return tokenizer, model


def check_attention(config: TrainConfig) -> str:
    """The line a run logs for its attention (`describe_attention`); `ConfigError` when
    ``model.attention_impl`` names a kernel this backend lacks (``cudnn`` on a CPU)."""
    from fipo_jax.models.attention_kernels import describe_attention

    try:
        return describe_attention(config.model.attention_impl)
    except ValueError as err:
        raise ConfigError(f"model.attention_impl: {err}") from None


def _checkpoint_path(config: TrainConfig) -> str:
    if config.model.source == "gemma3-270m":
        from fipo_jax.models.assets import gemma3_270m_gguf

        return gemma3_270m_gguf()
    return config.model.path


def check_vocabulary(model_vocab: int, tokenizer_tokens: int, path: str) -> None:
    """The model has an embedding row for every id its tokenizer can produce."""
    if tokenizer_tokens > model_vocab:
        raise ConfigError(f"model.path {path}: the tokenizer has {tokenizer_tokens} tokens (ids up to "
                          f"{tokenizer_tokens - 1}) but the model's vocabulary is {model_vocab}: ids >= {model_vocab} "
                          f"have no embedding row; use the tokenizer the model was trained with")


def build_prompts(config: TrainConfig, tokenizer, log: Log) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, held-out) prompt records for ``config.data``; prompts longer than
    ``data.max_prompt_tokens`` are dropped (as the official data loader does), with a note. Needs
    only the tokenizer: a prompt file's problems are found before the model is loaded.

    Refused in one line: no train prompt that fits, a held-out set that comes out empty (it would
    leave the run without accuracy), a gold answer no correct response can match. Warned: eval
    prompts that are the train file, fewer train prompts than one step's ``rollout.prompts_per_step``."""
    data = config.data
    fit = lambda records, split, where=None: _fit_prompts(  # noqa: E731
        records, tokenizer, data.max_prompt_tokens, split, log, where)
    if data.task == "chain":
        train, evals = _chain_prompts(config, tokenizer, fit)
    elif data.task == "word_problems":
        if isinstance(tokenizer, CharTokenizer):
            raise ConfigError("data.task='word_problems' is English text: it needs a pretrained model and its "
                              "tokenizer (model.source 'hf' or 'gemma3-270m'), not model.source='scratch'")
        task = WordProblemTask(max_steps=data.max_steps, few_shot=data.few_shot)
        train, evals = word_problem_splits(task, config.seed, data.train_prompts, data.eval_prompts)
        train, evals = fit(train, "train"), fit(evals, "eval")
    else:
        train, evals = _file_prompts(data, fit, log)
    _check_split_sizes(config, train, evals, log)
    return train, evals


def _chain_prompts(config: TrainConfig, tokenizer, fit) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """The chain task's (train, held-out) prompts, fitted to ``data.max_prompt_tokens``. Its prompts all
    have one length in the scratch vocabulary (about one in a pretrained tokenizer's), so one is
    measured before any is generated: ``data.n_terms=100000`` is refused here, not by a warm start
    asking for terabytes."""
    data = config.data
    task = ChainTask.of(data)
    probe = PromptRecord(task.prompt(((0,) * data.n_terms, data.ops[0] * (data.n_terms - 1))), "0", "chain")
    length = _prompt_length(probe, 0, tokenizer, "data.task='chain'")
    if length > data.max_prompt_tokens:
        raise ConfigError(f"no train prompt fits data.max_prompt_tokens={data.max_prompt_tokens}: the chain task's "
                          f"prompts are {length} tokens (data.n_terms={data.n_terms}); lower data.n_terms or raise "
                          f"data.max_prompt_tokens")
    make = lambda seed, n: [PromptRecord(r["prompt"], r["ground_truth"], "chain", str(i))  # noqa: E731
                            for i, r in enumerate(task.problems(np.random.default_rng(seed), n))]
    train = make([config.seed, 1], data.train_prompts)
    held_out = {r.prompt for r in train}
    evals = [r for r in make([config.seed, 2], data.eval_prompts * 4) if r.prompt not in held_out]
    if not evals:  # every problem drawn for eval is a train prompt: the problems are few
        distinct = 10**data.n_terms * len(set(data.ops)) ** (data.n_terms - 1) if data.n_terms < 10 else "over 10^9"
        raise ConfigError(f"the chain task's eval set is empty: data.n_terms={data.n_terms} data.ops={data.ops!r} has "
                          f"{distinct} distinct problems and the {data.train_prompts} train prompts cover every "
                          f"one drawn for eval; raise data.n_terms, add an op to data.ops or lower data.train_prompts")
    evals = evals[: data.eval_prompts]
    if isinstance(tokenizer, CharTokenizer):  # every prompt is exactly as long as the probe: all fit
        return train, evals
    return fit(train, "train"), fit(evals, "eval")


def _file_prompts(data, fit, log: Log) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """``data.train_path`` / ``data.eval_path`` records: gold answers checked (rows counted in the
    file), then fitted to ``data.max_prompt_tokens``."""
    train = _load_records("data.train_path", data.train_path)
    check_gold_answers(train, f"data.train_path {data.train_path}")
    train = fit(train, "train", f"data.train_path {data.train_path}")
    if not data.eval_path:
        return train, []
    if os.path.realpath(data.eval_path) == os.path.realpath(data.train_path):
        log(f"[warning] data.eval_path {data.eval_path} is the file data.train_path {data.train_path}: the eval "
            f"measures prompts the run trains on, not held-out ones")
    evals = _load_records("data.eval_path", data.eval_path, data.eval_prompts)
    check_gold_answers(evals, f"data.eval_path {data.eval_path}")
    return train, fit(evals, "eval", f"data.eval_path {data.eval_path}")


def _check_split_sizes(config: TrainConfig, train: list[PromptRecord], evals: list[PromptRecord], log: Log) -> None:
    """A held-out set that is empty where one is expected is refused (the run would end with no accuracy);
    fewer train prompts than one step takes is a warning (the step repeats prompts, and still works)."""
    data, per_step = config.data, config.rollout.prompts_per_step
    if not evals and (data.task != "file" or data.eval_path):
        raise ConfigError(f"the eval set of data.task={data.task!r} is empty: no held-out prompt to measure "
                          f"accuracy on; raise data.eval_prompts or data.max_prompt_tokens")
    if len(train) < per_step:
        log(f"[warning] the train set has {len(train)} prompt{'s' * (len(train) != 1)}, fewer than "
            f"rollout.prompts_per_step={per_step}: every step repeats prompts; add prompts or lower "
            f"rollout.prompts_per_step")


def check_gold_answers(records: list[PromptRecord], where: str) -> None:
    """Every ground truth scores correct for a correct response (`rewards.gold.correct_responses`):
    itself on an ``Answer:`` line (a gold ``"Answer: 7"`` never can: the reward extracts and compares
    the line's answer), then the answer it states written as a model writes a correct one (``Answer: 7``
    for ``#### 7``, read by the reward; for the sentence ``"She has 7 apples left."`` it scores wrong).
    Either failing would make the prompt's reward −1 forever. The string and decimal rules decide
    almost all; math-verify is asked only about the rest. Rows are counted from 1 in ``records``."""
    from fipo_jax.rewards import RewardConfig, dapo_math_score, gold_answer
    from fipo_jax.rewards.gold import correct_responses, stated_answer

    quick = RewardConfig(use_math_verify=False)
    for row, record in enumerate(records):
        responses = correct_responses(record.ground_truth)
        for response in responses:
            if dapo_math_score(response, record.ground_truth, quick).correct:
                continue
            result = dapo_math_score(response, record.ground_truth)
            if result.correct:
                continue
            bare = stated_answer(record.ground_truth)
            example = repr(bare) if bare != gold_answer(record.ground_truth) else "'7'"
            found = f"extracts {result.extracted!r:.80}{'; ' + result.error if result.error else ''}"
            problem = (f"can never be scored correct (a response ending {response!r:.80} {found})"
                       if response == responses[0]
                       else f"is not a bare answer: the correct response {response!r:.80} scores wrong against it")
            raise ConfigError(f"{where}, prompt {row + 1}: ground truth {record.ground_truth!r:.80} {problem}; write "
                              f"the bare answer, e.g. {example}")


def _load_records(field: str, path: str, limit: int | None = None) -> list[PromptRecord]:
    """`load_prompt_records`, its errors (which name the file, row and field) as `ConfigError`."""
    try:
        return load_prompt_records(path, limit=limit)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{field}: {err}") from err


def _prompt_length(record: PromptRecord, row: int, tokenizer, where: str) -> int:
    """Tokens of a prompt; a prompt the scratch model cannot read is named (file, row, character)."""
    from jinja2.exceptions import TemplateError  # what a chat template raises

    try:
        return len(encode_prompt(record, tokenizer))
    except TemplateError as err:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(f"{where}, prompt {row + 1}: the chat template of the tokenizer {name} refused it: "
                          f"{err}") from None
    except ValueError as err:
        if not isinstance(tokenizer, CharTokenizer):
            raise
        letters = "".join(t for t in tokenizer.tokens if len(t) == 1)
        raise ConfigError(f"{where}, prompt {row + 1}: {err} — the scratch model "
                          f"reads only {letters!r} and the words 'Q:' / 'Answer:'; text prompts need a pretrained "
                          f"model (model.source 'hf')") from None


def _fit_prompts(records, tokenizer, max_tokens: int, split: str, log: Log, where: str | None = None
                 ) -> list[PromptRecord]:
    kept = [r for i, r in enumerate(records) if _prompt_length(r, i, tokenizer, where or split) <= max_tokens]
    if len(kept) < len(records):
        log(f"[data] {split}: dropped {len(records) - len(kept)} of {len(records)} prompts longer than "
            f"{max_tokens} tokens")
    if not kept:
        raise ConfigError(f"no {split} prompt fits data.max_prompt_tokens={max_tokens}: raise it, or use shorter "
                          f"prompts")
    return kept


def needs_warm_start(config: TrainConfig) -> bool:
    """The scratch model on the chain task starts from SFT on its demonstrations (``sft.enabled``)."""
    return config.model.source == "scratch" and config.data.task == "chain" and config.sft.enabled


def warm_start_seed(config: TrainConfig) -> int:
    """The seed of the warm start's demonstrations: ``sft.seed``, else the run's."""
    return config.seed if config.sft.seed is None else config.sft.seed


def warm_start_key(config: TrainConfig) -> str:
    """A fingerprint of everything that shapes the warm start: the model (not the adapters RL puts on
    it after), the task, the SFT settings (not where they are cached) and its seed. Equal keys name
    the same training recipe."""
    recipe = {k: v for k, v in dataclasses.asdict(config.sft).items()
              if k not in ("enabled", "packaged", "cache_dir", "seed")}
    model = {k: v for k, v in dataclasses.asdict(config.model).items() if k != "lora"}
    data = config.data
    return distributed.fingerprint([model, data.n_terms, data.ops, data.invertible,
                                    data.worked, recipe, warm_start_seed(config), "v4"])


def warm_start(config: TrainConfig, model, tokenizer, task: ChainTask, log: Log, bar: ProgressBar) -> str:
    """SFT of the scratch model on the chain task's demonstrations: the warm start shipped with the
    package for exactly this recipe (``sft.packaged``; its digest checked), else the one cached under
    ``sft.cache_dir`` (None: no cache), else trained here and cached. Returns the parameters' SHA-256
    (`sft.params_digest`), logged so that two machines can check they start RL from the same weights."""
    from fipo_jax.train import sft

    spec, key = config.sft, warm_start_key(config)
    path = None if spec.cache_dir is None else os.path.join(spec.cache_dir, f"sft-{key}.npz")  # None: no cache
    packaged = sft.packaged_warm_start(key) if spec.packaged else None
    if packaged is not None:
        sft.load_packaged(model, packaged)
        log(f"[sft] loaded the packaged warm start {packaged.name} (made by {packaged.made_by})")
    elif path and sft.load_cached_params(model, path, warn=lambda message: log(f"[warning] {message}")):
        log(f"[sft] loaded cached warm start {path}")
    else:
        _train_warm_start(config, model, tokenizer, task, path, log, bar)
    digest = sft.params_digest(model)
    log(f"[sft] warm start parameters sha256 {digest}" + (" (as packaged)" if packaged else ""))
    return digest


def _train_warm_start(config: TrainConfig, model, tokenizer, task: ChainTask, path: str | None, log: Log,
                      bar: ProgressBar) -> None:
    from fipo_jax.train import sft

    spec = config.sft
    length = task.prompt_tokens() + task.max_response_tokens()
    worked = f"{spec.step_fraction:.0%} worked" + (", stopping after 1 … all steps" if spec.partial else "")
    log(f"[sft] training the warm start: {spec.steps} steps × {spec.batch_size} demonstrations ({worked})")
    progress = bar(spec.steps, "sft")
    losses = sft.train_sft(model, lambda rng, n: task.demonstrations(rng, n, spec.step_fraction, spec.partial),
                           tokenizer, steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr, length=length,
                           seed=warm_start_seed(config),
                           progress=(lambda i, n, loss: (progress.update(i - progress.n),
                                                         progress.set_postfix(loss=f"{loss:.3f}")))
                           if progress else None)
    if progress:
        progress.close()
    if path:
        sft.save_params(model, path)
    log(f"[sft] final loss {losses[-1]:.4f}; " + (f"cached at {path}" if path else "not cached (sft.cache_dir=None)"))
