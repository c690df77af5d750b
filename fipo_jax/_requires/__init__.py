"""Which optional extra brings which third-party modules, and one-line errors when one is missing.

`pip install fipo_jax` installs the functional core (Future-KL, the losses, advantages, the
diagnostics' math) with jax and numpy only. The rest comes with an extra:

    extra    for                                                 modules it brings (as imported)
    models   fipo_jax.models: the decoder, HF / GGUF import,      flax, transformers, tokenizers,
             export, tokenizers and their chat templates,         safetensors, huggingface_hub, gguf,
             LoRA / QLoRA adapters                                jinja2, qwix
    train    the trainer, rollouts, update step, checkpoints,     the models extra + optax, orbax,
             planner, rewards' verifier, plots                     math_verify, pyarrow, tqdm, matplotlib
    all      everything (train + tensorboard)

A module that needs an extra imports `fipo_jax._requires.models` or `.train` before its own
third-party imports; a function that needs one lazily calls `import_module(name, extra)`.
"""

from __future__ import annotations

import importlib
import importlib.util

EXTRAS = {
    "models": ("flax", "transformers", "tokenizers", "safetensors", "huggingface_hub", "ml_dtypes", "gguf",
               "jinja2", "qwix"),  # jinja2: transformers renders chat templates with it
    "train": ("flax", "optax", "orbax.checkpoint", "math_verify", "pyarrow", "tqdm", "matplotlib"),
}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package ("orbax" of "orbax.checkpoint")
        return False


def missing_message(extra: str, missing: list[str]) -> str:
    """The one-line error: what is missing and the command that installs it."""
    return (f"this part of fipo_jax needs the '{extra}' extra (missing: {', '.join(missing)}): "
            f"pip install 'fipo_jax[{extra}]'")


def require(extra: str) -> None:
    """ImportError in one line unless every module of `extra` is installed."""
    missing = [name for name in EXTRAS[extra] if not _installed(name)]
    if missing:
        raise ImportError(missing_message(extra, missing))


def import_module(name: str, extra: str):
    """``importlib.import_module(name)``, or the one-line ImportError naming `extra`."""
    if not _installed(name.split(".")[0]):
        raise ImportError(missing_message(extra, [name.split(".")[0]]))
    return importlib.import_module(name)
